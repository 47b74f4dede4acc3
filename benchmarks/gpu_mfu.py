"""Training tokens/s and MFU of the rodin-1b shape at context 2048 on the GPU it finds (< 5 minutes).

Runs the trainer's own step (`training.trainer.Trainer`: bf16 autocast, fp32 master weights,
fused AdamW, grad clipping, the chunked 64K-vocabulary loss, torch.compile) on random tokens,
one configuration per subprocess (a clean GPU each time):

    recipe        the recipe's settings for this GPU (rodin-1b-b200 on a B200, else rodin-1b-h100),
                  whole optimizer steps with their gradient accumulation
    eager         no torch.compile (what compile buys)
    micro16       16 sequences per micro-batch (if memory allows), compile per block
    compile-model whole-model torch.compile instead of per block

MFU = tokens/s x ModelConfig.flops_per_token(2048) / dense bf16 peak (H100 SXM 989 TFLOP/s,
B200 2,250; table in training/trainer.py). Target: >= 55% on an H100.

    python -m benchmarks.gpu_mfu                       # all configurations, ~4-5 minutes
    python -m benchmarks.gpu_mfu --configs recipe      # the recipe only
    python -m benchmarks.gpu_mfu --device cpu --preset rodin-debug --seq-len 64   # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # in order of interest; later ones are skipped when the time budget runs out
    "recipe": {},
    "eager": {"compile": "off"},
    "micro16": {"micro_batch_size": 16},
    "compile-model": {"compile": "model"},
}


class RandomTokens:
    """A BatchSource of random token windows, pre-built in pinned memory (no data loading cost)."""

    def __init__(self, batch: int, seq_len: int, vocab: int, pinned: bool):
        import torch

        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(4):
            x = torch.randint(4, vocab, (batch, seq_len + 1), generator=g)
            x = x.pin_memory() if pinned else x
            self.batches.append({"idx": x[:, :-1], "targets": x[:, 1:]})
        self.i = 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]

    def val_batches(self):
        return iter(())


def worker(spec: dict) -> dict:
    """Build the trainer with `spec`, time `steps` optimizer steps after `warmup` ones."""
    import torch

    from rodin.config import ModelConfig
    from rodin.model import Transformer
    from training import trainer as trainer_mod
    from training.config import PretrainConfig, from_dict, read_recipe
    from training.distributed import init_distributed

    cfg = from_dict(PretrainConfig, read_recipe(spec["recipe"]), source=spec["recipe"])
    cfg.out_dir = spec["out_dir"]
    cfg.model = spec["preset"]
    cfg.system.device = spec["device"]
    cfg.system.parallel = "none"
    cfg.train.seq_len = spec["seq_len"]
    cfg.train.max_steps = 10**9
    cfg.log.tensorboard = False
    if "micro_batch_size" in spec:
        cfg.train.micro_batch_size = spec["micro_batch_size"]
        cfg.train.global_batch_size = max(cfg.train.global_batch_size, spec["micro_batch_size"])
    if "compile" in spec:
        cfg.system.compile = spec["compile"]
    if spec["device"] == "cpu":
        cfg.system.dtype = "float32"
    model_cfg = ModelConfig.from_name(spec["preset"])
    dist = init_distributed(cfg.system)
    source = RandomTokens(cfg.train.micro_batch_size, cfg.train.seq_len, model_cfg.vocab_size,
                          pinned=dist.device.type == "cuda")
    trainer_mod.check_output_dir = lambda *a, **k: None  # nothing is written: no checkpoint space needed
    def build_model(device):
        with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the CPU
            return Transformer(model_cfg)

    tr = trainer_mod.Trainer(cfg, build_model, source, dist, model_cfg)
    tr._setup()
    cuda = dist.device.type == "cuda"
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        out = tr._train_step()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = []
    for _ in range(spec["steps"]):
        out = tr._train_step()
        losses.append(out["loss"])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = spec["steps"] * tokens_per_step / dt
    peak = trainer_mod.peak_flops(dist.device)
    fpt = model_cfg.flops_per_token(cfg.train.seq_len)
    return {
        "config": spec["name"], "micro_batch": cfg.train.micro_batch_size, "accum": tr.accum,
        "compile": tr.compile_mode, "dtype": str(tr.compute_dtype), "tokens_per_s": tps,
        "mfu": tps * fpt / peak if peak else None, "s_per_step": dt / spec["steps"], "warmup_s": warm_s,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss_first_last": [losses[0], losses[-1]], "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "flops_per_token": fpt, "peak_flops": peak,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--preset", default="rodin-1b", help="model shape")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--recipe", default="", help="recipe (default: rodin-1b-b200 on a B200, else rodin-1b-h100)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, allocator)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--budget-s", type=float, default=285, help="skip configurations that would start after this")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        try:
            print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        except Exception as e:  # OOM and friends: report, do not crash the sweep
            print("RESULT " + json.dumps({"config": json.loads(args.worker)["name"],
                                          "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU found: this benchmark measures GPU training throughput (use --device cpu only to "
              "smoke-test the script)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    recipe = args.recipe or ("rodin-1b-b200" if "B200" in name else "rodin-1b-h100")
    print(f"device: {name} | shape {args.preset} | context {args.seq_len} | recipe {recipe} | torch {torch.__version__}")
    results, start = [], time.perf_counter()
    for cname in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if cname not in CONFIGS:
            p.error(f"unknown configuration {cname!r}; choose from {', '.join(CONFIGS)}")
        left = args.budget_s - (time.perf_counter() - start)
        if left < 45:
            print(f"{cname}: skipped (time budget)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"name": cname, "recipe": recipe, "preset": args.preset, "seq_len": args.seq_len,
                    "device": args.device, "warmup": args.warmup, "steps": args.steps, "out_dir": tmp,
                    **CONFIGS[cname]}
            cmd = [sys.executable, "-m", "benchmarks.gpu_mfu", "--worker", json.dumps(spec)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left),
                                      cwd=Path(__file__).resolve().parents[1],
                                      env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else {
                    "config": cname, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
            except subprocess.TimeoutExpired:
                res = {"config": cname, "error": "timed out"}
        results.append(res)
        if "error" in res:
            print(f"{cname:14s} failed: {res['error']}")
        else:
            mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
            mem = f"{res['mem_gb']:.1f} GB" if res["mem_gb"] is not None else "-"
            print(f"{cname:14s} micro {res['micro_batch']:3d} x accum {res['accum']} | compile {res['compile']:5s} | "
                  f"{res['tokens_per_s']:>10,.0f} tok/s | MFU {mfu:>6s} | {res['s_per_step']:.3f} s/step | "
                  f"peak mem {mem} | warm-up {res['warmup_s']:.0f} s | loss {res['loss_first_last'][0]:.3f}"
                  f"->{res['loss_first_last'][1]:.3f}", flush=True)
    ok = [r for r in results if "error" not in r and r.get("mfu") is not None]
    if ok:
        best = max(ok, key=lambda r: r["mfu"])
        print(f"\nbest: {best['config']} {best['tokens_per_s']:,.0f} tok/s, MFU {100 * best['mfu']:.1f}% "
              f"(target >= 55% on an H100; {best['flops_per_token'] / 1e9:.2f} GFLOP/token, "
              f"peak {best['peak_flops'] / 1e12:.0f} TFLOP/s)")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
