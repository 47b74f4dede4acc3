"""Decode speed at the rodin-1b shape on CPU: rodin against `transformers` generate.

Same random weights (bf16, as released), same prompt, same machine, same run. rodin runs
in the dtype `rodin.checkpoint.default_dtype` picks for bf16 weights on this CPU (bf16 with
native bf16 kernels, else fp32: an exact upcast), and also in the other dtype for reference;
transformers runs the bf16 weights as loaded. The memory-bandwidth bound (bytes of weights
read per token / the read bandwidth of a large fp32 matrix-vector product, the pattern of
decoding) is printed next to each figure.

    python benchmarks/decode.py                 # rodin-1b shape, 32 new tokens
    python benchmarks/decode.py --preset rodin-tiny --new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch

from rodin.checkpoint import default_dtype, to_hf_config, to_hf_name
from rodin.config import ModelConfig
from rodin.generate import generate_token_ids
from rodin.model import Transformer


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 10) -> float:
    """Read bandwidth of a large fp32 matrix-vector product (what decoding does with each weight)."""
    w = torch.randn(size_mb * 2**20 // 4 // 8192, 8192)
    x = torch.randn(8192)
    torch.mv(w, x)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mv(w, x)
    return repeats * w.numel() * 4 / (time.perf_counter() - t) / 1e9


def random_bf16_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if p.dim() == 1:
            sd[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            sd[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
    return sd


def time_rodin(sd, cfg, prompt, n_new, dtype) -> tuple[float, float]:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    model.lm_head.weight = model.tok_emb.weight
    model.eval()
    list(generate_token_ids(model, prompt, 2))  # warm-up
    t0 = time.perf_counter()
    it = generate_token_ids(model, prompt, n_new, stop_ids=())
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    t2 = time.perf_counter()
    del model
    return (n - 1) / (t2 - t1), t1 - t0


def time_transformers(sd, cfg, prompt, n_new) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**to_hf_config(cfg, torch_dtype="bfloat16"))
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({to_hf_name(k): v for k, v in sd.items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb.to_empty(device="cpu")
    hf.model.rotary_emb.__init__(hf_cfg)  # buffers computed on the CPU, not left on meta
    hf.eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return (n_new - 1) / max(1e-9, (t2 - t1) - prefill), prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rodin-1b")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-new-tokens", type=int, default=12, help="transformers is slow; fewer tokens suffice")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--skip-other-dtype", action="store_true", help="time rodin in its default dtype only")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset)
    prompt = torch.randint(4, cfg.vocab_size, (args.prompt_tokens,)).tolist()
    print(f"{cfg.name}: {cfg.num_parameters() / 1e9:.3f}B parameters, {torch.get_num_threads()} threads")
    sd = random_bf16_weights(cfg)
    bw = memory_bandwidth_gbs()
    params = cfg.num_parameters()
    rows = []
    dtype = default_dtype("cpu", torch.bfloat16)
    tps, pre = time_rodin(sd, cfg, prompt, args.new_tokens, dtype)
    rows.append((f"rodin ({str(dtype).removeprefix('torch.')}, default)", tps, pre, params * dtype.itemsize))
    if not args.skip_other_dtype:
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        tps_o, pre_o = time_rodin(sd, cfg, prompt, max(8, args.new_tokens // 2), other)
        rows.append((f"rodin ({str(other).removeprefix('torch.')})", tps_o, pre_o, params * other.itemsize))
    hf_tps, hf_pre = time_transformers(sd, cfg, prompt, args.hf_new_tokens)
    rows.append(("transformers generate (bfloat16)", hf_tps, hf_pre, params * 2))
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    print(f"{'engine':36s} {'tok/s':>8s} {'prefill s':>10s} {'bound tok/s':>12s} {'% of bound':>10s}")
    for name, t, p, nbytes in rows:
        bound = bw * 1e9 / nbytes
        print(f"{name:36s} {t:8.2f} {p:10.2f} {bound:12.2f} {100 * t / bound:9.0f}%")
    print(f"bf16 weights bound (2 bytes/param): {bw * 1e9 / (params * 2):.2f} tok/s")
    print(f"ratio rodin / transformers: {rows[0][1] / hf_tps:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
