"""Supervised fine-tuning on ChatML conversations: `python -m training.sft`.

    python -m training.sft --recipe sft-tiny-cpu --model runs/tiny/final --data.train sft.jsonl

Full fine-tuning of a base model (a rodin model directory, an HF Llama directory, an upstream
`.pt` or a hub id) on JSONL conversations, with the loss on assistant replies only. It is the
pretraining `training.trainer.Trainer` with another batch source (`training.sft_data`) and
another initial model: same checkpoints, exact resume, SIGTERM preemption, NaN guard,
torchrun/FSDP2 launch, logging and validation. The result, `<out_dir>/final`, is a rodin
model directory that carries the ChatML `chat_template`, so exports and the demo treat it
as a chat model. See docs/sft.md.

Exit codes: 0 done; 75 stopped on SIGTERM/SIGINT after a checkpoint (relaunch to resume);
1 error; 2 bad configuration or data.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rodin.chat import jinja_template
from rodin.tokenizer import Tokenizer
from training.config import (CheckpointConfig, EvalConfig, OptimConfig, TrainConfig, TrainerConfig, build_parser,
                             opt, parse_config, to_dict)
from training.distributed import destroy, init_distributed
from training.sft_data import (OVERFLOW_POLICIES, PACKING_MODES, SFTBatchSource, SFTDataError, load_conversations,
                               split_validation, tokenize_conversations)
from training.trainer import EXIT_PREEMPTED, Trainer

EPILOG = f"""examples:
  # the built-in demo instruction set on CPU, from a pretrained rodin-tiny model (a few minutes)
  python -m training.sft --recipe sft-tiny-cpu --model runs/tiny/final --data.train data/demo/sft.jsonl \\
      --out_dir runs/tiny-sft
  # RODIN-1B-Instruct from the released base model on one GPU; relaunch the same command to resume
  python -m training.sft --recipe sft-rodin-1b --model rodin-llm/rodin-1b --data.train sft.jsonl \\
      --data.val sft-val.jsonl --out_dir runs/rodin-1b-sft
  # 8 GPUs (FSDP2)
  torchrun --standalone --nproc-per-node 8 -m training.sft --recipe sft-rodin-1b --model base/ \\
      --data.train sft.jsonl --train.micro_batch_size 2
  # reject the whole file on the first malformed line instead of skipping it
  python -m training.sft --recipe sft-tiny-cpu --model base/ --data.train sft.jsonl --on-error fail

data: JSONL, one conversation per line: {{"messages": [{{"role": "user", "content": ...}}, ...]}},
{{"instruction": ..., "reponse": ...}} (also "response"/"output", optional "input", "system"), or
{{"text": "<|im_start|>user\\n...<|im_end|>\\n..."}}. Malformed lines are reported as file:line.

exit codes: 0 finished; {EXIT_PREEMPTED} stopped by SIGTERM/SIGINT after writing a checkpoint (relaunch to
resume); 1 error; 2 bad configuration or data."""


@dataclass
class SFTDataConfig:
    train: str = opt("", "training JSONL file(s), comma-separated")
    val: str = opt("", "validation JSONL file(s), comma-separated; default: hold out val_fraction of train")
    val_fraction: float = opt(0.05, "share of the training conversations held out for validation when no "
                                    "val file is given (0 = no validation)")
    packing: str = opt("packed", "packed: several conversations per window, positions reset and document "
                                 "masking | padded: one conversation per row, right-padded")
    overflow: str = opt("truncate", "conversations longer than seq_len: truncate (keep the start) | drop")
    on_error: str = opt("skip", "malformed JSONL lines: skip (report file:line and go on) | fail")
    epochs: float = opt(3.0, "passes over the training rows; sets train.max_steps when it is 0")


@dataclass
class SFTConfig(TrainerConfig):
    model: str = opt("", "the model to fine-tune: rodin model directory, HF Llama directory, upstream .pt "
                         "checkpoint, or hub id (e.g. rodin-llm/rodin-1b)")
    data: SFTDataConfig = field(default_factory=SFTDataConfig, metadata={"help": "SFT conversations",
                                                                         "section": True})
    # SFT defaults differ from pretraining: a low LR, short warmup, no fixed step count.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=50, min_lr_ratio=0.1,
                                                                   weight_decay=0.0),
                               metadata={"help": "optimizer and LR schedule", "section": True})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=0, global_batch_size=32,
                                                                   micro_batch_size=8),
                               metadata={"help": "batch and length of the run (max_steps 0 = from data.epochs)",
                                         "section": True})
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=200, max_batches=50),
                             metadata={"help": "validation", "section": True})
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500),
                                         metadata={"help": "checkpoints and exports", "section": True})
    out_dir: str = opt("runs/rodin-sft", "run directory: checkpoints, logs, config.json, final model")


def _paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def build_data(cfg: SFTConfig, tokenizer: Tokenizer, seq_len: int, rank: int = 0, world_size: int = 1,
               log=print, warn=None) -> SFTBatchSource:
    """Load, validate, tokenize and lay out the conversations (same result on every rank)."""
    d = cfg.data
    if d.packing not in PACKING_MODES:
        raise ValueError(f"data.packing must be one of {', '.join(PACKING_MODES)}, not {d.packing!r}")
    if d.overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"data.overflow must be one of {', '.join(OVERFLOW_POLICIES)}, not {d.overflow!r}")
    if not _paths(d.train):
        raise ValueError("no training data: pass --data.train FILE.jsonl (comma-separate several files)")
    train, problems = load_conversations(_paths(d.train), d.on_error, report=warn)
    if _paths(d.val):
        val, val_problems = load_conversations(_paths(d.val), d.on_error, report=warn)
        problems += val_problems
    else:
        train, val = split_validation(train, d.val_fraction, cfg.seed)
    if not train:
        raise SFTDataError(f"no valid conversation in {d.train} ({len(problems)} malformed lines)", problems)
    progress = len(train) > 2000 and rank == 0
    tt = tokenize_conversations(train, tokenizer, seq_len, d.overflow, progress=progress)
    tv = tokenize_conversations(val, tokenizer, seq_len, d.overflow) if val else None
    source = SFTBatchSource(tt, tv, cfg.train.micro_batch_size, tokenizer.pad_id, d.packing, cfg.seed, rank,
                            world_size, val_max_batches=cfg.eval.max_batches)
    log(f"sft data: train {tt.stats.summary()}")
    if tv is not None:
        log(f"sft data: val {tv.stats.summary()}")
    log(f"sft data: {len(source.rows)} {d.packing} rows of {seq_len} tokens"
        + (f", {source.fill_ratio:.1%} filled" if d.packing == "packed" else "")
        + (f"; {len(problems)} malformed line(s) skipped" if problems else ""))
    return source


def run(cfg: SFTConfig) -> int:
    from rodin.checkpoint import load_model, load_state_dict

    if not cfg.model:
        raise ValueError("no model to fine-tune: pass --model PATH (a rodin or HF Llama model directory)")
    dist = init_distributed(cfg.system)
    log = print if dist.is_main else (lambda *_: None)
    warn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda *_: None)
    try:
        # Read the config and tokenizer once here; the weights are loaded in build_model.
        _, info = load_state_dict(cfg.model)
        model_cfg = info.cfg
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else info.tokenizer_path
        if tok_path is None:
            raise FileNotFoundError(f"{cfg.model} has no tokenizer.model; pass --tokenizer PATH")
        tokenizer = Tokenizer(tok_path)
        if tokenizer.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model "
                             f"{cfg.model} has a vocabulary of {model_cfg.vocab_size}")
        seq_len = cfg.train.seq_len or model_cfg.context_length
        if seq_len > model_cfg.context_length:
            raise ValueError(f"train.seq_len {seq_len} exceeds the model's context length {model_cfg.context_length}")
        if not tokenizer.has_atomic_chatml:
            log("note: the tokenizer has no atomic ChatML tokens; the markers are trained as text and generation "
                "stops on the string <|im_end|>")
        source = build_data(cfg, tokenizer, seq_len, dist.rank, dist.world_size, log, warn)
        if cfg.train.max_steps == 0:
            rows_per_step = cfg.train.global_batch_size
            cfg.train.max_steps = max(1, math.ceil(cfg.data.epochs * len(source.rows) / rows_per_step))
            log(f"sft: {cfg.data.epochs:g} epochs of {len(source.rows)} rows = {cfg.train.max_steps} steps of "
                f"{rows_per_step} rows")
        if cfg.optim.warmup_steps >= cfg.train.max_steps:
            warn(f"WARNING: optim.warmup_steps ({cfg.optim.warmup_steps}) >= train.max_steps "
                 f"({cfg.train.max_steps}): the LR never reaches its peak; lower --optim.warmup_steps")

        def build_model(device: torch.device):
            model, _ = load_model(cfg.model, device=device, dtype=torch.float32)
            return model.train()

        stats = source.train.stats
        metadata = {"stage": "sft", "base_model": str(cfg.model), "sft_data": _paths(cfg.data.train),
                    "sft_conversations": stats.kept, "sft_trained_tokens": stats.trained_tokens,
                    "packing": cfg.data.packing}
        trainer = Trainer(cfg, build_model, source, dist, model_cfg, tokenizer=tokenizer.path,
                          chat_template=jinja_template(), metadata=metadata)
        return trainer.fit()
    finally:
        destroy(dist)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(SFTConfig, __doc__.split("\n\n")[0], EPILOG)
    parser.add_argument("--on-error", dest="data.on_error", choices=["skip", "fail"], default=None,
                        help="malformed JSONL lines: skip them (reported as file:line) or fail (same as "
                             "--data.on_error)")
    cfg, args = parse_config(SFTConfig, argv, parser=parser)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    try:
        return run(cfg)
    except SFTDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
