"""Tokenizer training stage: `rodin.tokenizer.train_tokenizer` on a stratified sample of the
cleaned corpus, then a fertility report on held-out documents.

Sampling is per source: the sample budget (`--sample-mb`) is shared between sources by
weight (equal by default, `--quota SOURCE=WEIGHT` to change), a source smaller than its share
gives all it has and the rest is shared among the others. Documents are picked by a hash of
their id, so the sample is deterministic and streaming (two passes over the corpus: sizes,
then texts). A hash-selected slice of documents is held out and never trained on; the
fertility report (tokens per word, bytes per token, byte-fallback rate) is measured on it.

    python -m training.data.train_tokenizer --corpus run/dedup --out run/tokenizer --vocab-size 64000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import xxhash
from tqdm import tqdm

from rodin.tokenizer import Tokenizer, train_tokenizer

_WORDS = re.compile(r"\w+(?:['’]\w+)*")


def iter_corpus(corpus_dir: Path):
    """(source, id, text) of every document in the NNNNN.jsonl.gz files of a folder."""
    for path in sorted(Path(corpus_dir).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row.get("metadata", {}).get("source", "unknown"), row.get("id", ""), row["text"]


def _unit(doc_id: str, seed: int) -> float:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "replace"), seed=seed) / 2**64


def water_fill(sizes: dict[str, int], weights: dict[str, float], total: float) -> dict[str, float]:
    """Share `total` bytes between sources by weight; sources smaller than their share give all
    they have and the remainder is shared among the others."""
    share, active, left = {}, {s for s in sizes if weights.get(s, 1.0) > 0}, float(total)
    while active:
        wsum = sum(weights.get(s, 1.0) for s in active)
        fair = {s: left * weights.get(s, 1.0) / wsum for s in active}
        small = {s for s in active if sizes[s] <= fair[s]}
        if not small:
            share.update(fair)
            break
        for s in small:
            share[s] = sizes[s]
            left -= sizes[s]
        active -= small
    return share


def fertility(tok: Tokenizer, texts_by_source: dict[str, list[str]]) -> dict:
    """Tokens per word, bytes per token, byte-fallback and unknown rates per source and overall."""
    def measure(texts):
        words = sum(len(_WORDS.findall(t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        ids = [i for seq in tok.encode_batch(texts) for i in seq] if texts else []
        byte_pieces = sum(tok.sp.IsByte(i) for i in ids)
        unk = sum(i == tok.unk_id for i in ids)
        n = max(len(ids), 1)
        return {"docs": len(texts), "words": words, "bytes": n_bytes, "tokens": len(ids),
                "tokens_per_word": len(ids) / max(words, 1), "bytes_per_token": n_bytes / n,
                "byte_fallback_rate": byte_pieces / n, "unk_rate": unk / n}

    report = {"per_source": {s: measure(t) for s, t in sorted(texts_by_source.items())}}
    report["overall"] = measure([t for ts in texts_by_source.values() for t in ts])
    report["vocab_size"] = tok.vocab_size
    report["tokenizer_sha256"] = tok.sha256
    return report


def format_fertility(report: dict) -> str:
    rows = ["| source | docs | tokens/word | bytes/token | byte-fallback | unk |", "|---|---|---|---|---|---|"]
    for name, r in list(report["per_source"].items()) + [("**all**", report["overall"])]:
        rows.append(f"| {name} | {r['docs']} | {r['tokens_per_word']:.3f} | {r['bytes_per_token']:.3f} | "
                    f"{r['byte_fallback_rate']:.5f} | {r['unk_rate']:.5f} |")
    return "\n".join(rows)


def train_on_corpus(corpus_dir: Path, out_dir: Path, vocab_size: int, sample_mb: float = 1000.0,
                    weights: dict[str, float] | None = None, heldout_fraction: float = 0.02,
                    heldout_max_mb: float = 20.0, seed: int = 1234, num_threads: int | None = None) -> dict:
    """Train `out_dir/tokenizer.model` on a stratified sample and write `out_dir/fertility.json`."""
    weights = weights or {}
    sizes: dict[str, int] = defaultdict(int)
    for src, doc_id, text in tqdm(iter_corpus(corpus_dir), desc="tokenizer sample: sizes", unit="doc"):
        if _unit(doc_id, seed) >= heldout_fraction:
            sizes[src] += len(text.encode("utf-8"))
    if not sizes:
        raise ValueError(f"no documents in {corpus_dir}: nothing to train a tokenizer on")
    share = water_fill(dict(sizes), weights, sample_mb * 1e6)
    prob = {s: min(1.0, share.get(s, 0) / sizes[s]) if sizes[s] else 0.0 for s in sizes}
    sample: list[str] = []
    picked: dict[str, int] = defaultdict(int)
    heldout: dict[str, list[str]] = defaultdict(list)
    heldout_bytes = 0
    for src, doc_id, text in tqdm(iter_corpus(corpus_dir), desc="tokenizer sample: texts", unit="doc"):
        u = _unit(doc_id, seed)
        if u < heldout_fraction:
            if heldout_bytes < heldout_max_mb * 1e6:
                heldout[src].append(text)
                heldout_bytes += len(text.encode("utf-8"))
        elif _unit(doc_id, seed + 1) < prob.get(src, 0.0):
            sample.append(text)
            picked[src] += len(text.encode("utf-8"))
    n_chars = sum(map(len, sample))
    print(f"training a {vocab_size}-token tokenizer on {len(sample):,} documents ({n_chars / 1e6:.1f} M chars)")
    path = train_tokenizer(sample, out_dir, vocab_size=vocab_size, num_threads=num_threads,
                           input_sentence_size=max(1_000_000, n_chars // 1000))
    tok = Tokenizer(path)
    if heldout:
        report = fertility(tok, heldout)
        report["measured_on"] = "held-out documents (never in the training sample)"
    else:  # corpus too small to hold documents out: say so rather than report nothing
        by_source: dict[str, list[str]] = defaultdict(list)
        for src, doc_id, text in iter_corpus(corpus_dir):
            by_source[src].append(text)
        report = fertility(tok, by_source)
        report["measured_on"] = "the training corpus (too small for a held-out set): optimistic figures"
    report["sample_bytes_per_source"] = dict(picked)
    report["heldout_fraction"] = heldout_fraction
    tmp = Path(out_dir) / ".fertility.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, Path(out_dir) / "fertility.json")
    print(format_fertility(report))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Train the RODIN SentencePiece tokenizer on a stratified sample of a cleaned corpus, "
                    "and report its fertility on held-out documents.",
        epilog="example: python -m training.data.train_tokenizer --corpus run/dedup --out run/tokenizer "
               "--vocab-size 64000 --sample-mb 2000 --quota legifrance=0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="folder of NNNNN.jsonl.gz documents (cleaned, deduplicated)")
    ap.add_argument("--out", required=True, help="output folder (tokenizer.model, fertility.json)")
    ap.add_argument("--vocab-size", type=int, default=64000, help="vocabulary size (RODIN-1B: 64000)")
    ap.add_argument("--sample-mb", type=float, default=1000.0, help="training sample size in MB of text")
    ap.add_argument("--quota", action="append", default=[], help="SOURCE=WEIGHT sampling weight (default 1 each)")
    ap.add_argument("--heldout-fraction", type=float, default=0.02, help="share of documents held out for fertility")
    ap.add_argument("--seed", type=int, default=1234, help="sampling seed")
    args = ap.parse_args(argv)
    weights = {k: float(v) for k, v in (q.split("=", 1) for q in args.quota)}
    train_on_corpus(Path(args.corpus), Path(args.out), args.vocab_size, args.sample_mb, weights,
                    args.heldout_fraction, seed=args.seed)


if __name__ == "__main__":
    main()
