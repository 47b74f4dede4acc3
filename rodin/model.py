"""The RODIN model: a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, tied embeddings).

Shapes follow the released RODIN-1B exactly (see `rodin.config`). State-dict keys are the
upstream RODIN names (`tok_emb`, `blocks.{i}.attn.wq`, ...), so upstream `.pt` files load
as they are and HF Llama checkpoints go through the one key map in `rodin.checkpoint`.

This file holds no I/O, logging or parallelism: trainers wrap it from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rodin.config import ModelConfig

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics, cast back before the weight: the HF LlamaRMSNorm order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B|1, 1, T, head_dim) in the HF `rotate_half` layout (pairs j, j + d/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache(nn.Module):
    """Pre-allocated key/value buffers written in place at the current position."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, _, t, _ = k.shape
        end = start + t
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, start: int | None) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        is_causal = attn_mask is None
        if start is not None:
            assert self.kv_cache is not None, "call setup_kv_cache() before passing input_pos"
            k, v = self.kv_cache.update(start, k, v)  # (B, nkv, start + T, hd)
            if attn_mask is None and start > 0:
                is_causal = False
                if t > 1:  # query i sees keys 0 .. start + i
                    attn_mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
                start: int | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, start)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight (std 0.02 normal, norms at one); also after `to_empty()`."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        max_seq_len = min(max_seq_len or self.cfg.context_length, self.cfg.context_length)
        p = self.tok_emb.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, max_seq_len, self.cfg.head_dim,
                                          dtype or p.dtype, device or p.device)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def kv_cache_length(self) -> int:
        cache = self.blocks[0].attn.kv_cache
        return 0 if cache is None else cache.k.shape[2]

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, input_pos: int | None = None,
                positions: Tensor | None = None, attn_mask: Tensor | None = None,
                last_token_only: bool = False, loss_chunk_size: int = 4096) -> Tensor:
        """idx (B, T) -> logits (B, T, V), or the mean cross-entropy if `targets` (B, T) is given.

        input_pos: start position of `idx` in the KV cache (generation only).
        positions: explicit RoPE positions (B, T), e.g. reset at each packed document.
        attn_mask: bool (B, 1, T, T), True where attention is allowed; default causal.
        """
        b, t = idx.shape
        start = input_pos or 0
        if start + t > self.cfg.context_length:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context length {self.cfg.context_length}")
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device)[None]
        x = self.tok_emb(idx)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, input_pos)
        h = self.norm(x)
        if targets is not None:
            return chunked_cross_entropy(h.reshape(b * t, -1), self.lm_head.weight, targets.reshape(-1),
                                         loss_chunk_size)
        if last_token_only:
            h = h[:, -1:]
        return self.lm_head(h)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over the vocabulary, computed chunk by chunk of rows.

    The gradients are computed in the forward pass, so neither the full logits nor the
    full softmax are ever held: memory is O(chunk x vocab) instead of O(tokens x vocab)
    (16 GB of fp32 logits for a 32 x 2048 batch at a 64K vocabulary). The FLOPs are the
    same as logits + backward; backward only rescales the stored gradients.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        n = h.shape[0]
        valid_all = targets != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype) if not torch.is_autocast_enabled(h.device.type) else weight
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk_size):
            hc, tc, valid = h[s:s + chunk_size], targets[s:s + chunk_size], valid_all[s:s + chunk_size]
            logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)  # (n, V)
            tgt = tc.clamp(min=0)
            total -= (logp.gather(1, tgt[:, None]).squeeze(1) * valid).sum()
            if need_h or need_w:
                dlogits = logp.exp_()  # softmax, in place
                dlogits.scatter_add_(1, tgt[:, None], -valid[:, None].to(dlogits.dtype))
                dlogits *= (valid.to(dlogits.dtype) / n_valid)[:, None]
                d = dlogits.to(hc.dtype)
                if need_h:
                    grad_h[s:s + chunk_size] = d @ w.to(d.dtype)
                if need_w:
                    grad_w += (d.t() @ hc).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` (IGNORE_INDEX skipped), memory-lean."""
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk_size)


def configure_optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on 2-D+ tensors (matmuls, embeddings), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
