"""End-to-end data pipeline throughput against SentencePiece batch encoding of the same text.

Measures, in one run and on the same raw text:
  - reference: `SentencePieceProcessor.Encode(texts, num_threads=<cores>)` of every document;
  - pipeline:  `training.data.prepare` stages clean + language/quality filters + exact and MinHash
               dedup + tokenization (tasks in parallel over the cores), with the same tokenizer;
and prints MB of raw text per second for both and their ratio. Target: pipeline >= 0.33x.

The text is French prose and technical writing extracted from the Debian documentation
packages (debian-handbook, debian-reference-fr, manpages-fr), written as JSONL so that both
sides start from the same plain text; `--input` takes any folder or JSONL file instead.

    python benchmarks/prepare.py                 # Debian docs x3 (~28 MB), all cores
    python benchmarks/prepare.py --repeat 1      # the 9 MB of distinct text only (fixed costs weigh more)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.clean import html_to_text, roff_to_text  # noqa: E402
from training.data.demo_corpus import debian_sources  # noqa: E402
from training.data.prepare import PrepareConfig, prepare  # noqa: E402
from training.data.sources import parse_source  # noqa: E402


def debian_texts() -> list[str]:
    texts = []
    for spec in debian_sources(allow_missing=True):
        for path in sorted(Path(spec.path).rglob(spec.glob)):
            raw = path.read_bytes()
            if path.suffix == ".gz":
                texts.append(roff_to_text(gzip.decompress(raw).decode("utf-8", "replace")))
            else:
                texts.append(html_to_text(raw))
    return [t for t in texts if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="example: python benchmarks/prepare.py --workers 2",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="a folder or JSONL file of documents (default: Debian French docs)")
    ap.add_argument("--tokenizer", help="tokenizer.model to use (default: train an 8000-token one on the input)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for both sides")
    ap.add_argument("--tasks", type=int, default=None, help="pipeline tasks (default 4 x workers)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="replicate the Debian text N times (default 3, ~28 MB: amortises the fixed start-up cost of "
                         "the stages; copies differ by a line, so near-dedup removes them as it would web near-duplicates)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rodin-bench-prepare-"))
    if args.input:
        from training.data.sources import make_reader

        texts = [d.text for d in make_reader(parse_source(f"input={args.input}")).run(None, 0, 1)]
    else:
        base = debian_texts()
        texts = [t if r == 0 else f"{t}\n\nExemplaire numéro {r} de ce document, copie {r * 7919 % 1000}."
                 for r in range(args.repeat) for t in base]
    src = work / "input"
    src.mkdir()
    n_files = max(args.workers * 4, 8)
    for i in range(n_files):  # several files so that tasks can share the work
        with open(src / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[i::n_files]:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    raw_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    from rodin.tokenizer import Tokenizer, train_tokenizer

    tok_path = Path(args.tokenizer) if args.tokenizer else train_tokenizer(texts[::3], work / "tok", vocab_size=8000)
    tok = Tokenizer(tok_path)

    t0 = time.perf_counter()
    ids = tok.sp.Encode(texts, num_threads=args.workers)
    t_ref = time.perf_counter() - t0
    n_tokens = sum(map(len, ids))

    cfg = PrepareConfig(out=work / "out", sources=[parse_source(f"bench={src}")], tasks=args.tasks or 4 * args.workers,
                        workers=args.workers, tokenizer=tok_path, val_fraction=0.0)
    t0 = time.perf_counter()
    report = prepare(cfg)
    t_total = time.perf_counter() - t0
    tm = report["timings"]
    t_pipe = sum(tm[k] for k in ("clean", "exact", "minhash", "dedup", "tokenize"))

    ref_mbs, pipe_mbs = raw_mb / t_ref, raw_mb / t_pipe
    print(f"\ninput: {len(texts):,} documents, {raw_mb:.1f} MB of raw text; tokenizer vocab {tok.vocab_size}; "
          f"{args.workers} workers; cpu_count={os.cpu_count()}")
    print(f"reference  SentencePiece Encode(num_threads={args.workers}): {t_ref:6.2f} s  {ref_mbs:6.2f} MB/s  "
          f"({n_tokens / t_ref / 1e6:.2f} M tokens/s)")
    print(f"pipeline   clean+filter+dedup+tokenize:        {t_pipe:6.2f} s  {pipe_mbs:6.2f} MB/s  "
          f"(stages: " + ", ".join(f"{k} {tm[k]:.1f}s" for k in ("clean", "exact", "minhash", "dedup", "tokenize")) + ")")
    print(f"kept {report['totals']['near_dedup']['docs']:,}/{len(texts):,} documents, "
          f"{report['tokens']['total']:,} tokens; whole prepare() incl. blend {t_total:.1f} s")
    ratio = pipe_mbs / ref_mbs
    print(f"ratio pipeline / tokenization alone: {ratio:.2f}x (target >= 0.33x) -> {'PASS' if ratio >= 0.33 else 'MISS'}")


if __name__ == "__main__":
    main()
