"""``python -m benchmarks.prepare world=<toy2d|toy2d_flow|shapes|shapes_flow> [stage=<...>] [quick=true] [out=<dir>]``

Builds what a world needs, with the project's own code and a fixed seed:

* ``world=toy2d``: pretrain the MLP ε-model (≈15 s) → ``rlkit_diffusion/worlds/assets/toy2d_base.safetensors``.
* ``world=toy2d_flow``: the same MLP, recipe and draws as a flow-matching velocity model (≈15 s) →
  ``rlkit_diffusion/worlds/assets/toy2d_flow_base.safetensors``.
* ``world=shapes``: ``stage=base`` pretrains the UNet (→ ``assets/shapes_base``), ``stage=pairs`` writes the
  preference pairs (→ cache dir), ``stage=proxy`` trains the proxy reward (→ ``assets/shapes_proxy``),
  ``stage=grid`` draws base-model samples with gold and proxy scores; ``stage=all`` runs the missing ones in order.
* ``world=shapes_flow``: ``stage=base`` pretrains the same UNet with the same recipe and draws as a flow-matching
  velocity model (→ ``assets/shapes_flow_base``), ``stage=grid`` its samples (SDE sampler); pairs and proxy reward
  are shapes'.

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


def prepare_toy2d(opts: dict[str, str], flow: bool = False) -> None:
    from rlkit_diffusion.worlds import toy2d

    quick = opts.get("quick", "false").lower() == "true"
    name = "toy2d_flow" if flow else "toy2d"
    default = toy2d.FLOW_ASSET if flow else toy2d.ASSET
    out = Path(opts["out"]) / f"{name}_base.safetensors" if "out" in opts else default
    kwargs = {"steps": 50} if quick else {}
    if flow:
        kwargs["flow"] = True
    path = toy2d.save_base(out, seed=int(opts.get("seed", 0)), **kwargs)
    print(f"{name} base weights -> {path}")


def prepare_shapes(opts: dict[str, str], flow: bool = False) -> None:
    from rlkit_diffusion.worlds.shapes import prepare

    prepare.main(
        stage=opts.get("stage", "all"),
        quick=opts.get("quick", "false").lower() == "true",
        out=Path(opts["out"]) if "out" in opts else None,
        seed=int(opts.get("seed", 0)),
        flow=flow,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    opts = parse_overrides(argv)
    world = opts.get("world", "shapes")
    if world in ("toy2d", "toy2d_flow"):
        prepare_toy2d(opts, flow=world == "toy2d_flow")
    elif world in ("shapes", "shapes_flow"):
        prepare_shapes(opts, flow=world == "shapes_flow")
    else:
        raise SystemExit(
            "prepare: world must be toy2d, toy2d_flow, shapes or shapes_flow (sd15/sdxl load pretrained weights), "
            f"got {world!r}"
        )


if __name__ == "__main__":
    main()
