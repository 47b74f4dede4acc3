"""Tokenization into token shards in the upstream RODIN format.

Each task writes, per source, `{rank:05d}.{source}.bin`: a flat stream of token ids
(uint16, or uint32 when the vocabulary exceeds 65,535), every document followed by EOS (id 3),
`{rank:05d}.{source}.idx.npy`: int64 end offset (exclusive, EOS included) of each document,
and `{rank:05d}.meta.json` (written last: the task's shards are complete once it exists).
Files are written under temporary names and renamed when complete.

    python -m training.data.tokenize --input run/dedup --tokenizer run/tokenizer.model --out run/tokens
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from rodin.tokenizer import EOS_ID

FORMAT = "rodin-tokens-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits; uint32 when the vocabulary exceeds 65,535 entries."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def safe_source_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


class _ShardFile:
    """One (task, source) shard being written: .bin.tmp appended in chunks, index kept in memory."""

    def __init__(self, folder: Path, stem: str, dtype: np.dtype):
        self.bin = folder / f"{stem}.bin"
        self.idx = folder / f"{stem}.idx.npy"
        self.tmp = folder / f".{stem}.bin.tmp"
        self.f = open(self.tmp, "wb")
        self.dtype = dtype
        self.ends: list[int] = []
        self.n_tokens = 0
        self.n_bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.f.write(arr.tobytes())
        self.n_tokens += len(arr)
        self.n_bytes += n_bytes
        self.ends.append(self.n_tokens)

    def close(self) -> None:
        self.f.close()
        tmp_idx = self.idx.with_name(f".{self.idx.name}.tmp.npy")
        np.save(tmp_idx, np.asarray(self.ends, dtype=np.int64))
        os.replace(tmp_idx, self.idx)
        os.replace(self.tmp, self.bin)


class TokenShardWriter(PipelineStep):
    """datatrove step: encodes documents with a rodin tokenizer (EOS appended) into per-source shards."""

    name = "🔤 token shards"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer_path: str, output_folder: str, batch_size: int = 256, num_threads: int = 1):
        super().__init__()
        self.tokenizer_path = str(tokenizer_path)
        self.output_folder = str(output_folder)
        self.batch_size = batch_size
        self.num_threads = num_threads

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from rodin.tokenizer import Tokenizer

        tok = Tokenizer(self.tokenizer_path)
        dtype = token_dtype(tok.vocab_size)
        folder = Path(self.output_folder)
        folder.mkdir(parents=True, exist_ok=True)
        shards: dict[str, _ShardFile] = {}
        docs_per_source: dict[str, int] = defaultdict(int)

        def flush(batch):
            with self.track_time("batch"):
                ids = tok.encode_batch([d.text for d in batch], eos=True, num_threads=self.num_threads)
            for doc, doc_ids in zip(batch, ids):
                src = safe_source_name(doc.metadata.get("source", "unknown"))
                if src not in shards:
                    shards[src] = _ShardFile(folder, f"{rank:05d}.{src}", dtype)
                shards[src].add(doc_ids, len(doc.text.encode("utf-8", "replace")))
                docs_per_source[src] += 1
                self.stat_update(f"tokens/{src}/docs")
                self.stat_update(f"tokens/{src}/tokens", value=len(doc_ids))

        batch = []
        for doc in data:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        for s in shards.values():
            s.close()
        meta = {
            "format": FORMAT, "rank": rank, "dtype": dtype.name, "eos_id": EOS_ID, "vocab_size": tok.vocab_size,
            "tokenizer_sha256": tok.sha256,
            "shards": {src: {"bin": s.bin.name, "idx": s.idx.name, "docs": docs_per_source[src],
                             "tokens": s.n_tokens, "bytes": s.n_bytes} for src, s in shards.items()},
        }
        tmp = folder / f".{rank:05d}.meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / f"{rank:05d}.meta.json")
        return
        yield


def read_token_metas(folder: Path) -> list[dict]:
    """The per-task metadata of a token folder (one per finished task)."""
    metas = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("[0-9]*.meta.json"))]
    if not metas:
        raise FileNotFoundError(f"no NNNNN.meta.json in {folder}: run the tokenization stage first")
    shas = {m["tokenizer_sha256"] for m in metas}
    if len(shas) > 1:
        raise ValueError(f"{folder} mixes shards of {len(shas)} different tokenizers; delete it and re-tokenize")
    return metas


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Tokenize cleaned/deduplicated NNNNN.jsonl.gz files into per-source token shards.",
        epilog="example: python -m training.data.tokenize --input run/dedup --tokenizer run/tokenizer.model "
               "--out run/tokens --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder of NNNNN.jsonl.gz documents")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model (or its directory)")
    ap.add_argument("--out", required=True, help="output folder for the shards")
    ap.add_argument("--tasks", type=int, default=None, help="tasks (default: one per input file)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    args = ap.parse_args(argv)
    from training.data.prepare import run_tokenize

    run_tokenize(Path(args.input), Path(args.tokenizer), Path(args.out), args.tasks, args.workers)


if __name__ == "__main__":
    main()
