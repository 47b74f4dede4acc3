"""The `rodin` model class for lm-eval: our Transformer scored directly, shared prefixes computed once.

    lm = RodinLM("runs/rodin-1b/final", device="cuda")        # or lm_eval ... --model rodin
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Loglikelihood requests are split into a prefix (the context without its last token) and a
tail (the last context token and the continuation but its last token, whose logits score the
continuation). Requests are grouped by prefix: the choices of a multiple-choice question
share one, and so, up to the question itself, do all the questions of a few-shot task with a
fixed few-shot set. Each batch of groups is computed in three stages on the model's KV cache:

    stage 0   the longest prefix common to the batch, once (batch 1), reusing what the
              previous batch left in cache row 0;
    stage 1   each group's own rest of the prefix, one row per group;
    stage 2   the tails, one row per request, attending to their group's cache row
              (rows gathered, per-row RoPE positions and an attention mask hiding padding).

Groups are ordered so that batches share prefixes (lexicographic families, longest first
within a family) and are sized by rows and by a token budget. The result is the plain
computation `log_softmax(model(ctx + cont[:-1]))` up to floating-point rounding; `share_prefix=False`
scores every request alone (right-padded batches) for comparison.

`generate_until` is batched greedy decoding on the same machinery (prompt prefixes shared,
one decoding row per prompt), stopping at EOS, at the `until` strings or at `max_gen_toks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rodin.checkpoint import load_model, load_tokenizer
from rodin.model import Transformer
from rodin.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in ("auto", "None"):
        return None
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[str(dtype)]


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Item:
    prefix: tuple[int, ...]  # context without its last token (computed into the KV cache)
    tail: list[int]  # [last context token] + continuation[:-1]: the tokens whose logits score
    targets: list[int]  # the continuation


class PrefixScorer:
    """Continuation log-probabilities with shared prefixes, on a `rodin.model.Transformer`."""

    def __init__(self, model: Transformer, batch_size: int = 32, max_batch_tokens: int = 8192,
                 min_shared: int = 16):
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self.min_shared = min_shared
        self.ctx = model.cfg.context_length
        self.device = model.tok_emb.weight.device
        self._row0: tuple[int, ...] = ()  # tokens held, at their positions, by cache row 0
        self._shared: tuple[int, ...] = ()  # tokens held, at their positions, by every cache row
        self._cache = None

    # ---------------------------------------------------------------- cache handling

    def _ensure_cache(self, rows: int) -> None:
        cache = self.model.blocks[0].attn.kv_cache
        if cache is None or cache is not self._cache or cache.k.shape[0] < rows or cache.k.shape[2] < self.ctx:
            self.model.setup_kv_cache(max(rows, self.batch_size), self.ctx)
            self._cache = self.model.blocks[0].attn.kv_cache
            self._row0 = self._shared = ()

    def _caches(self):
        return [b.attn.kv_cache for b in self.model.blocks]

    def release(self) -> None:
        """Free the KV cache (it is rebuilt on the next call)."""
        self.model.clear_kv_cache()
        self._cache = None
        self._row0 = self._shared = ()

    @torch.inference_mode()
    def prefill(self, prefixes: Sequence[tuple[int, ...]], rows: int | None = None,
                share: bool = True) -> tuple[int, int]:
        """Put prefixes[g] in cache row g at slots [0, len), and their common part in every row.
        Returns (c, base): the common length and the first free slot. Slots between a row's
        prefix end and base hold padding that later masks hide."""
        g = len(prefixes)
        self._ensure_cache(max(g, rows or g))
        c = min(len(prefixes[0]), *(_lcp(prefixes[0], p) for p in prefixes[1:])) if g > 1 else len(prefixes[0])
        if not share:
            c, self._row0 = 0, ()
        r = _lcp(self._row0, prefixes[0][:c])
        if g > 1 and 0 < c - r < self.min_shared:
            c = r  # too short for a forward pass of its own: computed with the rest, row by row
        common = tuple(prefixes[0][:c])
        if r < c:  # stage 0: the common prefix, once
            idx = torch.tensor(common[r:], device=self.device)[None]
            self.model(idx, input_pos=r, last_token_only=True)
        shared = _lcp(self._shared, common)
        if shared < c:  # broadcast what the other rows do not already hold (nothing, within a family)
            for cache in self._caches():
                cache.k[1:, :, shared:c] = cache.k[:1, :, shared:c]
                cache.v[1:, :, shared:c] = cache.v[:1, :, shared:c]
        self._row0 = self._shared = common
        smax = max(len(p) for p in prefixes) - c
        if smax > 0:  # stage 1: the rest of each prefix, one row each (right-padded)
            rest = torch.zeros(g, smax, dtype=torch.long)
            for i, p in enumerate(prefixes):
                rest[i, :len(p) - c] = torch.tensor(p[c:], dtype=torch.long)
            self.model(rest.to(self.device), input_pos=c, last_token_only=True)
            self._row0 = tuple(prefixes[0])
        return c, c + smax

    @torch.inference_mode()
    def gather_rows(self, rows: Sequence[int], c: int, base: int) -> None:
        """Cache row n := old row rows[n] over slots [c, base) (slots [0, c) are the same in all rows)."""
        if base <= c or list(rows) == list(range(len(rows))):
            return
        index = torch.tensor(rows, device=self.device)
        for cache in self._caches():
            cache.k[:len(rows), :, c:base] = cache.k[:, :, c:base].index_select(0, index)
            cache.v[:len(rows), :, c:base] = cache.v[:, :, c:base].index_select(0, index)

    def step_mask(self, prefix_lens: torch.Tensor, base: int, t: int) -> torch.Tensor:
        """(N, 1, t, base + t) bool: the row's prefix slots, then causal over its own t new slots."""
        prefix = torch.arange(base, device=self.device)[None] < prefix_lens[:, None]  # (N, base)
        own = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        n = prefix_lens.shape[0]
        return torch.cat([prefix[:, None].expand(n, t, base), own[None].expand(n, t, t)], dim=-1)[:, None]

    @torch.inference_mode()
    def forward_tails(self, tails: Sequence[Sequence[int]], prefix_lens: Sequence[int], base: int) -> torch.Tensor:
        """Logits (N, Tmax, V) of tails[n] continuing cache row n's prefix of length prefix_lens[n]."""
        n, tmax = len(tails), max(len(t) for t in tails)
        idx = torch.zeros(n, tmax, dtype=torch.long)
        for i, t in enumerate(tails):
            idx[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        plen = torch.tensor(prefix_lens, device=self.device)
        positions = plen[:, None] + torch.arange(tmax, device=self.device)[None]
        mask = self.step_mask(plen, base, tmax)
        return self.model(idx.to(self.device), input_pos=base, positions=positions, attn_mask=mask)

    # ---------------------------------------------------------------- scheduling

    def order_groups(self, prefixes: list[tuple[int, ...]], sizes: list[int]) -> list[int]:
        """Group order: families of prefixes sharing >= min_shared tokens stay together (their
        common part is computed once and reused across batches); longest first inside a family
        (little padding), families longest first."""
        order = sorted(range(len(prefixes)), key=lambda g: prefixes[g])
        families: list[list[int]] = []
        for g in order:
            if families and _lcp(prefixes[families[-1][-1]], prefixes[g]) >= self.min_shared:
                families[-1].append(g)
            else:
                families.append([g])
        for fam in families:
            fam.sort(key=lambda g: -(len(prefixes[g]) + sizes[g]))
        families.sort(key=lambda fam: -(len(prefixes[fam[0]]) + sizes[fam[0]]))
        return [g for fam in families for g in fam]

    def batches(self, items: list[_Item], share_prefix: bool = True):
        """Yield lists of (group prefix, [item indices]) respecting rows, tokens and the window."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, it in enumerate(items):
            key = it.prefix if share_prefix else (i,)
            groups.setdefault(key, []).append(i)
        keys = list(groups)
        prefixes = [items[groups[k][0]].prefix for k in keys]
        longest_tail = [max(len(items[i].tail) for i in groups[k]) for k in keys]
        order = self.order_groups(prefixes, longest_tail)
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        first: tuple[int, ...] = ()
        c = pmax = tmax = rows = reuse = 0
        for g in order:
            prefix = prefixes[g]
            members = sorted(groups[keys[g]], key=lambda i: -len(items[i].tail))
            if batch and share_prefix:
                # Join the batch only if that does not cost many more prefix tokens than a batch of
                # its own would (e.g. it would drop a shared few-shot prefix from the batch).
                nc = min(c, _lcp(first, prefix))
                join = nc - min(reuse, nc) + (len(batch) + 1) * (max(pmax, len(prefix)) - nc)
                alone = c - reuse + len(batch) * (pmax - c) + len(prefix) - _lcp(first, prefix)
                if join > 1.15 * alone + 8:
                    yield batch
                    batch, first, c, pmax, tmax, rows = [], (), 0, 0, 0, 0
            while members:
                chunk: list[int] = []
                while members:
                    t = len(items[members[0]].tail)
                    new_batch = not batch and not chunk
                    nc = (len(prefix) if new_batch else min(c, _lcp(first, prefix))) if share_prefix else 0
                    np_, nt, nrows = max(pmax, len(prefix)), max(tmax, t), rows + len(chunk) + 1
                    fits = (nrows <= self.batch_size and np_ + nt <= self.ctx
                            and (len(batch) + 1) * (np_ - nc) + nrows * nt <= self.max_batch_tokens)
                    if not fits and not new_batch:
                        break
                    if new_batch:
                        first = prefix
                        reuse = _lcp(self._row0, prefix) if share_prefix else 0  # held when it runs
                    chunk.append(members.pop(0))
                    c, pmax, tmax = nc, np_, nt
                if chunk:
                    batch.append((prefix, chunk))
                    rows += len(chunk)
                if members:  # the batch is full
                    yield batch
                    batch, first, c, pmax, tmax, rows = [], (), 0, 0, 0, 0
        if batch:
            yield batch

    # ---------------------------------------------------------------- scoring

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], share_prefix: bool = True,
              progress: tqdm | None = None) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per (context ids,
        continuation ids). Inputs longer than the window lose their oldest tokens."""
        items = []
        for ctx, cont in requests:
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            if len(cont) > self.ctx:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the {self.ctx}-token context")
            if not ctx:
                raise ValueError("empty context: start the context with BOS")
            full = (list(ctx) + list(cont))[-(self.ctx + 1):]
            split = len(full) - len(cont) - 1
            items.append(_Item(tuple(full[:split]), full[split:-1], list(cont)))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        cache: dict[tuple, tuple[float, bool]] = {}
        todo = []
        for i, it in enumerate(items):
            key = (it.prefix, tuple(it.tail), tuple(it.targets))
            if key in cache:
                continue
            cache[key] = None  # type: ignore[assignment]
            todo.append(i)
        sub = [items[i] for i in todo]
        for batch in self.batches(sub, share_prefix):
            c, base = self.prefill([p for p, _ in batch], rows=sum(len(chunk) for _, chunk in batch),
                                   share=share_prefix)
            rows, tails, plens, members = [], [], [], []
            for g, (prefix, chunk) in enumerate(batch):
                for j in chunk:
                    rows.append(g)
                    tails.append(sub[j].tail)
                    plens.append(len(prefix))
                    members.append(j)
            self.gather_rows(rows, c, base)
            logits = self.forward_tails(tails, plens, base)
            for n, j in enumerate(members):
                it = sub[j]
                lp = torch.log_softmax(logits[n, :len(it.tail)].float(), dim=-1)
                tgt = torch.tensor(it.targets, device=lp.device)
                ll = float(lp.gather(1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                cache[(it.prefix, tuple(it.tail), tuple(it.targets))] = (ll, greedy)
            if progress is not None:
                progress.update(len(members))
        for i, it in enumerate(items):
            out[i] = cache[(it.prefix, tuple(it.tail), tuple(it.targets))]
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
               is_done=None) -> list[list[int]]:
        """Greedy continuation ids of each prompt (batched; stop ids included, not beyond).
        `is_done(n, ids) -> bool` stops row n early (e.g. on a stop string)."""
        n = len(prompts)
        for p in prompts:
            if not p:
                raise ValueError("empty prompt: pass at least BOS")
            if len(p) + max_new_tokens > self.ctx:
                raise ValueError(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceed the "
                                 f"{self.ctx}-token context; truncate the prompt first")
        _, base = self.prefill([tuple(p[:-1]) for p in prompts])
        plen = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        cur = torch.tensor([p[-1] for p in prompts], device=self.device)[:, None]
        prefix = torch.arange(base, device=self.device)[None] < plen[:, None]  # (N, base)
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        stop = set(stop_ids)
        for s in range(max_new_tokens):
            mask = torch.cat([prefix, torch.ones(n, s + 1, dtype=torch.bool, device=self.device)], dim=1)
            logits = self.model(cur, input_pos=base + s, positions=(plen + s)[:, None], attn_mask=mask[:, None, None])
            nxt = logits[:, -1].float().argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(tok)
                if tok in stop or (is_done is not None and is_done(i, out[i])):
                    done[i] = True
            if all(done):
                break
            cur = nxt[:, None]
        return out


@register_model("rodin")
class RodinLM(TemplateLM):
    """lm-eval model class running a RODIN model (any checkpoint `rodin.checkpoint.load_model` reads).

    model_args: pretrained=PATH, device=cpu|cuda, dtype=auto|float32|bfloat16, batch_size (rows),
    max_batch_tokens, max_gen_toks (256), share_prefix (true), add_bos_token (true).
    """

    def __init__(self, pretrained: str | os.PathLike | None = None, *, model: Transformer | None = None,
                 tokenizer: Tokenizer | None = None, device: str = "cpu", dtype=None, batch_size=32,
                 max_batch_tokens: int | None = None, max_gen_toks: int = 256, share_prefix: bool = True,
                 add_bos_token: bool = True, max_batch_size=None, **kwargs):
        super().__init__()
        if kwargs:
            log.info("RodinLM ignores model_args %s", sorted(kwargs))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            if pretrained is None:
                raise ValueError("RodinLM needs pretrained=PATH (a model directory, HF dir, .pt or hub id) or model=")
            model, info = load_model(pretrained, device=device, dtype=parse_dtype(dtype))
            tokenizer = tokenizer or load_tokenizer(info)
            self.info = info
        else:
            self.info = None
        if tokenizer is None:
            raise ValueError("RodinLM needs the tokenizer of the model")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, the model only {model.cfg.vocab_size}")
        self.model = model.eval()
        self.tok = tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else model.cfg.name
        self._device = model.tok_emb.weight.device
        bs = batch_size
        if isinstance(bs, str):
            bs = 32 if bs.startswith("auto") else int(bs)
        if max_batch_tokens is None:
            max_batch_tokens = 16384 if self._device.type == "cuda" else 8192
        self.scorer = PrefixScorer(model, batch_size=bs, max_batch_tokens=int(max_batch_tokens))
        self._max_gen_toks = int(max_gen_toks)
        self.share_prefix = str(share_prefix).lower() not in ("false", "0", "no")
        self.add_bos_token = str(add_bos_token).lower() not in ("false", "0", "no")

    # ---------------------------------------------------------------- lm-eval interface

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict:
        p = self.model.tok_emb.weight
        info = {"model_num_parameters": self.model.cfg.num_parameters(), "model_dtype": str(p.dtype),
                "model_config": self.model.cfg.to_dict(), "tokenizer_sha256": self.tok.sha256}
        if self.info is not None:
            info.update(model_source=self.info.source, model_path=str(self.info.path))
        return info

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="loglikelihood (rodin)") as bar:
            res = self.scorer.score(pairs, share_prefix=self.share_prefix, progress=bar)
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum log p(text): disjoint windows of the context length, the first one after BOS."""
        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            ids = self.tok.encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(k)
        with tqdm(total=len(windows), disable=disable_tqdm, desc="loglikelihood_rolling (rodin)") as bar:
            scores = self.scorer.score(windows, share_prefix=self.share_prefix, progress=bar)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def _decode_continuation(self, prompt_last: int, ids: list[int]) -> str:
        # Decoded after the last prompt token, so a word-initial space survives (as rodin.generate).
        anchor = self.tok.decode([prompt_last])
        full = self.tok.decode([prompt_last] + ids)
        return full[len(anchor):] if full.startswith(anchor) else self.tok.decode(ids)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, batched; stops at EOS, the `until` strings or `max_gen_toks`."""
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        by_kwargs: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            by_kwargs.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until (rodin)")
        for idxs in by_kwargs.values():
            kw = dict(args[idxs[0]][1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the rodin lm-eval model generates greedily only (do_sample/temperature > 0 asked)")
            max_new = min(max_new, self.max_length - 1)
            keep = self.max_length - max_new
            prompts = [self.tok_encode(args[i][0])[-keep:] for i in idxs]
            order = sorted(range(len(idxs)), key=lambda k: (-len(prompts[k]), prompts[k]))
            for s in range(0, len(order), self.scorer.batch_size):
                chunk = order[s:s + self.scorer.batch_size]
                batch_prompts = [prompts[k] for k in chunk]

                def is_done(n, ids, _p=batch_prompts):
                    text = self._decode_continuation(_p[n][-1], ids)
                    return any(u and u in text for u in until)

                outs = self.scorer.greedy(batch_prompts, max_new, stop_ids=[self.eot_token_id],
                                          is_done=is_done if until else None)
                for k, ids in zip(chunk, outs):
                    if ids and ids[-1] == self.eot_token_id:
                        ids = ids[:-1]
                    text = self._decode_continuation(prompts[k][-1], ids)
                    for u in until:
                        if u:
                            text = text.split(u)[0]
                    results[idxs[k]] = text
                    self.cache_hook.add_partial("generate_until", args[idxs[k]], text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]
