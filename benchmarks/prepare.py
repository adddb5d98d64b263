"""``python -m benchmarks.prepare world=<toy2d|shapes> [stage=<...>] [quick=true] [out=<dir>]``

Builds what a world needs, with the project's own code and a fixed seed:

* ``world=toy2d``: pretrain the MLP ε-model (≈15 s) → ``rlkit_diffusion/worlds/assets/toy2d_base.safetensors``.
* ``world=shapes``: ``stage=base`` pretrains the UNet (→ ``assets/shapes_base``), ``stage=pairs`` writes the
  preference pairs (→ cache dir), ``stage=proxy`` trains the proxy reward (→ ``assets/shapes_proxy``),
  ``stage=grid`` draws base-model samples with gold and proxy scores; ``stage=all`` runs the missing ones in order.

``quick=true`` runs every stage at a tiny size into a temporary ``out`` dir (what the test suite does).
"""

from __future__ import annotations

import sys
from pathlib import Path


def parse_overrides(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"prepare: arguments are key=value overrides, got {arg!r} (see the module docstring)")
        k, v = arg.split("=", 1)
        out[k.strip()] = v.strip()
    known = {"world", "stage", "quick", "out", "seed"}
    unknown = set(out) - known
    if unknown:
        raise SystemExit(f"prepare: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    return out


def prepare_toy2d(opts: dict[str, str]) -> None:
    from rlkit_diffusion.worlds import toy2d

    quick = opts.get("quick", "false").lower() == "true"
    out = Path(opts["out"]) / "toy2d_base.safetensors" if "out" in opts else toy2d.ASSET
    kwargs = {"steps": 50} if quick else {}
    path = toy2d.save_base(out, seed=int(opts.get("seed", 0)), **kwargs)
    print(f"toy2d base weights -> {path}")


def prepare_shapes(opts: dict[str, str]) -> None:
    from rlkit_diffusion.worlds.shapes import prepare

    prepare.main(
        stage=opts.get("stage", "all"),
        quick=opts.get("quick", "false").lower() == "true",
        out=Path(opts["out"]) if "out" in opts else None,
        seed=int(opts.get("seed", 0)),
    )


def main(argv: list[str] | None = None) -> None:
    opts = parse_overrides(sys.argv[1:] if argv is None else argv)
    world = opts.get("world", "shapes")
    if world == "toy2d":
        prepare_toy2d(opts)
    elif world == "shapes":
        prepare_shapes(opts)
    else:
        raise SystemExit(f"prepare: world must be toy2d or shapes (sd15/sdxl load pretrained weights), got {world!r}")


if __name__ == "__main__":
    main()
