"""Cost of document masking in packed SFT batches.

Packed SFT windows pass per-conversation RoPE positions and a block-diagonal causal
`attn_mask` (B, 1, T, T) to SDPA, which rules out the fused causal fast path. This script
times one training step (forward + backward) on the same packed batch three ways and prints
the ratios against plain causal attention (the reference), best of interleaved rounds:

    causal      packed tokens, is_causal (conversations leak into each other: NOT correct SFT)
    masked      packed tokens, positions + document mask (what training/sft.py does)
    padded      the same conversations one per row, right-padded, plain causal

    python -m benchmarks.sft_packing --preset rodin-tiny --batch 4 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from rodin.config import ModelConfig
from rodin.model import IGNORE_INDEX, Transformer
from training.sft_data import TokenizedSet, collate, pack_best_fit


def synthetic_set(n: int, seq_len: int, vocab: int, lo: int, hi: int, seed: int = 0) -> TokenizedSet:
    """Random conversations of lo..hi tokens, the second half of each trained (a reply)."""
    import numpy as np

    g = np.random.default_rng(seed)
    lengths = g.integers(lo, hi + 1, n)
    ids, labels = [], []
    for n_tok in lengths:
        x = g.integers(4, vocab, n_tok + 1).astype(np.int32)
        y = x.copy()
        y[: (n_tok + 1) // 2] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
    return TokenizedSet(np.concatenate(ids), np.concatenate(labels), offsets, [""] * n, seq_len)


def time_step(model: Transformer, batch: dict) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(batch["idx"], batch["targets"], positions=batch.get("positions"), attn_mask=batch.get("attn_mask"))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def time_variants(model: Transformer, variants: dict[str, list[dict]], steps: int) -> dict[str, dict[str, float]]:
    """Per variant (a list of micro-batches): best wall seconds, best and median CPU seconds
    over `steps` rounds. The variants are interleaved so that load from other processes hits
    them alike; on a shared machine the CPU-time median is the steadiest figure."""
    for batches in variants.values():  # warm-up
        time_step(model, batches[0])
    walls = {name: [] for name in variants}
    cpus = {name: [] for name in variants}
    for _ in range(steps):
        for name, batches in variants.items():
            runs = [time_step(model, b) for b in batches]
            walls[name].append(sum(r[0] for r in runs))
            cpus[name].append(sum(r[1] for r in runs))
    return {name: {"wall": min(walls[name]), "cpu": min(cpus[name]), "cpu_median": statistics.median(cpus[name])}
            for name in variants}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rodin-tiny", help="model preset (default: rodin-tiny)")
    p.add_argument("--batch", type=int, default=4, help="packed rows per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the preset's context)")
    p.add_argument("--min-tokens", type=int, default=40, help="shortest conversation (default: 40)")
    p.add_argument("--max-tokens", type=int, default=300, help="longest conversation (default: 300)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: PyTorch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset)
    seq_len = args.seq_len or cfg.context_length
    cfg = dataclasses.replace(cfg, context_length=max(seq_len, cfg.context_length))
    model = Transformer(cfg)

    tset = synthetic_set(400, seq_len, cfg.vocab_size, args.min_tokens, min(args.max_tokens, seq_len))
    bins = pack_best_fit(tset.lengths().tolist(), seq_len)[: args.batch]
    masked = collate(tset, bins, 0, "packed")
    causal = {k: masked[k] for k in ("idx", "targets")}
    docs = [i for b in bins for i in b]
    padded_rows = [[i] for i in docs]
    real = int(sum(tset.lengths()[i] for i in docs))
    fill = real / (len(bins) * seq_len)

    padded = [collate(tset, padded_rows[s:s + args.batch], 0, "padded") for s in range(0, len(padded_rows), args.batch)]
    t = time_variants(model, {"causal": [causal], "masked": [masked], "padded": padded}, args.steps)

    print(f"{args.preset}, {len(bins)} packed rows x {seq_len} tokens, {len(docs)} conversations of "
          f"{args.min_tokens}-{args.max_tokens} tokens, fill {fill:.1%}, {torch.get_num_threads()} threads")
    print(f"{'variant':<36}{'best wall s':>12}{'best CPU s':>11}{'median CPU s':>13}{'median vs causal':>17}")
    names = {"causal": "packed, plain causal (reference)", "masked": "packed, document mask + positions",
             "padded": "padded, one conversation per row"}
    ref = t["causal"]["cpu_median"]
    for key, name in names.items():
        r = t[key]
        print(f"{name:<36}{r['wall']:>12.2f}{r['cpu']:>11.2f}{r['cpu_median']:>13.2f}{r['cpu_median'] / ref:>16.2f}x")


if __name__ == "__main__":
    main()
