"""Pretraining in-process: config layering, the data windows, learning, health guard, early failures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rodin.checkpoint import load_model
from training import trainer as trainer_mod
from training.config import PretrainConfig, parse_config, read_recipe
from training.distributed import DistInfo
from training.pretrain import TokenWindows, main
from training.trainer import HealthError, check_output_dir, lr_at

from .conftest import PRETRAIN_ARGS, train_losses, write_token_dir


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*PRETRAIN_ARGS, "--data.path", str(data), "--out_dir", str(out), *extra]


# ----------------------------------------------------------------------------- config
def test_recipe_layers_and_overrides(tmp_path):
    cfg, _ = parse_config(PretrainConfig, ["--recipe", "rodin-1b-h100", "--set", "optim.lr=1e-4",
                                           "--train.max_steps", "10", "--set", "system.compile=off"])
    assert cfg.model == "rodin-1b"
    assert cfg.train.micro_batch_size == 8 and cfg.train.global_batch_size == 32  # from h100, base b200
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 10 and cfg.system.compile == "off"
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (0.9, 0.95, 0.1, 2000)
    b200 = read_recipe("rodin-1b-b200")
    assert b200["train"]["global_batch_size"] * b200["train"]["seq_len"] == 65536
    custom = tmp_path / "mine.toml"
    custom.write_text('base = "debug-cpu"\n[optim]\nlr = 0.5\n')
    cfg, _ = parse_config(PretrainConfig, ["--recipe", str(custom)])
    assert cfg.model == "rodin-debug" and cfg.optim.lr == 0.5 and cfg.train.seq_len == 64


@pytest.mark.parametrize("argv, match", [
    (["--set", "optim.lrr=1"], "unknown setting 'optim.lrr'"),
    (["--set", "train.max_steps=abc"], "expected int"),
    (["--set", "nokey"], "expected KEY=VALUE"),
    (["--recipe", "no-such-recipe"], "unknown recipe"),
])
def test_config_errors_are_specific(argv, match, capsys):
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as e:
        parse_config(PretrainConfig, argv)
    text = str(e.value) + capsys.readouterr().err
    assert match in text


def test_help_lists_every_section(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--optim.lr", "--train.global_batch_size", "--checkpoint.keep", "--health.policy",
                 "--system.parallel", "--data.path", "example"):
        assert flag in out


def test_lr_schedule_matches_the_released_run():
    cfg, _ = parse_config(PretrainConfig, ["--recipe", "rodin-1b-b200"])
    o, n = cfg.optim, cfg.train.max_steps
    assert lr_at(0, o, n) == pytest.approx(3e-4 / 2000)
    assert lr_at(1999, o, n) == pytest.approx(3e-4)
    assert lr_at(n - 1, o, n) == pytest.approx(3e-5, rel=1e-3)  # cosine down to 10 %
    mid = (2000 + n) // 2
    assert lr_at(mid, o, n) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5), rel=1e-3)


# ----------------------------------------------------------------------------- data
def _windows(data, world, rank, micro=2, global_bs=8):
    return TokenWindows(data, seq_len=32, micro_batch_size=micro, global_batch_size=global_bs,
                        dist=DistInfo(rank, world, rank, torch.device("cpu")), seed=7, vocab_size=512,
                        val_max_batches=8)


def test_windows_split_by_rank_without_overlap(pretrain_data):
    one = _windows(pretrain_data, 1, 0)
    steps_1 = [torch.cat([one.next_batch()["idx"] for _ in range(4)]) for _ in range(3)]  # accumulation 4
    ranks = [_windows(pretrain_data, 2, r) for r in range(2)]
    for s in range(3):
        per_rank = [torch.cat([ranks[r].next_batch()["idx"] for _ in range(2)]) for r in range(2)]
        rows = {tuple(x.tolist()) for x in torch.cat(per_rank)}
        assert len(rows) == 8, "ranks read overlapping windows"
        assert rows == {tuple(x.tolist()) for x in steps_1[s]}, "2 ranks do not read the 1-rank global batch"
    b = one.next_batch()
    assert torch.equal(b["idx"][:, 1:], b["targets"][:, :-1])  # targets are the inputs shifted by one


def test_windows_resume_from_state(pretrain_data):
    a = _windows(pretrain_data, 1, 0)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()["idx"] for _ in range(6)]
    b = _windows(pretrain_data, 1, 0)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()["idx"]) for x in expected)
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows(pretrain_data, 16, 2, 8, DistInfo(0, 1, 0, torch.device("cpu")), 7, 512, 8).load_state_dict(state)


def test_windows_epochs_cover_every_window_once(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (np.arange(4 * 32 * 4 + 1) % 500).astype(np.uint16).tofile(d / "train.bin")
    w = _windows(d, 1, 0, micro=4, global_bs=4)
    batches = [w.next_batch() for _ in range(4)]
    firsts = [int(b["idx"][i, 0]) for b in batches for i in range(4)]
    assert sorted(firsts) == sorted((np.arange(16) * 32 % 500).tolist())  # one epoch = every window once


def test_uint32_shards_and_vocab_mismatch(tmp_path):
    d = write_token_dir(tmp_path / "u32", n_docs=60, dtype="uint32")
    w = _windows(d, 1, 0)
    assert w.train.dtype == np.uint32 and w.next_batch()["idx"].max() < 512
    big = tmp_path / "big"
    big.mkdir()
    np.full(2000, 600, dtype=np.uint16).tofile(big / "train.bin")
    with pytest.raises(ValueError, match="token id 600 >= the model's vocabulary"):
        _windows(big, 1, 0).next_batch()
    (big / "train.bin").write_bytes(b"\x00" * 2001)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        _windows(big, 1, 0)


# ----------------------------------------------------------------------------- training
def test_loss_decreases_and_final_model_loads(pretrain_data, tmp_path):
    out = tmp_path / "run"
    assert main(_args(pretrain_data, out, "--train.max_steps", "30", "--log.plot", "true",
                      "--log.tensorboard", "true")) == 0
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
    assert last < first - 0.8, (first, last)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) >= 3 and val[-1] < val[0]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records if "loss" in r)
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"] == "rodin-debug" and resolved["train"]["max_steps"] == 30
    model, info = load_model(out / "final")
    assert info.cfg.name == "rodin-debug" and info.metadata["step"] == 30
    x = torch.from_numpy(np.fromfile(pretrain_data / "val.bin", dtype=np.uint16)[:65].astype(np.int64))[None]
    with torch.no_grad():
        assert model(x[:, :-1], x[:, 1:]).item() == pytest.approx(val[-1], abs=0.5)
    # relaunching a finished run does nothing and succeeds
    assert main(_args(pretrain_data, out, "--train.max_steps", "30")) == 0
    assert train_losses(out) == losses


def _events(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def test_nan_guard_skips_the_batch(pretrain_data, tmp_path, capsys):
    out = tmp_path / "skip"
    assert main(_args(pretrain_data, out, "--train.max_steps", "8", "--debug.nan_at_step", "5")) == 0
    assert [(e["event"], e["step"]) for e in _events(out)] == [("skip", 5)]
    assert "loss is nan" in _events(out)[0]["reason"]
    assert "batch skipped" in capsys.readouterr().err
    losses = train_losses(out)
    assert 5 not in losses and all(math.isfinite(v) for v in losses.values())
    model, _ = load_model(out / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_guard_rolls_back(pretrain_data, tmp_path, capsys):
    out = tmp_path / "rollback"
    assert main(_args(pretrain_data, out, "--train.max_steps", "10", "--debug.nan_at_step", "7",
                      "--health.policy", "rollback")) == 0
    ev = [e for e in _events(out) if e["event"] == "rollback"]
    assert [(e["step"], e["to_step"]) for e in ev] == [(7, 4)] and "loss is nan" in ev[0]["reason"]
    assert "rolled back to step_00000004" in capsys.readouterr().err
    assert sorted(train_losses(out)) == list(range(1, 11))


def test_nan_guard_stop_policy(pretrain_data, tmp_path):
    with pytest.raises(HealthError, match="step 3: loss is nan; stopping"):
        main(_args(pretrain_data, tmp_path / "stop", "--debug.nan_at_step", "3", "--health.policy", "stop"))


def test_unwritable_output_dir_fails_early(pretrain_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="is not writable"):
        main(_args(pretrain_data, blocker / "run"))


def test_disk_full_fails_early(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(trainer_mod.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(SystemExit, match=r"0.01 GiB free but one checkpoint of this run needs about 13"):
        check_output_dir(tmp_path / "run", needed_bytes=1_238_415_360 * 12)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["--recipe", "debug-cpu", "--data.path", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "data directory" in capsys.readouterr().err


def test_grad_norm_spike_and_endless_rollbacks_stop(pretrain_data, tmp_path, capsys):
    # Every step after warm-up looks like a spike (factor 0.01): the guard rolls back to step 4,
    # replays, hits the spike again, and gives up after max_consecutive rollbacks to that checkpoint.
    out = tmp_path / "spikes"
    with pytest.raises(HealthError, match="already rolled back 3 times"):
        main(_args(pretrain_data, out, "--health.spike_factor", "0.01", "--health.spike_warmup_steps", "5",
                   "--health.policy", "rollback", "--health.max_consecutive", "3"))
    rollbacks = [e for e in _events(out) if e["event"] == "rollback"]
    assert len(rollbacks) == 3 and all(e["to_step"] == 4 for e in rollbacks)
    assert "grad norm" in capsys.readouterr().err
