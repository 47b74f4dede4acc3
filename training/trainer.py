"""The shared training loop: pretraining and SFT run the same `Trainer`.

Interface (stable; `training/sft.py` builds on it):

    from training.config import TrainerConfig          # sections: optim, train, eval, checkpoint,
                                                       # log, system, health, debug (+ out_dir, seed)
    from training.distributed import init_distributed  # torchrun env -> DistInfo(rank, world_size, device)
    from training.trainer import BatchSource, Trainer

    class BatchSource(Protocol):                       # one object per rank
        def next_batch(self) -> dict[str, Tensor]      # ONE micro-batch for THIS rank:
            # {"idx": (B, T) int64, "targets": (B, T) int64 (-100 = ignore),
            #  optional "positions": (B, T) int64, "attn_mask": (B, 1, T, T) bool};
            # CPU tensors; B = cfg.train.micro_batch_size. Must never repeat across ranks.
        def state_dict(self) -> dict                   # ints/str/lists/tensors only (weights_only load)
        def load_state_dict(self, state: dict) -> None # exact resume: the next batch is the same one
        def val_batches(self) -> Iterable[dict]        # finite, deterministic, this rank's share
                                                       # (may be empty: no validation)

    dist = init_distributed(cfg.system)
    trainer = Trainer(cfg, build_model=lambda device: Transformer(model_cfg).to(device),
                      train_data=source, dist=dist, model_cfg=model_cfg,
                      tokenizer=path_or_None, chat_template=None_or_jinja)
    exit_code = trainer.fit()                          # 0 done, EXIT_PREEMPTED (75) checkpointed on SIGTERM

`build_model(device)` returns an fp32 `rodin.model.Transformer` on `device` with its initial
weights (seeded fresh init for pretraining, loaded weights for SFT); it is called after the
global seed is set, on every rank, so every rank builds the same weights. The Trainer
then applies activation checkpointing, torch.compile (per block), FSDP2/DDP, the AdamW
optimizer, the LR schedule, checkpoints (resume is automatic: the newest complete
checkpoint in `cfg.out_dir/checkpoints/` is loaded before the first step), SIGTERM
handling, NaN guards, logging, validation and the final export (`out_dir/final/`, a rodin
model directory).

Loss semantics: each micro-batch's loss is the model's mean over its non-ignored tokens;
a step averages micro-batches and ranks equally (token-weighted averaging would need the
global count up front; for packed pretraining every micro-batch has the same count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import types
from pathlib import Path
from typing import Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from rodin.checkpoint import cpu_has_native_bf16
from rodin.config import ModelConfig
from training.checkpointing import CheckpointManager, verify_checkpoint
from training.config import TrainerConfig, save_config, to_dict
from training.distributed import (DistInfo, all_reduce_max, all_reduce_sum, apply_ddp, apply_fsdp, barrier,
                                  resolve_strategy)

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after writing a checkpoint; relaunch to resume
METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s (no sparsity) by GPU name substring, first match wins.
PEAK_FLOPS = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, or None (CPU, unknown GPU: MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_FLOPS if key in name), None)


@runtime_checkable
class BatchSource(Protocol):
    def next_batch(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def val_batches(self) -> Iterable[dict[str, Tensor]]: ...


class HealthError(RuntimeError):
    pass


def lr_at(step: int, optim, max_steps: int) -> float:
    """LR of the optimizer step `step` (0-based): linear warmup, then cosine/linear decay or constant."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "linear":
        return optim.lr - (optim.lr - floor) * progress
    if optim.schedule != "cosine":
        raise ValueError(f"optim.schedule must be cosine, linear or constant, not {optim.schedule!r}")
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on CUDA and on CPUs with native bf16 matmuls, else fp32."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" or cpu_has_native_bf16() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"system.dtype must be auto, bfloat16 or float32, not {dtype!r}")
    return getattr(torch, dtype)


def check_output_dir(out_dir: Path, needed_bytes: int) -> None:
    """Fail before training if out_dir cannot be written or cannot hold one checkpoint."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: output directory {out_dir} is not writable ({e.strerror or e}). "
                         f"Choose another --out_dir or fix its permissions.") from None
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes:
        raise SystemExit(f"error: {out_dir} has {free / 2**30:.2f} GiB free but one checkpoint of this run needs "
                         f"about {needed_bytes / 2**30:.2f} GiB. Free space or choose another --out_dir.")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. Patches `forward` on the instance so parameter names stay."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(self, *args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(forward, block)


def apply_compile(model: nn.Module, mode: str) -> None:
    """torch.compile in place (state-dict names unchanged): per block, or the whole model."""
    if mode == "block":
        for block in model.blocks:
            block.compile()
    elif mode == "model":
        model.compile()
    elif mode != "off":
        raise ValueError(f"system.compile must be auto, off, block or model, not {mode!r}")


class Trainer:
    """One training run: call `fit()` once. See the module docstring for the interface."""

    def __init__(self, cfg: TrainerConfig, build_model: Callable[[torch.device], nn.Module], train_data: BatchSource,
                 dist: DistInfo, model_cfg: ModelConfig, *, tokenizer: str | os.PathLike | None = None,
                 chat_template: str | None = None, metadata: dict | None = None,
                 on_step: Callable[["Trainer", dict], None] | None = None):
        self.cfg, self.build_model, self.data, self.dist = cfg, build_model, train_data, dist
        self.model_cfg, self.chat_template, self.metadata = model_cfg, chat_template, metadata or {}
        self.tokenizer = Path(tokenizer) if tokenizer else None
        if self.tokenizer is not None and self.tokenizer.is_dir():
            self.tokenizer = self.tokenizer / "tokenizer.model"
        self.on_step = on_step
        self.out_dir = Path(cfg.out_dir)
        self.device = dist.device
        self.step = 0
        self.tokens = 0
        self.health = {"ema": 0.0, "n": 0, "bad_in_row": 0, "skipped": 0, "rollbacks": 0, "rollbacks_here": 0}
        self._signal: int | None = None
        self._nan_injected = False
        self._writer = None
        self._bar = None
        t = cfg.train
        world = dist.world_size
        if t.global_batch_size % (t.micro_batch_size * world):
            raise ValueError(f"train.global_batch_size {t.global_batch_size} is not a multiple of "
                             f"micro_batch_size {t.micro_batch_size} x world size {world}")
        self.accum = t.global_batch_size // (t.micro_batch_size * world)

    # ------------------------------------------------------------------ logging
    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def _record(self, rec: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._writer is not None and "event" not in rec:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None:
                    self._writer.add_scalar(k if k.startswith("val") else f"train/{k}", v, rec["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop records of steps after `step`: a resumed run replays them."""
        path = self.out_dir / METRICS_FILE
        if not self.dist.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, sysc = self.cfg, self.cfg.system
        if sysc.num_threads:
            torch.set_num_threads(sysc.num_threads)
        if sysc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.compute_dtype = resolve_dtype(sysc.dtype, self.device)
        n_params = self.model_cfg.num_parameters()
        if self.dist.is_main:
            check_output_dir(self.out_dir, needed_bytes=int(n_params * 12 * 1.05) + (1 << 20))
        barrier(self.dist)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = self.build_model(self.device)
        self.raw_model = model
        self.strategy = resolve_strategy(sysc.parallel, self.dist)
        if sysc.activation_checkpointing:
            apply_activation_checkpointing(model)
        compile_mode = sysc.compile
        if compile_mode == "auto":
            compile_mode = "block" if self.device.type == "cuda" else "off"
        apply_compile(model, compile_mode)
        self.compile_mode = compile_mode
        # FSDP casts parameters itself (bf16 compute, fp32 master and reduce); otherwise autocast.
        self.autocast = self.compute_dtype != torch.float32 and self.strategy != "fsdp"
        if self.strategy == "fsdp":
            model = apply_fsdp(model, self.compute_dtype)
        elif self.strategy == "ddp":
            model = apply_ddp(model, self.dist)
        self.model = model
        o = cfg.optim
        groups = _param_groups(self.raw_model, o.weight_decay)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           fused=fused or None, foreach=None if fused else True)
        self.params = [p for g in groups for p in g["params"]]
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", self.dist, cfg.checkpoint.keep, log=self.log)
        self.peak = peak_flops(self.device)
        seq_len = cfg.train.seq_len or self.model_cfg.context_length
        self.flops_per_token = self.model_cfg.flops_per_token(seq_len)

    def _trainer_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
               "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].tolist(),
               "numpy_pos": int(np.random.get_state()[2])}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "tokens": self.tokens, "data": self.data.state_dict(), "rng": rng,
                "health": dict(self.health), "accum": self.accum}

    def _restore_state(self, state: dict, *, data: bool = True) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.health.update(state.get("health", {}))
        if data:
            self.data.load_state_dict(state["data"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
            np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"]))
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _meta(self) -> dict:
        return {"model_config": self.model_cfg.to_dict(), "tokens": self.tokens, "chat_template": self.chat_template,
                "metadata": self.metadata, "global_batch_size": self.cfg.train.global_batch_size,
                "run_config": to_dict(self.cfg)}

    def save_checkpoint(self, kill_during_write: bool = False) -> None:
        existing = self.out_dir / "checkpoints" / f"step_{self.step:08d}"
        if existing.is_dir() and verify_checkpoint(existing) is None:
            return  # e.g. right after a rollback to this very checkpoint
        self.health["rollbacks_here"] = 0  # progress: a new checkpoint past the last rollback
        self.ckpt.save(self.step, self.model, self.optimizer, self._trainer_state(), self._meta(),
                       tokenizer=self.tokenizer, kill_during_write=kill_during_write)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self._signal = signum
        if self.dist.is_main:
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then checkpointing and exiting "
                  f"(exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _signals(self):
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ the step
    def _no_sync(self, last: bool):
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _forward(self, batch: dict) -> Tensor:
        dev = self.device
        idx = batch["idx"].to(dev, non_blocking=True)
        targets = batch["targets"].to(dev, non_blocking=True)
        kw = {k: batch[k].to(dev, non_blocking=True) for k in ("positions", "attn_mask") if batch.get(k) is not None}
        with torch.autocast(dev.type, dtype=self.compute_dtype, enabled=self.autocast):
            return self.model(idx, targets, **kw)

    def _train_step(self) -> dict:
        self.model.train()
        losses, n_tokens = [], 0
        for m in range(self.accum):
            batch = self.data.next_batch()
            n_tokens += batch["idx"].numel()
            with self._no_sync(m == self.accum - 1):
                loss = self._forward(batch)
                if self.cfg.debug.nan_at_step == self.step + 1 and not self._nan_injected:
                    loss = loss * float("nan")
                    self._nan_injected = m == self.accum - 1  # once: a rollback replays this step number
                (loss / self.accum).backward()
            losses.append(loss.detach())
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss = torch.stack(losses).mean()
        loss_sum, grad_norm, tok = all_reduce_sum([loss.item(), grad_norm.item(), float(n_tokens)], self.dist) \
            if self.dist.enabled else [loss.item(), grad_norm.item(), float(n_tokens)]
        if self.dist.enabled:
            grad_norm /= self.dist.world_size  # identical on every rank; the sum only broadcasts it
        loss_val = loss_sum / self.dist.world_size
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        problem = self._health_problem(loss_val, grad_norm)
        if problem is None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_val, "grad_norm": grad_norm, "lr": lr, "tokens": int(tok), "problem": problem}

    def _health_problem(self, loss: float, grad_norm: float) -> str | None:
        h, hc = self.health, self.cfg.health
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        if hc.spike_factor > 0 and h["n"] >= hc.spike_warmup_steps and grad_norm > hc.spike_factor * h["ema"]:
            return f"grad norm {grad_norm:.3g} > {hc.spike_factor} x running mean {h['ema']:.3g}"
        h["ema"] = grad_norm if h["n"] == 0 else 0.99 * h["ema"] + 0.01 * grad_norm
        h["n"] += 1
        return None

    def _handle_problem(self, problem: str) -> None:
        h, policy = self.health, self.cfg.health.policy
        h["bad_in_row"] += 1
        if policy == "stop":
            raise HealthError(f"step {self.step + 1}: {problem}; stopping (health.policy = stop). "
                              f"Relaunch to resume from the last checkpoint, or use --health.policy skip")
        if h["bad_in_row"] > self.cfg.health.max_consecutive:
            raise HealthError(f"step {self.step + 1}: {problem}; {h['bad_in_row']} bad steps in a row "
                              f"(health.max_consecutive = {self.cfg.health.max_consecutive}). The run is diverging: "
                              f"lower the LR or check the data, then relaunch")
        if policy == "rollback":
            if h["rollbacks_here"] >= self.cfg.health.max_consecutive:
                raise HealthError(f"step {self.step + 1}: {problem}; already rolled back {h['rollbacks_here']} times "
                                  f"to the same checkpoint without getting past it. Lower the LR or check the data")
            found = self._rollback(problem)
            if found:
                return
            self.warn("no checkpoint to roll back to: skipping the batch instead")
        elif policy != "skip":
            raise ValueError(f"health.policy must be skip, rollback or stop, not {policy!r}")
        h["skipped"] += 1
        self.warn(f"step {self.step + 1}: {problem}; batch skipped (no update)")
        self._record({"event": "skip", "step": self.step + 1, "reason": problem})
        self.step += 1  # the schedule and the data move on; the weights do not

    def _rollback(self, problem: str) -> bool:
        bad_step = self.step + 1
        result = self.ckpt.load_latest(self.model, self.optimizer, self.warn)
        if result is None:
            return False
        state, path = result
        data_state = self.data.state_dict()  # continue past the bad data rather than replaying it
        counters = {k: self.health[k] for k in ("rollbacks", "rollbacks_here", "skipped", "bad_in_row")}
        self._restore_state(state, data=False)
        self.data.load_state_dict(data_state)
        self.health.update(counters)
        self.health["rollbacks"] += 1
        self.health["rollbacks_here"] += 1
        self.warn(f"step {bad_step}: {problem}; rolled back to {path.name} (step {self.step}), "
                  f"continuing with the next batches")
        self._record({"event": "rollback", "step": bad_step, "to_step": self.step, "reason": problem})
        return True

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        self.model.eval()
        total, count = 0.0, 0.0
        for batch in self.data.val_batches():
            n = float((batch["targets"] != -100).sum())
            total += self._forward(batch).item() * n
            count += n
        total, count = all_reduce_sum([total, count], self.dist)
        self.model.train()
        return total / count if count else None

    def _validate(self) -> None:
        t0 = time.perf_counter()
        val = self.evaluate()
        if val is None:
            return
        self.log(f"step {self.step} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f} "
                 f"({time.perf_counter() - t0:.1f} s)")
        self._record({"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Path) -> Path | None:
        """Write the current weights as a rodin model directory (collective; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from rodin.checkpoint import save_model
        from rodin.model import Transformer

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = None
        if self.dist.is_main:
            with torch.device("meta"):
                model = Transformer(self.model_cfg)
            sd = {k: v for k, v in sd.items() if not (self.model_cfg.tie_embeddings and k == "lm_head.weight")}
            model.load_state_dict(sd, strict=False, assign=True)
            if self.model_cfg.tie_embeddings:
                model.lm_head.weight = model.tok_emb.weight
            dtype = getattr(torch, self.cfg.checkpoint.export_dtype)
            md = {**self.metadata, "step": self.step, "tokens": self.tokens, "run_dir": str(self.out_dir)}
            tok = self.tokenizer if self.tokenizer is not None and self.tokenizer.is_file() else None
            path = save_model(model, out_dir, tokenizer=tok, chat_template=self.chat_template, metadata=md,
                              dtype=dtype)
            self.log(f"model written: {path}")
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ the run
    def fit(self) -> int:
        cfg = self.cfg
        self._setup()
        resumed = None
        if cfg.checkpoint.resume:
            result = self.ckpt.load_latest(self.model, self.optimizer, self.warn)
            if result is not None:
                state, resumed = result
                if state.get("accum", self.accum) != self.accum:
                    self.warn(f"gradient accumulation changed ({state['accum']} -> {self.accum}): the global batch "
                              f"is the same, but losses are no longer bitwise identical to the original run")
                self._restore_state(state)
        if self.dist.is_main:
            save_config(cfg, self.out_dir / "config.json")
            self._truncate_metrics(self.step)
            if resumed is not None:
                self._record({"event": "resume", "step": self.step, "checkpoint": str(resumed)})
            if cfg.log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)
                except ImportError:
                    self.warn("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
        n_params = self.model_cfg.num_parameters()
        self.log(f"model {self.model_cfg.name}: {n_params / 1e6:.1f}M parameters | device {self.device} | "
                 f"world {self.dist.world_size} ({self.strategy}) | dtype {self.compute_dtype} | compile "
                 f"{self.compile_mode} | global batch {cfg.train.global_batch_size} x "
                 f"{cfg.train.seq_len or self.model_cfg.context_length} tokens, accumulation {self.accum}")
        if resumed is not None:
            self.log(f"resumed from {resumed} at step {self.step} ({self.tokens:,} tokens)")
        if self.step >= cfg.train.max_steps and resumed is not None and (self.out_dir / "final").is_dir():
            self.log(f"run already complete ({self.step} steps); final model in {self.out_dir / 'final'}")
            return EXIT_OK
        exit_code = EXIT_OK
        progress = cfg.log.progress
        show_bar = self.dist.is_main and (progress == "on" or (progress == "auto" and sys.stdout.isatty()))
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        try:
            with self._signals():
                exit_code = self._loop()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer is not None:
                self._writer.close()
        if exit_code == EXIT_OK:
            if cfg.checkpoint.export_final:
                self.export(self.out_dir / "final")
            if cfg.log.plot and self.dist.is_main:
                plot_metrics(self.out_dir / METRICS_FILE, self.out_dir / "loss.png")
        return exit_code

    def _loop(self) -> int:
        cfg = self.cfg
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        last_saved = self.step
        while self.step < cfg.train.max_steps:
            out = self._train_step()
            if out["problem"] is not None:
                self._handle_problem(out["problem"])
                window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
            else:
                self.health["bad_in_row"] = 0
                self.step += 1
                self.tokens += out["tokens"]
                window_tokens += out["tokens"]
                window_steps += 1
                if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - window_t
                    tps = window_tokens / dt if dt > 0 else 0.0
                    mfu = tps * self.flops_per_token / (self.peak * self.dist.world_size) if self.peak else None
                    rec = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                           "tokens": self.tokens, "tokens_per_s": tps, "mfu": mfu,
                           "s_per_step": dt / max(1, window_steps)}
                    if self.device.type == "cuda":
                        rec["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self._record(rec)
                    self.log(f"step {self.step}/{cfg.train.max_steps} | loss {out['loss']:.4f} | lr {out['lr']:.2e} | "
                             f"gnorm {out['grad_norm']:.3f} | {tps:,.0f} tok/s"
                             + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                             + f" | {rec['s_per_step']:.2f} s/step")
                    window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
            if self._bar is not None:
                self._bar.n = self.step
                self._bar.refresh()
            if self.on_step is not None:
                self.on_step(self, out)
            aux_t = time.perf_counter()  # validation and checkpoints do not count against tokens/s
            if cfg.eval.every and self.step % cfg.eval.every == 0 and out["problem"] is None:
                self._validate()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0:
                self.export(self.out_dir / "exports" / f"step_{self.step:08d}")
            kill_in_ckpt = cfg.debug.sigkill_in_checkpoint_at_step == self.step
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or kill_in_ckpt:
                self.save_checkpoint(kill_during_write=kill_in_ckpt)
                last_saved = self.step
            window_t += time.perf_counter() - aux_t
            if cfg.debug.sigkill_at_step and self.step == cfg.debug.sigkill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.debug.sleep_per_step:
                time.sleep(cfg.debug.sleep_per_step)
            stop = all_reduce_max(1.0 if self._signal is not None else 0.0, self.dist)
            if stop:
                if last_saved != self.step:
                    self.save_checkpoint()
                self.log(f"stopped at step {self.step} on a signal; checkpoint written. Relaunch the same command "
                         f"to resume (exit code {EXIT_PREEMPTED})")
                self._record({"event": "preempted", "step": self.step})
                return EXIT_PREEMPTED
        if not cfg.eval.every or self.step % cfg.eval.every:
            self._validate()
        if last_saved != self.step:
            self.save_checkpoint()
        return EXIT_OK


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    from rodin.model import configure_optimizer_groups

    return [g for g in configure_optimizer_groups(model, weight_decay) if g["params"]]


def plot_metrics(metrics: Path, out_png: Path) -> Path | None:
    """Training and validation loss against steps (last record of each step wins)."""
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            train[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot(list(train), list(train.values()), label="train loss", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
