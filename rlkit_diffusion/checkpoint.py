"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_<n>/`` with

* ``model.safetensors``      the trainable parameters of the policy network (LoRA adapters only, under LoRA)
* ``reference.safetensors``  an updated reference (hard/EMA) if there is one
* ``optimizer.pt``           optimizer + lr-scheduler state, tensors only (read with ``torch.load(weights_only=True)``)
* ``state.json``             step, counters, algorithm and data-iterator state, RNG states (JSON; tensors as lists),
                             the time it was written (``saved_at``) and a SHA-256 of every other file (``files``)

It is written into ``step_<n>.tmp`` (files fsynced) and renamed to ``step_<n>`` in one ``os.replace``, so a kill
during the write leaves the previous checkpoint intact; ``latest`` is a text file naming the newest complete
checkpoint, also replaced atomically. Only directories named ``step_<8 digits>`` holding ``model.safetensors`` and
``state.json`` count as checkpoints: a leftover ``step_<n>.tmp`` of a killed write never does, and the next save
removes it. Rewriting an existing step first renames it to ``step_<n>.old`` (never deletes it before the new one is
in place); a ``.old`` whose ``step_<n>`` is missing (a kill between the two renames) still counts, and is renamed
back by the next save.

`verify_checkpoint` recomputes the checksums (a truncated or overwritten file is named); `latest_intact_checkpoint`
walks back from the newest checkpoint to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlkit_diffusion.sharding import local_like


def tensor_digest(h: Any, name: str, t: Tensor) -> None:
    """Feed a tensor (name, dtype, flattened shape, bytes) into the hash ``h``: the one tensor fingerprint of the
    caches (`rlkit_diffusion.eval_cache` keys, `rlkit_diffusion.embedding_store` shard checksums)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """THE atomic file write of the project: ``write(tmp)`` fills a temporary file beside ``path`` (same folder, a
    name unique to this process), which is fsynced and then renamed onto ``path`` in one ``os.replace``. A kill at
    any moment leaves either the old file or the new one, never a torn one. Returns ``path``.

    Example: ``atomic_write(p, lambda tmp: save_file(tensors, str(tmp)))``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2, default: Callable | None = None) -> Path:
    """`atomic_write` of ``obj`` as JSON (one trailing newline): every record, metric and run file of the project."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def state_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor], noun: str = "keys") -> str:
    """What keeps ``state`` from loading into a module whose state dict is ``expected``: missing and unexpected
    entries and shape mismatches, the first of each named ("" when it fits). The one check of the weight loaders."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {noun} (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {noun} (e.g. {unexpected[0]!r})")
    if wrong:
        k = wrong[0]
        got, want = tuple(state[k].shape), tuple(expected[k].shape)
        parts.append(f"{len(wrong)} shape mismatches (e.g. {k!r}: file {got}, expected {want})")
    return "; ".join(parts)


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The parameters that train (requires_grad), detached and contiguous, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(local_like(t, params[n]))  # a sharded (FSDP) parameter keeps its own shard


def _jsonable(obj: Any) -> Any:
    """Tensors/arrays → tagged lists so that state.json round-trips without pickle."""
    if isinstance(obj, Tensor):
        return {"__tensor__": obj.cpu().tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """The global RNG states: torch (CPU, and CUDA when initialised), numpy and python ``random``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])


STEP_DIR = re.compile(r"step_\d{8}")


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # platforms that cannot open a directory: its entries are flushed with the files
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    """A finished checkpoint directory: named ``step_<8 digits>`` (or a ``.old`` copy whose ``step_<n>`` is gone),
    with its weights and ``state.json``."""
    name = path.name
    if name.endswith(".old"):
        name = name.removesuffix(".old")
        if (path.parent / name).exists():
            return False
    return (
        STEP_DIR.fullmatch(name) is not None
        and (path / "model.safetensors").is_file()
        and (path / "state.json").is_file()
    )


def _clean_leftovers(root: Path) -> None:
    """Remove the ``.tmp`` directories of killed writes; put back a ``.old`` whose replacement never arrived."""
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob("step_*.old"):
        final = root / old.name.removesuffix(".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def save_checkpoint(
    ckpt_root: Path | str,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    reference_state: dict[str, Tensor] | None = None,
    state: dict[str, Any] | None = None,
    model_state: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it. Returns its directory.

    ``model_state`` / ``optimizer_state``: already gathered states of a sharded run (`rlkit_diffusion.sharding`),
    written instead of ``model``'s trainable parameters and ``optimizer.state_dict()`` — the same layout."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    _clean_leftovers(root)
    tmp.mkdir()
    weights = model_state if model_state is not None else trainable_state(model)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    if reference_state:
        ref = {k: v.detach().cpu().contiguous() for k, v in reference_state.items()}
        save_file(ref, str(tmp / "reference.safetensors"))
    opt = {}
    if optimizer_state is not None:
        opt["optimizer"] = optimizer_state
    elif optimizer is not None:
        opt["optimizer"] = optimizer.state_dict()
    if lr_scheduler is not None:
        opt["lr_scheduler"] = lr_scheduler.state_dict()
    if opt:
        torch.save(opt, tmp / "optimizer.pt")
    files = {file.name: sha256(file) for file in sorted(tmp.iterdir())}
    record = {"step": step, "rng": rng_state(), **(state or {}), "saved_at": time.time(), "files": files}
    with open(tmp / "state.json", "w") as f:  # written last: a directory with state.json is complete
        json.dump(_jsonable(record), f)
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    old = None
    if final.exists():  # rewriting a step (e.g. the final checkpoint of a resumed run): never delete it first
        old = root / f"step_{step:08d}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    _fsync(root)
    if old is not None:
        shutil.rmtree(old)
    return final


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path | str) -> str | None:
    """None if the checkpoint is intact, else one line naming the bad file: ``state.json`` unreadable, or a file
    whose SHA-256 differs from the one recorded in it (a checkpoint written before checksums: its files must exist)."""
    path = Path(path)
    try:
        with open(path / "state.json") as f:
            recorded = json.load(f).get("files")
    except (OSError, ValueError) as err:
        return f"{path / 'state.json'} is unreadable ({type(err).__name__}: {err})"
    if recorded is None:
        return None if (path / "model.safetensors").is_file() else f"{path / 'model.safetensors'} is missing"
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if sha256(file) != digest:
            return f"{file} is corrupt (its SHA-256 differs from the one in state.json)"
    return None


def latest_intact_checkpoint(ckpt_root: Path | str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line per newer checkpoint skipped because it does not."""
    root = Path(ckpt_root)
    newest = latest_checkpoint(root)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    if newest is not None and newest not in done:
        done.append(newest)
    skipped = []
    for cand in sorted(done, key=lambda p: p.name.removesuffix(".old"), reverse=True):
        problem = verify_checkpoint(cand)
        if problem is None:
            return cand, skipped
        skipped.append(problem)
    return None, skipped


def latest_checkpoint(ckpt_root: Path | str) -> Path | None:
    """The newest complete checkpoint directory (``latest`` pointer, else the highest ``step_*``)."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def read_state(path: Path | str) -> dict[str, Any]:
    """A checkpoint's ``state.json`` alone (counters, RNG and data state, layout), without its weights."""
    with open(Path(path) / "state.json") as f:
        return _unjson(json.load(f))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint directory: ``{"model", "reference", "optimizer", "state"}`` (no pickle anywhere)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"not a checkpoint directory (no model.safetensors): {path}")
    out: dict[str, Any] = {"model": load_file(str(path / "model.safetensors"))}
    ref = path / "reference.safetensors"
    out["reference"] = load_file(str(ref)) if ref.exists() else {}
    opt = path / "optimizer.pt"
    out["optimizer"] = torch.load(opt, weights_only=True, map_location="cpu") if opt.exists() else {}
    out["state"] = read_state(path)
    return out
