"""Fixtures of the pretraining tests (prefixed `pretrain_`; other training tests may add theirs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# The run every exactness test compares against: rodin-debug, 8 x 64 tokens per step
# (2 micro-batches of 4), checkpoints every 4 steps, fp32, 1 thread, deterministic.
PRETRAIN_STEPS = 16
PRETRAIN_ARGS = ["--recipe", "debug-cpu", "--train.max_steps", str(PRETRAIN_STEPS), "--checkpoint.every", "4",
                 "--eval.every", "8", "--log.plot", "false"]


def write_token_dir(path: Path, n_docs: int = 300, seed: int = 0, dtype: str = "uint16") -> Path:
    """train.bin / val.bin of learnable token documents (arithmetic runs), EOS-separated."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, length, stride = rng.integers(4, 500), rng.integers(20, 160), rng.integers(1, 4)
        docs.append((start + np.arange(length) * stride) % 508 + 4)
        docs.append(np.array([3]))
    tokens = np.concatenate(docs).astype(dtype)
    path.mkdir(parents=True, exist_ok=True)
    tokens.tofile(path / "train.bin")
    tokens[: 64 * 40].tofile(path / "val.bin")
    if dtype != "uint16":
        (path / "meta.json").write_text(json.dumps({"dtype": dtype}))
    return path


def run_pretrain(data: Path, out: Path, *extra: str, check: bool = False, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.pretrain", *PRETRAIN_ARGS, "--data.path", str(data), "--out_dir", str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the last record of a step wins, as a resumed run rewrites them)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> Path:
    return write_token_dir(tmp_path_factory.mktemp("pretrain_tokens"))


@pytest.fixture(scope="session")
def pretrain_reference(tmp_path_factory, pretrain_data) -> Path:
    """An uninterrupted run of PRETRAIN_STEPS steps."""
    out = tmp_path_factory.mktemp("pretrain_ref") / "run"
    run_pretrain(pretrain_data, out, check=True)
    return out
