"""The whole RODIN pipeline at laptop scale, in one command (`make demo`).

    python -m apps.quickstart                  # everything, then the chat demo on 127.0.0.1:7860
    python -m apps.quickstart --no-serve       # non-interactive: stop after the summary
    python -m apps.quickstart --out runs/demo --pretrain-steps 600

Stages, each the same `python -m ...` command a real run uses (printed before it runs):
  data       Debian's French documentation -> cleaned, filtered, deduplicated corpus,
             tokenizer, train/val token shards, synthetic ChatML instruction set
  pretrain   rodin-tiny from scratch on the shards (training.pretrain, recipe tiny-cpu)
  sft        chat fine-tuning on the instruction set (training.sft, recipe sft-tiny-cpu)
  export     HF directory, GGUF f16 and q4_k_m, Ollama Modelfile
  verify     each export against the model (logit differences, top-1 agreement, perplexity)
  eval       perplexity on held-out text and a small FrenchBench-format check through lm-eval
  summary    SUMMARY.md: artifacts and sizes, timings, loss curves, verification, samples
  chat       the Gradio chat on the instruct model (skipped by --no-serve)

Re-running skips the stages whose outputs are complete; an interrupted stage resumes
(the trainers resume from their last checkpoint, the data stage from its done markers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PY = sys.executable
SAMPLE_PROMPT = "La distribution Debian est"
SAMPLE_QUESTION = "Comment installer un paquet avec apt ?"


@dataclass
class Stage:
    name: str
    what: str
    commands: Callable[[], list[list[str]]]
    outputs: Callable[[], list[Path]]
    after: Callable[[], None] | None = None


class Quickstart:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = Path(args.out)
        self.data = self.out / "data"
        self.base = self.out / "pretrain" / "final"
        self.chat = self.out / "sft" / "final"
        self.exports = self.out / "export"
        self.timings: dict[str, float] = {}
        self.stages = [
            Stage("data", "French corpus, tokenizer, token shards, instruction set", self._data_cmds,
                  lambda: [self.data / n for n in ("train.bin", "val.bin", "tokenizer.model", "sft.jsonl")],
                  self._write_heldout),
            Stage("pretrain", f"pretraining {args.model or 'rodin-tiny'} from scratch", self._pretrain_cmds,
                  lambda: [self.base / "model.safetensors"]),
            Stage("sft", "chat fine-tuning (loss on assistant replies only)", self._sft_cmds,
                  lambda: [self.chat / "model.safetensors"]),
            Stage("export", "HF directory, GGUF f16 and q4_k_m, Ollama Modelfile", self._export_cmds,
                  lambda: [self.exports / "hf" / "model.safetensors", self._gguf("f16"), self._gguf("q4_k_m"),
                           self.exports / "Modelfile"]),
            Stage("verify", "exports against the model", self._verify_cmds,
                  lambda: [self.out / "verify" / f"{n}.json" for n in ("hf", "f16", "q4_k_m")]),
            Stage("eval", "perplexity and a small FrenchBench-format check", self._eval_cmds,
                  lambda: [self.out / "eval" / "chat" / "report.md"]),
        ]

    # --- stage commands -------------------------------------------------------------------
    def _data_cmds(self) -> list[list[str]]:
        cmd = [PY, "-m", "training.data.demo_corpus", "--out", str(self.data), "--vocab-size", str(self.a.vocab_size)]
        if self.a.max_mb:
            cmd += ["--max-mb", str(self.a.max_mb)]
        return [cmd]

    def _pretrain_cmds(self) -> list[list[str]]:
        cmd = [PY, "-m", "training.pretrain", "--recipe", self.a.pretrain_recipe, "--data.path", str(self.data),
               "--out_dir", str(self.out / "pretrain"), "--train.max_steps", str(self.a.pretrain_steps)]
        if self.a.model:
            cmd += ["--model", self.a.model]
        return [cmd + [a for kv in self.a.pretrain_set for a in ("--set", kv)]]

    def _sft_cmds(self) -> list[list[str]]:
        return [[PY, "-m", "training.sft", "--recipe", self.a.sft_recipe, "--model", str(self.base),
                 "--data.train", str(self.data / "sft.jsonl"), "--out_dir", str(self.out / "sft")]
                + [a for kv in self.a.sft_set for a in ("--set", kv)]]

    def _gguf(self, quant: str) -> Path:
        return self.exports / f"rodin-demo-{quant.upper()}.gguf"

    def _export_cmds(self) -> list[list[str]]:
        return [
            [PY, "-m", "export.hf", "--model", str(self.chat), "--out", str(self.exports / "hf")],
            [PY, "-m", "export.gguf", "--model", str(self.chat), "--quant", "f16", "--out", str(self._gguf("f16"))],
            [PY, "-m", "export.gguf", "--model", str(self.chat), "--quant", "q4_k_m", "--out", str(self._gguf("q4_k_m"))],
            [PY, "-m", "export.ollama", "--gguf", str(self._gguf("q4_k_m")), "--out", str(self.exports / "Modelfile")],
        ]

    def _verify_cmds(self) -> list[list[str]]:
        targets = {"hf": self.exports / "hf", "f16": self._gguf("f16"), "q4_k_m": self._gguf("q4_k_m")}
        return [[PY, "-m", "export.verify", "--model", str(self.chat), "--export", str(path),
                 "--json", str(self.out / "verify" / f"{name}.json")] for name, path in targets.items()]

    def _eval_cmds(self) -> list[list[str]]:
        fixtures = self.out / "eval" / "french_bench_data"
        heldout = self.data / "heldout.txt"
        cmds = [[PY, "-m", "apps.eval_data", "--make-fixtures", str(fixtures), "--text", str(heldout)]]
        for label, model in (("base", self.base), ("chat", self.chat)):
            cmd = [PY, "-m", "apps.eval", "--model", str(model), "--tasks", "french_bench", "--data-dir", str(fixtures),
                   "--limit", "8",
                   "--perplexity", str(heldout), "--label", label, "--out", str(self.out / "eval" / label)]
            if label == "chat":
                cmd += ["--compare", str(self.out / "eval" / "base")]
            cmds.append(cmd)
        return cmds

    def _write_heldout(self) -> None:
        """Held-out French text for perplexity: the first documents of val.bin, decoded."""
        from rodin.tokenizer import Tokenizer

        target = self.data / "heldout.txt"
        if target.exists():
            return
        tok = Tokenizer(self.data / "tokenizer.model")
        dtype = json.loads((self.data / "meta.json").read_text()).get("dtype", "uint16") \
            if (self.data / "meta.json").exists() else "uint16"
        stream = np.memmap(self.data / "val.bin", dtype=dtype, mode="r")[:200_000]
        docs = [tok.decode(d.tolist()).strip() for d in np.split(stream, np.flatnonzero(stream == tok.eos_id))]
        text = "\n\n".join(d for d in docs if d)[:60_000]
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(target)

    # --- running --------------------------------------------------------------------------
    def _marker(self, stage: Stage) -> Path:
        return self.out / ".stages" / f"{stage.name}.json"

    def _complete(self, stage: Stage) -> bool:
        return self._marker(stage).exists() and all(p.exists() for p in stage.outputs())

    def run_stage(self, i: int, stage: Stage) -> None:
        header = f"[{i}/{len(self.stages) + 1}] {stage.name}: {stage.what}"
        if self._complete(stage) and not self.a.force:
            self.timings[stage.name] = json.loads(self._marker(stage).read_text())["seconds"]
            print(f"{header} -- already complete, skipped", flush=True)
            return
        print(f"\n{'=' * 78}\n{header}", flush=True)
        t0 = time.perf_counter()
        for cmd in stage.commands():
            print(f"$ {shlex.join(['python'] + cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"stage '{stage.name}' failed (exit code {proc.returncode}) running:\n  "
                                 f"{shlex.join(cmd)}\nFix the error above and run the same command again: "
                                 f"completed stages are skipped and interrupted ones resume.")
        if stage.after:
            stage.after()
        missing = [str(p) for p in stage.outputs() if not p.exists()]
        if missing:
            raise SystemExit(f"stage '{stage.name}' finished but did not produce: {', '.join(missing)}")
        self.timings[stage.name] = time.perf_counter() - t0
        self._marker(stage).parent.mkdir(parents=True, exist_ok=True)
        self._marker(stage).write_text(json.dumps({"seconds": self.timings[stage.name], "finished": time.time()}))
        print(f"-- {stage.name} done in {self.timings[stage.name]:.0f} s", flush=True)

    def run(self) -> None:
        t0 = time.perf_counter()
        for i, stage in enumerate(self.stages, 1):
            self.run_stage(i, stage)
        print(f"\n{'=' * 78}\n[{len(self.stages) + 1}/{len(self.stages) + 1}] summary", flush=True)
        from apps.quickstart_summary import write_summary

        summary = write_summary(self, time.perf_counter() - t0)
        print(f"\nSummary: {summary}")
        if not self.a.no_serve:
            cmd = [PY, "-m", "apps.chat", "--model", str(self.chat), "--host", self.a.host, "--port", str(self.a.port)]
            print(f"\nStarting the chat demo (Ctrl-C to stop):\n$ {shlex.join(['python'] + cmd[1:])}", flush=True)
            subprocess.run(cmd)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m apps.quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    ap.add_argument("--no-serve", action="store_true", help="do not start the chat server at the end")
    ap.add_argument("--force", action="store_true", help="re-run every stage even if its outputs are complete")
    ap.add_argument("--max-mb", type=float, default=None, help="slice of the demo corpus per source, in MB")
    ap.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary (default 8000)")
    ap.add_argument("--model", default=None, help="model preset to pretrain (default: the recipe's, rodin-tiny)")
    ap.add_argument("--pretrain-recipe", default="tiny-cpu", help="training.pretrain recipe (default tiny-cpu)")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="pretraining steps (default 800)")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a pretraining setting, e.g. optim.lr=2e-3 (repeatable)")
    ap.add_argument("--sft-recipe", default="sft-tiny-cpu", help="training.sft recipe (default sft-tiny-cpu)")
    ap.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an SFT setting, e.g. train.seq_len=256 (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="chat server address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860, help="chat server port (default 7860)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    Quickstart(parse_args(argv)).run()


if __name__ == "__main__":
    main()
