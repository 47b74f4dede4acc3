"""End to end: `python -m apps.quickstart` on the debug preset and a slice of the demo corpus,
then every artifact loaded by its real client (transformers, llama.cpp, lm-eval's output,
the Gradio app through gradio_client)."""

import json
import subprocess
import sys

import pytest
import torch
from gradio_client import Client

from rodin.chat import DEFAULT_SYSTEM_PROMPT
from rodin.checkpoint import load_model, load_tokenizer
from tests.apps.chat_fixtures import REPO, AppServer, greedy_chat_reply

ARGS = ["--no-serve", "--model", "rodin-debug", "--max-mb", "0.3", "--vocab-size", "1000",
        "--pretrain-steps", "30", "--pretrain-set", "train.global_batch_size=8", "--pretrain-set", "train.micro_batch_size=8",
        "--pretrain-set", "train.seq_len=128", "--pretrain-set", "eval.every=15", "--pretrain-set", "checkpoint.every=15",
        "--sft-set", "train.seq_len=256", "--sft-set", "train.max_steps=12", "--sft-set", "eval.every=6"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "demo"
    proc = subprocess.run([sys.executable, "-m", "apps.quickstart", "--out", str(out), *ARGS], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_summary_lists_every_artifact(run):
    out, stdout = run
    summary = (out / "SUMMARY.md").read_text()
    for name in ("train.bin", "tokenizer.model", "sft.jsonl", "pretrain/final", "sft/final", "export/hf",
                 "rodin-demo-F16.gguf", "rodin-demo-Q4_K_M.gguf", "Modelfile", "eval/chat/report.md"):
        assert name in summary, name
    assert "missing" not in summary.split("## Artifacts")[1].split("##")[0]
    assert (out / "loss-pretrain.png").stat().st_size > 1000 and (out / "loss-sft.png").stat().st_size > 1000
    for stage in ("data", "pretrain", "sft", "export", "verify", "eval"):
        assert (out / ".stages" / f"{stage}.json").exists()


def test_rerun_skips_completed_stages(run):
    out, _ = run
    proc = subprocess.run([sys.executable, "-m", "apps.quickstart", "--out", str(out), *ARGS], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already complete, skipped") == 6


def test_hf_export_loads_in_transformers_and_matches(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run
    hf = AutoModelForCausalLM.from_pretrained(out / "export" / "hf", torch_dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "export" / "hf")
    ours, info = load_model(out / "sft" / "final")
    text = "Pour installer un paquet, utilisez apt."
    ids = load_tokenizer(info).encode(text, bos=True)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        # the HF export is bf16 by default: compare against our weights rounded the same way
        ours_bf16, _ = load_model(out / "sft" / "final", dtype=torch.bfloat16)
        a = ours_bf16(torch.tensor([ids])).float()
        b = hf(torch.tensor([ids])).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    assert hf_tok.chat_template is not None


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_gguf_loads_in_llama_cpp(run, quant):
    from llama_cpp import Llama

    out, _ = run
    llm = Llama(str(out / "export" / f"rodin-demo-{quant}.gguf"), n_ctx=128, verbose=False, logits_all=True)
    tok = load_tokenizer(load_model(out / "sft" / "final")[1])
    text = "Le système Debian est libre."
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True)
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    report = json.loads((out / "verify" / f"{quant.lower()}.json").read_text())
    assert report["tokenization_match"] and report["top1_agreement"] > (0.99 if quant == "F16" else 0.8)


def test_eval_ran_through_lm_eval(run):
    out, _ = run
    for label in ("base", "chat"):
        d = out / "eval" / label
        results = [p for p in d.rglob("*.json") if p.name not in ("run.json",)]
        assert results, f"no lm-eval results JSON under {d}"
        meta = json.loads((d / "run.json").read_text())
        assert meta["perplexity"]["token_perplexity"] > 1
    assert "base" in (out / "eval" / "chat" / "report.md").read_text()  # the comparison with the base run


def test_gradio_app_serves_the_instruct_model(run):
    out, _ = run
    chat_dir = out / "sft" / "final"
    server = AppServer("--model", str(chat_dir), "--threads", "1")
    try:
        client = Client(server.url, verbose=False)
        reply, _ = client.predict("Bonjour !", [], DEFAULT_SYSTEM_PROMPT, 0.0, 1.0, 0, 1.0, 24, -1, api_name="/chat")
    finally:
        server.stop()
    expected = greedy_chat_reply(chat_dir, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                            {"role": "user", "content": "Bonjour !"}], 24)
    assert reply == expected
