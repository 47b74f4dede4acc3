"""Exact resume in real processes: kill -9, SIGTERM, a kill during a checkpoint write, a corrupt
latest checkpoint. Every resumed run must reproduce the uninterrupted run's loss at every step
bit for bit (fp32 on CPU, deterministic ops, one thread) and end with identical weights."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.checkpointing import export_checkpoint, list_checkpoints, verify_checkpoint
from training.trainer import EXIT_PREEMPTED

from .conftest import PRETRAIN_STEPS, REPO, run_pretrain, train_losses


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == list(range(1, PRETRAIN_STEPS + 1))
    diff = [(s, got[s], want[s]) for s in want if got[s] != want[s]]  # bitwise: exact float equality
    assert not diff, f"losses differ from the uninterrupted run at (step, got, want): {diff[:5]}"
    a, b = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill9_then_relaunch_is_bitwise_identical(pretrain_data, pretrain_reference, tmp_path):
    out = tmp_path / "run"
    killed = run_pretrain(pretrain_data, out, "--debug.sigkill_at_step", "10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(train_losses(out)) == 10 and not (out / "final").exists()
    resumed = run_pretrain(pretrain_data, out, check=True)  # the same command
    assert "resumed from" in resumed.stdout and "step_00000008" in resumed.stdout
    assert_same_run(out, pretrain_reference)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(pretrain_data, pretrain_reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.pretrain", "--recipe", "debug-cpu", "--train.max_steps",
           str(PRETRAIN_STEPS), "--checkpoint.every", "4", "--eval.every", "8", "--log.plot", "false",
           "--data.path", str(pretrain_data), "--out_dir", str(out), "--debug.sleep_per_step", "0.4"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for step 5 (past the first checkpoint, before the second)
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and any('"step": 5,' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    stopped = max(train_losses(out))
    assert stopped < PRETRAIN_STEPS and "received SIGTERM" in stderr
    latest = list_checkpoints(out / "checkpoints")[-1]
    assert latest.name == f"step_{stopped:08d}" and verify_checkpoint(latest) is None
    resumed = run_pretrain(pretrain_data, out, check=True)
    assert f"resumed from {latest}" in resumed.stdout
    assert_same_run(out, pretrain_reference)


def test_kill_during_checkpoint_write_keeps_previous(pretrain_data, pretrain_reference, tmp_path):
    out = tmp_path / "run"
    killed = run_pretrain(pretrain_data, out, "--debug.sigkill_in_checkpoint_at_step", "8")
    assert killed.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"]
    assert (ckpts / ".tmp-step_00000008").is_dir()  # the interrupted write, never renamed
    resumed = run_pretrain(pretrain_data, out, check=True)
    assert "step_00000004" in resumed.stdout
    assert not (ckpts / ".tmp-step_00000008").exists()  # cleaned up
    assert_same_run(out, pretrain_reference)


def test_corrupt_latest_checkpoint_falls_back_with_warning(pretrain_data, pretrain_reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrain_reference, out)
    shutil.rmtree(out / "final")
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000012", "step_00000016"]  # keep = 2
    shard = next(ckpts[-1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a half-written file
    resumed = run_pretrain(pretrain_data, out, check=True)
    assert "step_00000016 is unusable" in resumed.stderr and "truncated or corrupt" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000012" in resumed.stdout
    assert_same_run(out, pretrain_reference)

    # a marker that lies about nothing but a shard full of garbage: the load fails, fallback again
    shutil.rmtree(out / "final")
    latest = list_checkpoints(out / "checkpoints")[-1]
    meta_file = latest / ".metadata"
    meta_file.write_bytes(b"\0" * meta_file.stat().st_size)
    resumed = run_pretrain(pretrain_data, out, check=True)
    assert "loading failed" in resumed.stderr
    assert_same_run(out, pretrain_reference)


def test_export_checkpoint_matches_final_weights(pretrain_reference, tmp_path):
    out = export_checkpoint(pretrain_reference, tmp_path / "exported", dtype=torch.float32)
    a, b = load_file(out / "model.safetensors"), load_file(pretrain_reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "model_config.json").read_text())
    assert meta["metadata"]["step"] == PRETRAIN_STEPS and meta["model"]["name"] == "rodin-debug"
    proc = subprocess.run([sys.executable, "-m", "training.checkpointing", str(tmp_path / "nothing"),
                           str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
