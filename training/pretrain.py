"""Pretraining: `python -m training.pretrain --recipe rodin-1b-b200 --data.path data/tokens`.

Reads the token shards of `training.data` (flat uint16/uint32 `train.bin` / `val.bin`,
documents separated by EOS), trains a fresh model of a `rodin.config` preset with the
shared `training.trainer.Trainer`, and writes `<out_dir>/final` as a rodin model directory.
The same command runs single-process or under `torchrun` (1..N GPUs, N nodes), and
relaunching it resumes from the newest complete checkpoint. See docs/pretrain.md.

Exit codes: 0 done; 75 stopped on SIGTERM/SIGINT after a checkpoint (relaunch to resume);
1 error; 2 bad configuration or data.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rodin.config import ModelConfig
from training.config import PretrainConfig, build_parser, parse_config, to_dict
from training.distributed import DistInfo, destroy, init_distributed
from training.trainer import EXIT_PREEMPTED, Trainer

EOS_ID = 3

EPILOG = f"""examples:
  # laptop / CI smoke run (rodin-debug model, a few minutes of CPU)
  python -m training.pretrain --recipe tiny-cpu --data.path data/tokens --out_dir runs/tiny
  # the released RODIN-1B run on one GPU; relaunch the same command to resume
  python -m training.pretrain --recipe rodin-1b-h100 --data.path data/tokens --out_dir runs/rodin-1b
  # 8 GPUs (FSDP2), one node
  torchrun --standalone --nproc-per-node 8 -m training.pretrain --recipe rodin-1b-8xh100 \\
      --data.path data/tokens --out_dir runs/rodin-1b
  # any setting: --set section.field=value or --section.field value
  python -m training.pretrain --recipe tiny-cpu --set optim.lr=1e-3 --train.max_steps 200

exit codes: 0 finished; {EXIT_PREEMPTED} stopped by SIGTERM/SIGINT after writing a checkpoint (relaunch to
resume); 1 error; 2 bad configuration or data."""


def open_tokens(path: Path) -> np.memmap:
    """Memory-map a flat token file; dtype from a sibling meta.json ("dtype") or uint16."""
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found; prepare the data first (see docs/pretrain.md)")
    dtype = "uint16"
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            dtype = json.loads(meta.read_text()).get("dtype", dtype)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta} is not valid JSON: {e}") from e
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{meta}: dtype {dtype!r} is not supported (uint16 or uint32)")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path}: {size} bytes is not a multiple of {itemsize} ({dtype}); the file is truncated "
                         f"or meta.json gives the wrong dtype")
    if size == 0:
        raise ValueError(f"{path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows:
    """Deterministic, rank-disjoint windows of seq_len + 1 tokens from a token file.

    Window w covers tokens [w * seq_len, w * seq_len + seq_len] (inputs and shifted targets),
    so every token is a target once per epoch. The global sample i (counted over all ranks)
    reads window perm_e[i mod n], with perm_e a permutation seeded by (seed, epoch e).
    Step s uses global samples [s * G, (s + 1) * G); micro-batch m of rank r takes the
    slice starting at s * G + (m * world + r) * B. The whole state is one integer.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dist: DistInfo, seed: int, vocab_size: int, val_max_batches: int):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"data directory {self.dir} not found; it must hold train.bin (and val.bin)")
        self.train = open_tokens(self.dir / "train.bin")
        self.val = open_tokens(self.dir / "val.bin") if (self.dir / "val.bin").is_file() else None
        self.seq_len, self.B, self.G = seq_len, micro_batch_size, global_batch_size
        self.rank, self.world = dist.rank, dist.world_size
        self.accum = global_batch_size // (micro_batch_size * dist.world_size)
        self.seed, self.vocab_size, self.val_max_batches = seed, vocab_size, val_max_batches
        self.n_windows = (len(self.train) - 1) // seq_len
        if self.n_windows < global_batch_size:
            raise ValueError(f"{self.dir / 'train.bin'} holds {len(self.train):,} tokens: {self.n_windows} windows of "
                             f"{seq_len} tokens, fewer than one global batch ({global_batch_size})")
        self.pos = 0  # first global sample of the current step
        self.micro = 0  # micro-batches of this step already read
        self._epoch, self._perm = -1, None

    def _window_ids(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for j, i in enumerate(range(start, start + n)):
            epoch, k = divmod(i, self.n_windows)
            if epoch != self._epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm, self._epoch = rng.permutation(self.n_windows), epoch
            out[j] = self._perm[k]
        return out

    def _read(self, tokens: np.memmap, windows: np.ndarray, name: str) -> dict[str, torch.Tensor]:
        t = self.seq_len
        rows = np.stack([np.asarray(tokens[w * t: w * t + t + 1], dtype=np.int64) for w in windows])
        top = int(rows.max())
        if top >= self.vocab_size:
            raise ValueError(f"{self.dir / name}: token id {top} >= the model's vocabulary ({self.vocab_size}); "
                             f"the shards were made with another tokenizer than the model's")
        x = torch.from_numpy(rows)
        return {"idx": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.pos + (self.micro * self.world + self.rank) * self.B
        batch = self._read(self.train, self._window_ids(start, self.B), "train.bin")
        self.micro += 1
        if self.micro == self.accum:
            self.pos, self.micro = self.pos + self.G, 0
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos, "micro": self.micro, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "global_batch_size": self.G}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seq_len", self.seq_len), ("n_windows", self.n_windows), ("seed", self.seed),
                          ("global_batch_size", self.G)):
            if state.get(key, mine) != mine:
                raise ValueError(f"cannot resume: the checkpoint's data {key} is {state[key]}, this run's is {mine} "
                                 f"(the data or the recipe changed). Use a new --out_dir, or restore them")
        self.pos, self.micro = int(state["pos"]), int(state["micro"])

    def val_batches(self):
        if self.val is None:
            return
        n_val = (len(self.val) - 1) // self.seq_len
        per_rank = min(self.val_max_batches // self.world, n_val // (self.B * self.world))
        for k in range(per_rank):
            first = (k * self.world + self.rank) * self.B
            yield self._read(self.val, np.arange(first, first + self.B), "val.bin")


def _data_meta(data_dir: Path) -> dict:
    meta = data_dir / "meta.json"
    try:
        return json.loads(meta.read_text()) if meta.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta} is not valid JSON: {e}") from e


def resolve_model_config(cfg: PretrainConfig) -> tuple[ModelConfig, Path | None]:
    """The preset, with vocab_size taken from the tokenizer (or the shards' meta.json) when they differ.

    Tokenizer: `tokenizer` if set, else `<data>/tokenizer.model`, else the one meta.json names.
    """
    model_cfg = ModelConfig.from_name(cfg.model)
    data_dir = Path(cfg.data.path)
    meta = _data_meta(data_dir)
    candidates = [Path(cfg.tokenizer)] if cfg.tokenizer else [
        data_dir / "tokenizer.model", Path(str((meta.get("blend_config") or {}).get("tokenizer", "")) or "/nonexistent")]
    tok_path = None
    for c in candidates:
        c = c / "tokenizer.model" if c.is_dir() else c
        if c.is_file():
            tok_path = c
            break
    if tok_path is None and cfg.tokenizer:
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer} not found")
    vocab = meta.get("vocab_size")
    if tok_path is not None:
        from rodin.tokenizer import Tokenizer

        tok = Tokenizer(tok_path)
        want = meta.get("tokenizer_sha256")
        if want and tok.sha256 != want:
            raise ValueError(f"tokenizer {tok_path} is not the one the shards in {data_dir} were made with "
                             f"(sha256 {tok.sha256[:12]}... vs {want[:12]}... in meta.json); pass --tokenizer")
        vocab = tok.vocab_size
    if vocab and vocab != model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=int(vocab))
    return model_cfg, tok_path


def run(cfg: PretrainConfig) -> int:
    dist = init_distributed(cfg.system)
    try:
        model_cfg, tok = resolve_model_config(cfg)
        seq_len = cfg.train.seq_len or model_cfg.context_length
        if seq_len > model_cfg.context_length:
            raise ValueError(f"train.seq_len {seq_len} exceeds the context length of {cfg.model} "
                             f"({model_cfg.context_length})")
        data = TokenWindows(cfg.data.path, seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size, dist,
                            cfg.seed, model_cfg.vocab_size, cfg.eval.max_batches)

        def build_model(device: torch.device):
            from rodin.model import Transformer

            with torch.device(device):  # initialise where it trains (a 1B init on CPU takes a while)
                return Transformer(model_cfg)

        trainer = Trainer(cfg, build_model, data, dist, model_cfg, tokenizer=tok,
                          metadata={"recipe_model": cfg.model, "data": str(cfg.data.path)})
        return trainer.fit()
    finally:
        destroy(dist)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PretrainConfig, __doc__.split("\n\n")[0], EPILOG)
    cfg, args = parse_config(PretrainConfig, argv, parser=parser)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    try:
        return run(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
