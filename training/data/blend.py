"""Blend per-source token shards into `train.bin` / `val.bin` by per-source token budgets.

Validation documents are drawn first from every source (a fraction of its tokens, whole
documents), then each source contributes whole documents to train up to its budget: a
subset when the budget is below what the source holds, repeated epochs when it is above
(`--no-repeat` caps it instead). The selected documents are shuffled together (seeded) and
copied into the output files, which keep the shard format: flat ids, each document followed
by EOS, plus `{split}.idx.npy` (document end offsets) and `meta.json`.

    python -m training.data.blend --tokens run/tokens --out run/final \\
        --budget wikipedia=2e9 --budget hplt=12e9 --val-fraction 0.005
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.data.tokenize import FORMAT, read_token_metas


@dataclass
class SourceDocs:
    name: str
    shard: np.ndarray   # (N,) index into the shard path list
    start: np.ndarray   # (N,) token offsets in that shard
    end: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start


def collect_documents(token_dir: Path) -> tuple[list[Path], dict[str, SourceDocs], dict]:
    metas = read_token_metas(token_dir)
    paths: list[Path] = []
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for m in metas:
        for src, s in m["shards"].items():
            ends = np.load(token_dir / s["idx"])
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            sid = len(paths)
            paths.append(token_dir / s["bin"])
            parts.setdefault(src, []).append((np.full(len(ends), sid, np.int64), starts, ends.astype(np.int64)))
    docs = {src: SourceDocs(src, *(np.concatenate(x) for x in zip(*p))) for src, p in sorted(parts.items())}
    info = {k: metas[0][k] for k in ("dtype", "eos_id", "vocab_size", "tokenizer_sha256")}
    return paths, docs, info


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])


def plan_blend(docs: dict[str, SourceDocs], budgets: dict[str, float], val_fraction: float,
               allow_repeat: bool = True, seed: int = 1234) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Per source: (train doc indices, val doc indices) and a summary. Budgets are train tokens;
    a missing source budget means "all its tokens once"; budget 0 excludes the source."""
    unknown = set(budgets) - set(docs)
    if unknown:
        raise ValueError(f"budget for unknown source(s) {sorted(unknown)}; sources present: {sorted(docs)}")
    train, val, summary = {}, {}, {}
    for name, d in docs.items():
        n = len(d.start)
        lengths = d.lengths
        perm = _rng(seed, name).permutation(n)
        total = int(lengths.sum())
        # validation: whole documents until val_fraction of the source's tokens (at least one doc if n > 1)
        n_val = 0
        if val_fraction > 0 and n > 1:
            cum = np.cumsum(lengths[perm])
            n_val = max(1, int(np.searchsorted(cum, val_fraction * total)))
            n_val = min(n_val, n - 1)
        val[name] = perm[:n_val]
        pool = perm[n_val:]
        available = int(lengths[pool].sum())
        budget = budgets.get(name)
        budget = available if budget is None else int(budget)
        chosen = []
        if budget > 0 and available > 0:
            epochs = budget // available if allow_repeat else 0
            chosen = [pool] * int(epochs)
            rest = budget - epochs * available if allow_repeat else min(budget, available)
            if rest > 0:
                order = _rng(seed + 1, name).permutation(pool) if epochs else pool
                cum = np.cumsum(lengths[order])
                k = int(np.searchsorted(cum, rest)) + 1
                chosen.append(order[: min(k, len(order))])
        train[name] = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        taken = int(lengths[train[name]].sum())
        summary[name] = {"docs_available": n, "tokens_available": total, "budget": budget,
                         "train_docs": len(train[name]), "train_tokens": taken,
                         "val_docs": int(n_val), "val_tokens": int(lengths[val[name]].sum()),
                         "repeats": round(taken / available, 3) if available else 0.0}
    return train, val, summary


def write_split(out: Path, split: str, paths: list[Path], docs: dict[str, SourceDocs],
                selection: dict[str, np.ndarray], dtype: str, seed: int, shuffle: bool = True) -> dict:
    """Copy the selected documents (shuffled across sources) into `{split}.bin` + `{split}.idx.npy`."""
    src_names = sorted(selection)
    shard = np.concatenate([docs[s].shard[selection[s]] for s in src_names] or [np.zeros(0, np.int64)])
    start = np.concatenate([docs[s].start[selection[s]] for s in src_names] or [np.zeros(0, np.int64)])
    end = np.concatenate([docs[s].end[selection[s]] for s in src_names] or [np.zeros(0, np.int64)])
    order = _rng(seed, f"shuffle-{split}").permutation(len(shard)) if shuffle else np.arange(len(shard))
    maps = [np.memmap(p, dtype=dtype, mode="r") for p in paths]
    tmp = out / f".{split}.bin.tmp"
    ends = np.cumsum((end - start)[order])
    with open(tmp, "wb") as f, tqdm(total=int(ends[-1]) if len(ends) else 0, unit="tok", unit_scale=True,
                                    desc=f"blend {split}") as bar:
        buf, size = [], 0
        for i in order:
            piece = maps[shard[i]][start[i]:end[i]]
            buf.append(piece)
            size += len(piece)
            if size >= 1 << 22:
                f.write(np.concatenate(buf).tobytes())
                bar.update(size)
                buf, size = [], 0
        if buf:
            f.write(np.concatenate(buf).tobytes())
            bar.update(size)
    idx_tmp = out / f".{split}.idx.tmp.npy"
    np.save(idx_tmp, ends.astype(np.int64))
    os.replace(idx_tmp, out / f"{split}.idx.npy")
    os.replace(tmp, out / f"{split}.bin")
    return {"file": f"{split}.bin", "index": f"{split}.idx.npy", "docs": int(len(order)),
            "tokens": int(ends[-1]) if len(ends) else 0}


def blend(token_dir: Path, out: Path, budgets: dict[str, float] | None = None, val_fraction: float = 0.005,
          allow_repeat: bool = True, seed: int = 1234, sources_info: dict | None = None) -> dict:
    """Build train/val from a token folder; returns (and writes) the output meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    paths, docs, info = collect_documents(token_dir)
    train, val, summary = plan_blend(docs, budgets or {}, val_fraction, allow_repeat, seed)
    meta = {"format": FORMAT, **info, "bos_id": 2, "seed": seed, "val_fraction": val_fraction,
            "layout": "flat token ids; every document is followed by eos_id; {split}.idx.npy holds "
                      "int64 exclusive end offsets of the documents",
            "splits": {}, "sources": summary}
    if sources_info:
        meta["source_specs"] = sources_info
    meta["splits"]["train"] = write_split(out, "train", paths, docs, train, info["dtype"], seed)
    meta["splits"]["val"] = write_split(out, "val", paths, docs, val, info["dtype"], seed)
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "meta.json")  # last: its presence means the blend is complete
    return meta


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--budget {item!r}: expected SOURCE=TOKENS (e.g. wikipedia=2e9)")
        k, v = item.split("=", 1)
        budgets[k.strip()] = float(v)
    return budgets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Blend per-source token shards into train.bin/val.bin by per-source token budgets.",
        epilog="example: python -m training.data.blend --tokens run/tokens --out data/fr "
               "--budget wikipedia=2e9 --budget hplt=12e9 --val-fraction 0.005",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True, help="token shard folder (output of training.data.tokenize)")
    ap.add_argument("--out", required=True, help="output folder for train.bin, val.bin, *.idx.npy, meta.json")
    ap.add_argument("--budget", action="append", default=[],
                    help="SOURCE=TOKENS train tokens from a source (repeatable); default: all tokens once")
    ap.add_argument("--val-fraction", type=float, default=0.005, help="share of each source's tokens held out")
    ap.add_argument("--no-repeat", action="store_true", help="cap budgets at what a source holds (no repeated epochs)")
    ap.add_argument("--seed", type=int, default=1234, help="sampling and shuffling seed")
    args = ap.parse_args(argv)
    meta = blend(Path(args.tokens), Path(args.out), parse_budgets(args.budget), args.val_fraction,
                 not args.no_repeat, args.seed)
    for name, s in meta["splits"].items():
        print(f"{name}: {s['docs']:,} documents, {s['tokens']:,} tokens -> {Path(args.out) / s['file']}")


if __name__ == "__main__":
    main()
