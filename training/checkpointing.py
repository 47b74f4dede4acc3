"""Resumable training checkpoints (torch.distributed.checkpoint) and their export.

Layout of `<out_dir>/checkpoints/`:

    step_00001000/              one complete checkpoint
        .metadata, __*.distcp   model + optimizer, sharded as trained (DCP; any world size reloads it)
        trainer_rank00000.pt    per-rank trainer state: step, tokens, data position, RNG states,
                                health-guard state (torch.load(weights_only=True) safe)
        tokenizer.model         copy of the run's tokenizer (if any), so the directory is self-contained
        checkpoint.json         written LAST: step, model config, file sizes = the completion marker
    .tmp-step_00002000/         a checkpoint being written (ignored and cleaned on resume)

A checkpoint is written into `.tmp-step_N`, made durable (fsync), marked complete with
`checkpoint.json`, then renamed to `step_N`; killing the process at any point leaves the
previous checkpoints intact. On resume the newest directory whose marker lists files
that all exist with their recorded sizes, and which loads without error, is used; each
rejected one is reported with a warning.

Export a training checkpoint (or a run directory: its newest complete checkpoint) to a
rodin model directory, readable by `rodin.checkpoint.load_model` and the exporters:

    python -m training.checkpointing runs/rodin-1b out/rodin-1b-step478000
    # or from Python: training.checkpointing.export_checkpoint(ckpt_or_run_dir, out_dir)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from training.distributed import DistInfo, all_reduce_max, barrier


def _quiet(fn, *args, **kwargs):
    """DCP without a process group (single process) is supported but warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kwargs)


MARKER = "checkpoint.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories (complete or not), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=checkpoint_step)


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint looks complete, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{MARKER} is unreadable ({e})"
    for rel, size in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, {size} were written (truncated or corrupt)"
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def find_latest(root_or_run: Path) -> Path:
    """The newest complete checkpoint of a checkpoint directory, a run directory or `checkpoints/`."""
    p = Path(root_or_run)
    if (p / MARKER).is_file():
        return p
    for root in (p / "checkpoints", p):
        for c in reversed(list_checkpoints(root)):
            reason = verify_checkpoint(c)
            if reason is None:
                return c
            warnings.warn(f"skipping checkpoint {c}: {reason}")
    raise FileNotFoundError(f"no complete checkpoint in {p} (expected {p}/checkpoints/step_N/{MARKER})")


class CheckpointManager:
    """Save, prune and restore checkpoints of one run; every rank calls every method."""

    def __init__(self, root: Path, info: DistInfo, keep: int, log: Callable[[str], None] = print):
        self.root, self.info, self.keep, self.log = Path(root), info, max(1, keep), log

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, trainer_state: dict, meta: dict,
             tokenizer: Path | None = None, kill_during_write: bool = False) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if final.exists() and verify_checkpoint(final) is None:
            return final  # this step is already saved (e.g. a periodic save right before the end)
        t0 = time.perf_counter()
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(self.info)
        try:
            msd, osd = get_state_dict(model, optimizer)
            _quiet(dcp.save, {"model": msd, "optim": osd}, checkpoint_id=str(tmp))
            torch.save(trainer_state, tmp / f"trainer_rank{self.info.rank:05d}.pt")
            if kill_during_write:  # fault injection: the data is written, the marker is not
                os.kill(os.getpid(), 9)
            barrier(self.info)
            if self.info.is_main:
                if tokenizer is not None and Path(tokenizer).is_file():
                    shutil.copyfile(tokenizer, tmp / "tokenizer.model")
                _fsync_tree(tmp)
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                meta = {**meta, "step": step, "world_size": self.info.world_size, "files": files,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                (tmp / (MARKER + ".tmp")).write_text(json.dumps(meta, indent=2) + "\n")
                os.replace(tmp / (MARKER + ".tmp"), tmp / MARKER)
                _fsync_dir(tmp)
                if final.exists():  # an incomplete leftover with the same name
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.root)
        except OSError as e:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.root).free / 2**30 if self.root.exists() else float("nan")
            raise OSError(e.errno, f"writing checkpoint {final} failed: {e.strerror or e} "
                                   f"({free:.1f} GiB free on {self.root}); earlier checkpoints are intact. "
                                   f"Free space or point out_dir elsewhere, then relaunch to resume") from e
        barrier(self.info)
        if self.info.is_main:
            self._prune()
        self.log(f"checkpoint saved: {final} ({time.perf_counter() - t0:.1f} s)")
        return final

    def _prune(self) -> None:
        complete = [c for c in list_checkpoints(self.root) if verify_checkpoint(c) is None]
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        newest = checkpoint_step(complete[-1]) if complete else -1
        for p in self.root.iterdir():
            # leftovers of interrupted writes, and incomplete checkpoints older than the newest good one
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(PREFIX) and p.is_dir() and p not in complete
                                                 and p.name[len(PREFIX):].isdigit() and checkpoint_step(p) < newest):
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load_latest(self, model, optimizer, warn: Callable[[str], None]) -> tuple[dict, Path] | None:
        """Restore the newest usable checkpoint into model and optimizer; return (trainer state, path)."""
        for c in reversed(list_checkpoints(self.root)):
            reason = verify_checkpoint(c)
            if reason is None:
                try:
                    return self.load(c, model, optimizer), c
                except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure: use the previous one
                    reason = f"loading failed ({type(e).__name__}: {e})"
            warn(f"checkpoint {c} is unusable: {reason}; falling back to the previous one")
        return None

    def load(self, path: Path, model, optimizer, *, model_only: bool = False) -> dict:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd} if model_only else {"model": msd, "optim": osd}
        error = None
        try:
            _quiet(dcp.load, state, checkpoint_id=str(path))
            rank_file = path / f"trainer_rank{self.info.rank:05d}.pt"
            if not rank_file.is_file():  # relaunched with more ranks than were saved
                rank_file = path / "trainer_rank00000.pt"
            trainer_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            error = e
        if all_reduce_max(1.0 if error else 0.0, self.info):
            raise error or RuntimeError("another rank failed to load this checkpoint")
        if model_only:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return trainer_state


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      dtype: torch.dtype | None = torch.bfloat16, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write the weights of a training checkpoint as a rodin model directory (single process, CPU).

    `checkpoint_dir` is a `step_N` directory, a run directory or its `checkpoints/` folder (the
    newest complete checkpoint is used). Works for checkpoints written by any number of ranks.
    """
    from rodin.checkpoint import save_model
    from rodin.config import ModelConfig
    from rodin.model import Transformer

    path = find_latest(Path(checkpoint_dir))
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    sd = get_model_state_dict(model, options=StateDictOptions())
    _quiet(dcp.load, {"model": sd}, checkpoint_id=str(path))
    model.load_state_dict(sd, strict=False)
    tok = tokenizer or (path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None)
    md = {"source": "training checkpoint", "checkpoint": str(path), "step": meta["step"],
          "tokens": meta.get("tokens"), **meta.get("metadata", {})}
    return save_model(model, out_dir, tokenizer=tok, chat_template=meta.get("chat_template"),
                      metadata=md, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint to a rodin model directory (model.safetensors, "
                    "model_config.json, tokenizer.model).",
        epilog="example:\n  python -m training.checkpointing runs/rodin-1b out/rodin-1b-base\n"
               "  python -m training.checkpointing runs/rodin-1b/checkpoints/step_00010000 out/step10k "
               "--dtype float32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or one step_N checkpoint")
    parser.add_argument("out_dir", help="model directory to write (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights dtype")
    parser.add_argument("--tokenizer", help="tokenizer.model to include (default: the checkpoint's copy)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=getattr(torch, args.dtype),
                                tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
