"""`python -m training.sft` end to end on the shared trainer: learning, chat template, resume
after kill -9 and SIGTERM, NaN guard, HF Llama init, data errors (training/sft.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rodin.chat import STOP_STRINGS, encode_prompt, jinja_template, stop_token_ids
from rodin.checkpoint import load_model, load_tokenizer, save_model, to_hf_config, to_hf_name
from rodin.generate import generate
from rodin.model import Transformer
from tests.fixtures import debug_config, make_model_dir
from training.config import parse_config
from training.sft import SFTConfig, main
from training.trainer import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[2]

QA = [
    ("Où dort le chat ?", "Le petit chat dort sur le canapé."),
    ("Qu'est-ce que Debian ?", "Debian est un système d'exploitation libre."),
    ("Comment installer un paquet ?", "Utilisez la commande apt-get install."),
    ("Quelle heure est-il ?", "Il est 14 h 30."),
]


def write_jsonl(path: Path, qa=QA, repeat: int = 1, system: bool = False) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(repeat):
            for q, a in qa:
                msgs = ([{"role": "system", "content": "Réponds en une phrase."}] if system else [])
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--recipe", "sft-debug-cpu", "--model", str(model), "--data.train", str(data), "--out_dir", str(out),
            *extra]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _answers(model_dir: Path) -> list[str]:
    model, info = load_model(model_dir)
    tok = load_tokenizer(info)
    return [generate(model, tok, encode_prompt(tok, [{"role": "user", "content": q}]), 40,
                     stop_strings=STOP_STRINGS, stop_ids=stop_token_ids(tok)).text for q, _ in QA]


@pytest.mark.parametrize("kind", ["atomic", "text"])
def test_tiny_model_learns_to_answer_and_carries_the_chat_template(kind, tokenizer, text_marker_tokenizer, tmp_path):
    tok = tokenizer if kind == "atomic" else text_marker_tokenizer
    base = make_model_dir(tmp_path / "base", tok)
    data = write_jsonl(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    before = _answers(base)
    assert not any(a == ref for a, (_, ref) in zip(before, QA))
    rc = main(_args(base, data, out, "--train.max_steps", "100", "--train.global_batch_size", "2",
                    "--train.micro_batch_size", "2", "--optim.lr", "1e-2", "--eval.every", "0",
                    "--checkpoint.every", "0", "--log.every", "20"))
    assert rc == 0
    losses = _losses(out)
    assert losses[100] < 0.3 * losses[20]
    assert _answers(out / "final") == [a for _, a in QA]  # greedy generation reproduces each reply
    meta = json.loads((out / "final" / "model_config.json").read_text())
    assert meta["chat_template"] == jinja_template()
    assert meta["metadata"]["stage"] == "sft" and meta["metadata"]["base_model"] == str(base)
    _, info = load_model(out / "final")
    assert info.is_chat and info.tokenizer_path.read_bytes() == tok.path.read_bytes()


def test_epochs_set_the_step_count_and_validation_runs(tokenizer, tmp_path, capsys):
    base = make_model_dir(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "sft.jsonl", repeat=5, system=True)  # 20 conversations
    out = tmp_path / "run"
    rc = main(_args(base, data, out, "--data.packing", "padded", "--data.epochs", "2", "--data.val_fraction", "0.2",
                    "--eval.every", "4"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "16/16 conversations kept" in text and "4/4 conversations kept" in text  # 20 % held out
    assert "2 epochs of 16 rows = 8 steps of 4 rows" in text
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8] and val[1]["val_loss"] < val[0]["val_loss"]
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 8


def test_nan_guard_is_the_trainers(tokenizer, tmp_path, capsys):
    base = make_model_dir(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "sft.jsonl", repeat=3)
    out = tmp_path / "run"
    assert main(_args(base, data, out, "--train.max_steps", "6", "--debug.nan_at_step", "3")) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "skip" and r["step"] == 3 for r in recs)
    assert "batch skipped" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").is_file()


def test_starts_from_an_hf_llama_directory(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = make_model_dir(tmp_path / "base", tokenizer, seed=5)
    model, _ = load_model(base)
    hf_cfg = to_hf_config(model.cfg, torch_dtype="float32")
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    sd = {to_hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(tokenizer.path, hf_dir / "tokenizer.model")

    data = write_jsonl(tmp_path / "sft.jsonl", repeat=2)
    extra = ("--train.max_steps", "3", "--eval.every", "0")
    assert main(_args(base, data, tmp_path / "from_rodin", *extra)) == 0
    assert main(_args(hf_dir, data, tmp_path / "from_hf", *extra)) == 0
    a, b = _losses(tmp_path / "from_rodin"), _losses(tmp_path / "from_hf")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    _, info = load_model(tmp_path / "from_hf" / "final")
    assert info.source == "rodin" and info.is_chat


def test_malformed_data_is_reported_or_rejected(tokenizer, tmp_path, capsys):
    base = make_model_dir(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "sft.jsonl", repeat=2)
    with data.open("a") as f:
        f.write('{"messages": [{"role": "robot", "content": "bip"}]}\n')  # line 9
    rc = main(_args(base, data, tmp_path / "fail", "--on-error", "fail"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:9: message 0: unknown role 'robot'" in err
    assert not (tmp_path / "fail" / "final").exists()
    rc = main(_args(base, data, tmp_path / "skip", "--train.max_steps", "2", "--eval.every", "0"))
    captured = capsys.readouterr()
    assert rc == 0 and "1 malformed line(s) skipped" in captured.out
    assert f"{data}:9: message 0: unknown role 'robot'" in captured.err

    assert main(_args(base, tmp_path / "none.jsonl", tmp_path / "x")) == 2
    assert "SFT data file not found" in capsys.readouterr().err
    other = save_model(Transformer(dataclasses.replace(debug_config(tokenizer), vocab_size=600)),
                       tmp_path / "big_vocab", tokenizer=tokenizer)
    assert main(_args(other, data, tmp_path / "y")) == 2
    assert "has 512 tokens but the model" in capsys.readouterr().err
    cfg, _ = parse_config(SFTConfig, ["--recipe", "sft-rodin-1b"])
    assert cfg.optim.lr == 2e-5 and cfg.train.seq_len == 2048 and cfg.data.packing == "packed"


# ----------------------------------------------------------------------------- resume (subprocesses)

RESUME_ARGS = ("--train.max_steps", "12", "--checkpoint.every", "4", "--eval.every", "6", "--data.val_fraction",
               "0.1", "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.seq_len", "64")


def _run(model: Path, data: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "training.sft", *_args(model, data, out, *RESUME_ARGS, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sft_resume")
    base = make_model_dir(root / "base", tokenizer)
    data = write_jsonl(root / "sft.jsonl", repeat=4, system=True)  # 16 conversations, several epochs
    ref = root / "ref"
    proc = _run(base, data, ref)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base, data, ref


def _assert_same_run(run: Path, ref: Path) -> None:
    assert _losses(run) == _losses(ref)  # bitwise: every step's loss
    a, b = load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_is_exact(resume_setup, tmp_path):
    base, data, ref = resume_setup
    out = tmp_path / "killed"
    proc = _run(base, data, out, "--debug.sigkill_at_step", "6")
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step_00000004").is_dir() and not (out / "final").exists()
    proc = _run(base, data, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    _assert_same_run(out, ref)


def test_sigterm_checkpoints_then_resumes_exactly(resume_setup, tmp_path):
    base, data, ref = resume_setup
    out = tmp_path / "preempted"
    proc = _run(base, data, out, "--debug.sleep_per_step", "0.3", wait=False)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_00000004").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert not (out / "final").exists()
    proc = _run(base, data, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(out, ref)


def test_demo_instruction_set_format_trains(tokenizer, tmp_path, capsys):
    """A slice of the built-in demo set (training.data.demo_corpus) loads without a rejected
    line and trains; the full set on rodin-tiny is the `sft-tiny-cpu` recipe (docs/sft.md)."""
    from training.data.demo_corpus import build_sft, debian_sources

    data = tmp_path / "sft.jsonl"
    build_sft(debian_sources(max_docs=1, allow_missing=True), data, max_pairs=12)
    n = len(data.read_text().splitlines())
    assert n >= 6
    base = make_model_dir(tmp_path / "base", tokenizer)
    rc = main(_args(base, data, tmp_path / "run", "--train.max_steps", "3", "--data.val_fraction", "0.2",
                    "--eval.every", "3", "--train.seq_len", "256"))
    out, err = capsys.readouterr()
    assert rc == 0 and "malformed" not in out + err, err
    n_train = n - round(n * 0.2)
    assert f"{n_train}/{n_train} conversations kept" in out
    assert any("val_loss" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_help_documents_the_sft_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data.train", "--data.packing", "--data.overflow", "--on-error", "--data.epochs",
                 "--optim.lr", "--checkpoint.every", "examples:", "sft-tiny-cpu"):
        assert flag in out
