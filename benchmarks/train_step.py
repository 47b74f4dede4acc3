"""Training throughput on CPU: our trainer's step against `transformers.LlamaForCausalLM`.

Same shape (rodin-tiny by default: dim 256, 6 layers, FFN 683, vocab 8000), same batch,
same AdamW (foreach, betas 0.9/0.95, wd 0.1 on 2-D+ tensors), same grad clipping, same
initial weights, measured in the same process, interleaved round by round so both see the
same machine load (the median round is reported).

Ours is what `python -m training.pretrain` runs on CPU with `system.dtype = auto`:
`rodin.model.Transformer` with its memory-lean chunked cross-entropy, fp32 master weights
and bf16 autocast when the CPU has native bf16 matmuls (AVX512-BF16/AMX), else fp32;
optionally `torch.compile` (`--compile block`). HF runs as users run it by default
(fp32, SDPA attention, eager); `--hf-dtype bfloat16` gives it the same autocast for a
like-for-like precision comparison, and `--dtype float32` pins ours to fp32.

    python -m benchmarks.train_step                      # prints tokens/s of both and the ratio
    python -m benchmarks.train_step --compile off --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from rodin.config import ModelConfig
from rodin.model import Transformer
from training.trainer import _param_groups, apply_compile, resolve_dtype


def make_hf(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rodin.checkpoint import to_hf_config

    hf_cfg = to_hf_config(cfg, torch_dtype="float32")
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type"), hf_cfg.pop("torch_dtype")
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    return model


def adamw(model, lr=3e-4):
    return torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


AUTOCAST = {"ours": torch.float32, "hf": torch.float32}


def ours_step(model, opt, x, y):
    with torch.autocast("cpu", dtype=AUTOCAST["ours"], enabled=AUTOCAST["ours"] != torch.float32):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, opt, x, y):
    with torch.autocast("cpu", dtype=AUTOCAST["hf"], enabled=AUTOCAST["hf"] != torch.float32):
        loss = model(input_ids=x, labels=y).loss  # HF shifts labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rodin-tiny", help="model shape (a rodin.config preset)")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0 = preset)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--compile", default="off", choices=["off", "block", "model"], help="our torch.compile mode")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="our compute dtype (system.dtype; auto = what the trainer picks on this CPU)")
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="HF autocast dtype (float32 = HF's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    AUTOCAST["ours"] = resolve_dtype(args.dtype, torch.device("cpu"))
    AUTOCAST["hf"] = getattr(torch, args.hf_dtype)
    cfg = ModelConfig.from_name(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf = make_hf(cfg)
    from rodin.checkpoint import to_hf_name

    with torch.no_grad():  # identical weights: the loss curves must agree
        hf_params = dict(hf.named_parameters())
        for k, v in ours.state_dict().items():
            if k in hf_params or to_hf_name(k) in hf_params:
                hf_params[to_hf_name(k)].copy_(v)
    apply_compile(ours, args.compile)
    opt_o, opt_h = adamw(ours), adamw(hf)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(4, cfg.vocab_size, (args.steps * args.rounds + 4, args.batch, args.seq_len + 1), generator=g)
    print(f"shape {cfg.name} ({cfg.num_parameters() / 1e6:.1f}M params, {cfg.n_layers} layers), batch {args.batch} x "
          f"{args.seq_len}, {torch.get_num_threads()} threads | ours: {AUTOCAST['ours']}, compile {args.compile} | "
          f"hf: {AUTOCAST['hf']}")
    t0 = time.perf_counter()
    for i in range(2):  # warm-up (compilation)
        lo = ours_step(ours, opt_o, data[i, :, :-1], data[i, :, 1:])
        lh = hf_step(hf, opt_h, data[i, :, :-1], data[i, :, :-1])
        print(f"warm-up step {i}: loss ours {lo:.5f} hf {lh:.5f}")
    print(f"warm-up {time.perf_counter() - t0:.1f} s")
    tok = args.batch * args.seq_len
    rates = {"ours": [], "hf": []}
    k = 2
    for r in range(args.rounds):
        for name, step, model, opt in (("ours", ours_step, ours, opt_o), ("hf", hf_step, hf, opt_h)):
            t = time.perf_counter()
            for s in range(args.steps):
                x = data[k + s]
                step(model, opt, x[:, :-1], x[:, 1:] if name == "ours" else x[:, :-1])
            rates[name].append(args.steps * tok / (time.perf_counter() - t))
        k += args.steps
        print(f"round {r}: ours {rates['ours'][-1]:,.0f} tok/s, hf {rates['hf'][-1]:,.0f} tok/s")
    o, h = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    print(f"\ntraining tokens/s (median of {args.rounds} rounds): rodin {o:,.0f} | transformers LlamaForCausalLM "
          f"{h:,.0f} | ratio {o / h:.2f}x (target >= 1.3x)")
    print(f"ours: {AUTOCAST['ours']}, compile {args.compile}; hf: {AUTOCAST['hf']}")


if __name__ == "__main__":
    main()
