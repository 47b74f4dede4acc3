"""Compare an export (HF directory or GGUF file) against its source model.

    python -m export.verify --model runs/rodin-1b/final --export rodin-1b-Q4_K_M.gguf

On fixed French prompts, the same token ids go through our model (fp32) and through the
export's own runtime (`transformers` for an HF directory, llama.cpp through llama-cpp-python for
a GGUF). Reported: max |logit difference|, top-1 (argmax) agreement, the perplexity of each on
the prompts, and whether the export's tokenizer gives SentencePiece's ids. Readable output,
or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rodin.checkpoint import load_model, load_tokenizer
from rodin.tokenizer import Tokenizer

PROMPTS = (
    "La Révolution française commence en 1789 avec la réunion des états généraux à Versailles. "
    "Elle met fin à l'Ancien Régime et proclame la Déclaration des droits de l'homme et du citoyen.",
    "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur Paris.",
    "Pour préparer une pâte à crêpes, mélangez 250 g de farine, 4 œufs et un demi-litre de lait.\n"
    "Laissez reposer une heure avant la cuisson.",
    "Où est la bibliothèque ? Elle se trouve à côté de l'église, près de la rivière.",
    "Les élèves étudient les mathématiques, le français, l'histoire et la géographie au collège.",
    "<|im_start|>user\nQuelle est la capitale de la France ?<|im_end|>\n<|im_start|>assistant\n"
    "La capitale de la France est Paris.<|im_end|>\n",
)


@dataclass
class Report:
    export: str
    runtime: str  # "transformers" or "llama.cpp"
    n_prompts: int
    n_tokens: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    perplexity_source: float
    perplexity_export: float
    tokenization_match: bool

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_export / self.perplexity_source

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}

    def __str__(self) -> str:
        return (f"export      {self.export} ({self.runtime})\n"
                f"tokens      {self.n_tokens} over {self.n_prompts} French prompts\n"
                f"max |dlogit| {self.max_abs_logit_diff:.4g} (mean {self.mean_abs_logit_diff:.3g})\n"
                f"top-1 agree {100 * self.top1_agreement:.2f} %\n"
                f"perplexity  source {self.perplexity_source:.4f}  export {self.perplexity_export:.4f}  "
                f"(x{self.perplexity_ratio:.4f})\n"
                f"tokenizer   {'identical ids' if self.tokenization_match else 'DIFFERENT ids'}")


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the prompt, and their count."""
    x = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32))
    tgt = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(x, tgt, reduction="sum")), len(ids) - 1


def source_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


class GGUFRunner:
    """llama.cpp (llama-cpp-python) on a GGUF: logits of token ids, tokenization."""

    runtime = "llama.cpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int):
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError("verifying a GGUF needs llama-cpp-python (pip install llama-cpp-python)") from e
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                                   n_threads=max(1, min(4, os.cpu_count() or 1)))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def close(self) -> None:
        self.llm.close()


class HFRunner:
    """transformers on an HF directory."""

    runtime = "transformers"

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def close(self) -> None:
        pass


def open_export(path: str | os.PathLike, n_ctx: int = 512):
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFRunner(path, n_ctx)
    if path.is_dir() and (path / "config.json").is_file():
        return HFRunner(path)
    raise FileNotFoundError(f"{path}: expected a .gguf file or an HF model directory (with config.json)")


def verify(model: str | os.PathLike, export: str | os.PathLike, prompts=PROMPTS,
           tokenizer: Tokenizer | None = None) -> Report:
    """Run the source and the export on the same token ids and compare them."""
    src, info = load_model(model, dtype=torch.float32)
    tok = tokenizer or load_tokenizer(info)
    encoded = [tok.encode(p, bos=True)[: src.cfg.context_length] for p in prompts]
    runner = open_export(export, n_ctx=max(len(e) for e in encoded) + 8)
    try:
        max_diff, abs_sum, n_logits, agree, n_pos = 0.0, 0.0, 0, 0, 0
        nll_src = nll_exp = 0.0
        n_tok = 0
        tok_match = True
        for text, ids in zip(prompts, encoded):
            a, b = source_logits(src, ids), runner.logits(ids)
            if b.shape != a.shape:  # a GGUF may pad its vocab: compare the real rows
                b = b[:, : a.shape[1]]
            d = np.abs(a - b)
            max_diff = max(max_diff, float(d.max()))
            abs_sum += float(d.sum())
            n_logits += d.size
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n_pos += len(ids)
            s, n = _nll(a, ids)
            e, _ = _nll(b, ids)
            nll_src, nll_exp, n_tok = nll_src + s, nll_exp + e, n_tok + n
            tok_match &= runner.tokenize(text) == tok.encode(text, bos=True)
    finally:
        runner.close()
    return Report(str(export), runner.runtime, len(prompts), n_pos, max_diff, abs_sum / max(n_logits, 1),
                  agree / max(n_pos, 1), math.exp(nll_src / n_tok), math.exp(nll_exp / n_tok), tok_match)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.verify", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m export.verify --model runs/rodin-1b/final --export rodin-1b-Q4_K_M.gguf\n"
               "  python -m export.verify --model runs/rodin-1b/final --export exports/rodin-1b-hf --json out.json")
    p.add_argument("--model", required=True, help="the source: our model directory, an HF directory or a .pt")
    p.add_argument("--export", required=True, help="the export to check: a .gguf file or an HF directory")
    p.add_argument("--prompts", help="text file of prompts separated by blank lines (default: built-in French)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout only)")
    p.add_argument("--min-top1", type=float, help="exit with status 2 if top-1 agreement is below this (0-1)")
    p.add_argument("--max-ppl-ratio", type=float, help="exit with status 2 if export/source perplexity exceeds this")
    a = p.parse_args(argv)
    prompts = PROMPTS
    if a.prompts:
        prompts = tuple(t.strip() for t in Path(a.prompts).read_text().split("\n\n") if t.strip())
    try:
        rep = verify(a.model, a.export, prompts)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json == "-":
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep)
        if a.json:
            out = Path(a.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
            tmp.replace(out)
    bad = (a.min_top1 is not None and rep.top1_agreement < a.min_top1) or \
          (a.max_ppl_ratio is not None and rep.perplexity_ratio > a.max_ppl_ratio)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
