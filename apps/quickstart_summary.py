"""SUMMARY.md of a quickstart run: artifacts and sizes, timings, loss curves, verification,
evaluation and generated samples. Written by `apps.quickstart`; readable on its own."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from rodin import chat
from rodin.checkpoint import load_model, load_tokenizer
from rodin.generate import generate


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def samples(base_dir: Path, chat_dir: Path, prompt: str, question: str) -> dict[str, str]:
    """Greedy completion of a French prompt by the base model, and a chat reply."""
    out = {}
    torch.manual_seed(0)
    base, info = load_model(base_dir)
    tok = load_tokenizer(info)
    out["completion"] = prompt + generate(base, tok, tok.encode(prompt, bos=True), 60).text
    instruct, info = load_model(chat_dir)
    msgs = [{"role": "user", "content": question}]
    res = generate(instruct, tok, chat.encode_prompt(tok, msgs), 120, stop_strings=chat.STOP_STRINGS,
                   stop_ids=chat.stop_token_ids(tok))
    out["chat"] = res.text
    return out


def write_summary(qs, total_seconds: float) -> Path:
    """Write `<out>/SUMMARY.md` (and copy the loss curves next to it); returns its path."""
    from apps.quickstart import SAMPLE_PROMPT, SAMPLE_QUESTION

    out: Path = qs.out
    lines = ["# RODIN quickstart run", "",
             f"Finished {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores; "
             f"stages took {sum(qs.timings.values()) / 60:.1f} min in all (this invocation: {total_seconds / 60:.1f} min).", ""]

    lines += ["## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {secs:.0f} |" for name, secs in qs.timings.items()]
    lines += [f"| **total** | **{sum(qs.timings.values()):.0f}** |", ""]

    artifacts = [
        ("token shards (train)", qs.data / "train.bin"), ("token shards (val)", qs.data / "val.bin"),
        ("data stats", qs.data / "stats.md"), ("tokenizer", qs.data / "tokenizer.model"),
        ("instruction set (synthetic)", qs.data / "sft.jsonl"),
        ("base model", qs.base), ("instruct model", qs.chat),
        ("HF export", qs.exports / "hf"), ("GGUF f16", qs._gguf("f16")), ("GGUF q4_k_m", qs._gguf("q4_k_m")),
        ("Ollama Modelfile", qs.exports / "Modelfile"),
        ("eval report (base)", out / "eval" / "base" / "report.md"),
        ("eval report (instruct, vs base)", out / "eval" / "chat" / "report.md"),
    ]
    lines += ["## Artifacts", "", "| artifact | path | size |", "|---|---|---:|"]
    for name, path in artifacts:
        rel = os.path.relpath(path, out)
        lines.append(f"| {name} | `{rel}` | {_human(_size(path)) if path.exists() else 'missing'} |")
    lines.append("")

    curves = []
    for stage in ("pretrain", "sft"):
        png = out / stage / "loss.png"
        if png.exists():
            dst = out / f"loss-{stage}.png"
            shutil.copyfile(png, dst)
            curves.append(f"![{stage} loss]({dst.name})")
    if curves:
        lines += ["## Loss curves", "", *curves, ""]

    lines += ["## Verification of the exports", "",
              "| export | runtime | max abs logit diff | top-1 agreement | perplexity source | perplexity export |",
              "|---|---|---:|---:|---:|---:|"]
    for name in ("hf", "f16", "q4_k_m"):
        f = out / "verify" / f"{name}.json"
        if f.exists():
            r = json.loads(f.read_text())
            lines.append(f"| {name} | {r['runtime']} | {r['max_abs_logit_diff']:.3g} | {100 * r['top1_agreement']:.1f} % "
                         f"| {r['perplexity_source']:.2f} | {r['perplexity_export']:.2f} |")
    lines.append("")

    lines += ["## Evaluation", ""]
    for label in ("base", "chat"):
        run = out / "eval" / label / "run.json"
        if run.exists():
            p = json.loads(run.read_text()).get("perplexity") or {}
            if p:
                lines.append(f"- {label}: held-out perplexity {p['token_perplexity']:.2f} per token, "
                             f"{p['word_perplexity']:.2f} per word")
    lines += ["", "FrenchBench-format check (tiny synthetic fixtures built from the held-out text, so the "
              "scores only show that the evaluation runs end to end): see `eval/chat/report.md`.", ""]

    s = samples(qs.base, qs.chat, SAMPLE_PROMPT, SAMPLE_QUESTION)
    lines += ["## Samples (greedy)", "", "Base model, completion:", "", "```", s["completion"], "```", "",
              f"Instruct model, asked « {SAMPLE_QUESTION} »:", "", "```", s["chat"], "```", ""]

    lines += ["## Next", "", f"- Chat: `python -m apps.chat --model {qs.chat}`",
              f"- Ollama: `ollama create rodin-demo -f {qs.exports / 'Modelfile'} && ollama run rodin-demo`",
              f"- llama.cpp: `llama-cli -m {qs._gguf('q4_k_m')} -cnv`", ""]
    path = out / "SUMMARY.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    print("\n".join(lines[:40]))
    return path
