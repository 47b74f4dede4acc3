"""SFT data: ChatML conversations from JSONL, tokenized, packed or padded into batches.

Pipeline (each step is a function you can call on its own):

    load_conversations(paths, on_error)   JSONL -> validated conversations (+ problems, file:line)
    tokenize_conversations(convs, tok, seq_len, overflow)
                                          -> TokenizedSet (ids + loss labels via rodin.chat)
    layout_windows(tset, seq_len, packing)
                                          -> rows of example indices (packed or one per row)
    SFTBatchSource                        -> the trainer's BatchSource (shuffled epochs, exact
                                             resume, per-rank shares, validation batches)

Accepted JSONL records (one JSON object per line, blank lines ignored):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"instruction": "...", "reponse": "...", "input": "...", "system": "..."}
        (the upstream RODIN SFT keys; "response" and "output" are accepted for "reponse";
         a non-empty "input" is appended to the instruction after a blank line)
    {"text": "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n"}
        (pre-rendered ChatML, parsed back into messages so the loss mask is the same)

Loss mask: `rodin.chat.encode_conversation` alone decides which tokens are trained (assistant
content and its closing `<|im_end|>`), for atomic and for text ChatML markers alike.

Packing puts several conversations in one window without letting them see each other: RoPE
positions restart at 0 for each conversation and a block-diagonal causal `attn_mask` keeps
attention inside each conversation, so a packed conversation gets exactly the logits it
would get alone. With packing off, each row holds one conversation, right-padded (plain
causal attention: padding after the tokens cannot affect them) and trimmed per batch to
the longest row.

Conversations longer than the window (`seq_len + 1` tokens, since inputs and targets are
shifted by one) are truncated at the window end (`overflow="truncate"`, the reply is cut,
the prompt kept) or dropped (`overflow="drop"`); conversations left without any trained
token are dropped. Every case is counted in `TokenizeStats`.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rodin.chat import IM_END, IM_START, ROLES, encode_conversation, parse
from rodin.model import IGNORE_INDEX
from rodin.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RESPONSE_KEYS = ("reponse", "response", "output")
PACKING_MODES = ("packed", "padded")
OVERFLOW_POLICIES = ("truncate", "drop")
ON_ERROR = ("skip", "fail")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    """One rejected JSONL line."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class SFTDataError(ValueError):
    """Malformed SFT data with `on_error="fail"`, or no usable conversation at all."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class Conversation:
    messages: list[dict]
    source: str  # "file:line"


def check_messages(messages: object) -> list[dict]:
    """Validate a conversation for training; returns it as plain {role, content} dicts.

    Stricter than `rodin.chat.validate`: turns must be non-empty, must not contain ChatML
    markers (they would corrupt the format and the loss mask), and at least one assistant
    reply must exist (otherwise nothing would be trained).
    """
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise ValueError(f"message {i}: 'role' must be a string, got {type(role).__name__}")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
        if IM_START in content or IM_END in content:
            raise ValueError(f"message {i} ({role}): content contains a ChatML marker ({IM_START} or {IM_END})")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to train on")
    return out


def record_to_messages(record: object) -> list[dict]:
    """Messages of one JSONL record in any accepted format (see the module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return check_messages(record["messages"])
    if "instruction" in record:
        key = next((k for k in RESPONSE_KEYS if k in record), None)
        if key is None:
            raise ValueError(f"'instruction' without a reply: expected one of {', '.join(RESPONSE_KEYS)}")
        for k in ("instruction", key, "input", "system"):
            if k in record and not isinstance(record[k], str):
                raise ValueError(f"'{k}' must be a string, got {type(record[k]).__name__}")
        prompt = record["instruction"]
        if record.get("input", "").strip():
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "system", "content": record["system"]}] if record.get("system", "").strip() else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[key]}]
        return check_messages(messages)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"'text' must be a string, got {type(record['text']).__name__}")
        return check_messages(parse(record["text"]))
    raise ValueError(f"unknown record: expected 'messages', 'instruction' + 'reponse', or 'text'; "
                     f"got keys {sorted(record)[:8]}")


def load_conversations(paths: str | os.PathLike | Sequence[str | os.PathLike], on_error: str = "skip",
                       report=None) -> tuple[list[Conversation], list[Problem]]:
    """Read and validate JSONL files. Returns (conversations, problems).

    on_error="skip": malformed lines are reported (file:line: reason) through `report`
    (default: a logging warning) and left out.
    on_error="fail": any malformed line raises SFTDataError listing every problem found.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"SFT data file not found: {path}")
        with path.open("rb") as f:  # decode line by line so a bad byte is blamed on its own line
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append(Problem(str(path), lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(Problem(str(path), lineno, f"invalid JSON: {e.msg} (column {e.colno})"))
                    continue
                try:
                    messages = record_to_messages(record)
                except ValueError as e:
                    problems.append(Problem(str(path), lineno, str(e)))
                    continue
                conversations.append(Conversation(messages, f"{path}:{lineno}"))
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        if on_error == "fail":
            raise SFTDataError(f"{len(problems)} malformed SFT record(s):\n{listing}{more}\n"
                               f"Fix them, or pass --on-error skip to leave them out.", problems)
        message = f"skipped {len(problems)} malformed SFT record(s):\n{listing}{more}"
        report(f"WARNING: {message}") if report else log.warning(message)
    return conversations, problems


# --------------------------------------------------------------------------- tokenization


@dataclass
class TokenizeStats:
    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0  # input tokens of the kept examples (after truncation)
    trained_tokens: int = 0  # of which carry loss

    def summary(self) -> str:
        return (f"{self.kept}/{self.conversations} conversations kept ({self.truncated} truncated, "
                f"{self.dropped_too_long} dropped as too long, {self.dropped_no_target} dropped without "
                f"trained tokens), {self.tokens:,} tokens, {self.trained_tokens:,} trained")


@dataclass
class TokenizedSet:
    """Examples stored flat: example i is ids[offsets[i]:offsets[i+1]] (same for labels).

    Each example has at most `seq_len + 1` tokens: the model sees ids[:-1] and is trained
    on labels[1:].
    """

    ids: np.ndarray  # int32 (total,)
    labels: np.ndarray  # int32 (total,), IGNORE_INDEX where no loss
    offsets: np.ndarray  # int64 (n + 1,)
    sources: list[str]
    seq_len: int
    stats: TokenizeStats = field(default_factory=TokenizeStats)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Model input length of each example (tokens - 1)."""
        return np.diff(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.labels[s:e]


def tokenize_conversations(conversations: Iterable[Conversation | Sequence[dict]], tokenizer: Tokenizer,
                           seq_len: int, overflow: str = "truncate", progress: bool = False) -> TokenizedSet:
    """Tokenize through `rodin.chat.encode_conversation` and apply the overflow policy."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    conversations = list(conversations)
    stats = TokenizeStats(conversations=len(conversations))
    ids_parts, label_parts, lengths, sources = [], [], [], []
    max_tokens = seq_len + 1
    it: Iterable = conversations
    if progress:
        from tqdm import tqdm

        it = tqdm(conversations, desc="tokenizing", unit="conv", leave=False)
    for k, conv in enumerate(it):
        messages, source = (conv.messages, conv.source) if isinstance(conv, Conversation) else (conv, f"#{k}")
        ids, labels = encode_conversation(tokenizer, messages, bos=True)
        if len(ids) > max_tokens:
            if overflow == "drop":
                stats.dropped_too_long += 1
                continue
            ids, labels = ids[:max_tokens], labels[:max_tokens]
            stats.truncated += 1
        trained = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
        if trained == 0:
            stats.dropped_no_target += 1
            continue
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        label_parts.append(np.asarray(labels, dtype=np.int32))
        lengths.append(len(ids))
        sources.append(source)
        stats.kept += 1
        stats.tokens += len(ids) - 1
        stats.trained_tokens += trained
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))
    return TokenizedSet(cat(ids_parts), cat(label_parts), offsets, sources, seq_len, stats)


# --------------------------------------------------------------------------- layout


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to at most `capacity` (best-fit decreasing).

    Deterministic for given lengths; typically fills windows to within a few percent.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the window of {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            remaining, b = free.pop(j)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return bins


def layout_windows(tset: TokenizedSet, packing: str = "packed") -> list[list[int]]:
    """Rows of example indices: several per row when packed, one when padded."""
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
    if packing == "padded":
        return [[i] for i in range(len(tset))]
    return pack_best_fit(tset.lengths().tolist(), tset.seq_len)


def document_mask(doc_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask (B, 1, T, T), True = may attend, from per-token doc ids (B, T)."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def collate(tset: TokenizedSet, rows: Sequence[Sequence[int]], pad_id: int, packing: str = "packed") -> dict[str, Tensor]:
    """One batch: {"idx", "targets"} and, when a row holds several conversations,
    {"positions", "attn_mask"} (position reset + document masking).

    Packed batches are `seq_len` wide; padded batches are trimmed to their longest row.
    """
    lengths = tset.lengths()
    width = tset.seq_len if packing == "packed" else int(max(sum(lengths[i] for i in r) for r in rows))
    b = len(rows)
    idx = torch.full((b, width), pad_id, dtype=torch.int64)
    targets = torch.full((b, width), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((b, width), dtype=torch.int64)
    doc = torch.full((b, width), -1, dtype=torch.int64)  # padding: its own "document"
    multi_doc = False
    for r, row in enumerate(rows):
        pos = 0
        multi_doc |= len(row) > 1
        for d, i in enumerate(row):
            ids, labels = tset.example(i)
            n = len(ids) - 1
            idx[r, pos:pos + n] = torch.from_numpy(ids[:-1].astype(np.int64))
            targets[r, pos:pos + n] = torch.from_numpy(labels[1:].astype(np.int64))
            positions[r, pos:pos + n] = torch.arange(n)
            doc[r, pos:pos + n] = d
            pos += n
        positions[r, pos:] = torch.arange(width - pos)
    batch = {"idx": idx, "targets": targets}
    if multi_doc:  # one conversation per row: plain causal attention is exact and faster
        batch["positions"] = positions
        batch["attn_mask"] = document_mask(doc)
    return batch


# --------------------------------------------------------------------------- batch source


class SFTBatchSource:
    """The trainer's `BatchSource` over tokenized conversations.

    Rows (packed windows or single conversations) are visited in a seeded random order
    that changes every epoch; the stream is endless. Each optimizer micro-step consumes
    `micro_batch_size * world_size` rows, of which rank r takes the r-th slice, so ranks
    never share a row. The state is (epoch, cursor): resuming yields the same next batch.
    """

    def __init__(self, train: TokenizedSet, val: TokenizedSet | None, micro_batch_size: int, pad_id: int,
                 packing: str = "packed", seed: int = 1234, rank: int = 0, world_size: int = 1,
                 val_max_batches: int = 0):
        self.train, self.val = train, val
        self.val_max_batches = val_max_batches  # over all ranks; 0 = the whole validation set
        self.micro_batch_size, self.pad_id, self.packing = micro_batch_size, pad_id, packing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rows = layout_windows(train, packing)
        if not self.rows:
            raise SFTDataError("no training conversation left after validation and the overflow policy")
        self.val_rows = layout_windows(val, packing) if val is not None and len(val) else []
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    @property
    def fill_ratio(self) -> float:
        """Fraction of window positions holding real tokens (packed mode)."""
        return self.train.stats.tokens / (len(self.rows) * self.train.seq_len)

    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor == len(self._perm):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(n - len(out), len(self._perm) - self.cursor)
            out += self._perm[self.cursor:self.cursor + k]
            self.cursor += k
        return out

    def next_batch(self) -> dict[str, Tensor]:
        b = self.micro_batch_size
        picked = self._take(b * self.world_size)[self.rank * b:(self.rank + 1) * b]
        return collate(self.train, [self.rows[i] for i in picked], self.pad_id, self.packing)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows) or state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's data state ({state.get('rows')} rows, seed {state.get('seed')}) does "
                             f"not match this run ({len(self.rows)} rows, seed {self.seed}): resume with the same "
                             f"data, tokenizer, seq_len, packing and seed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)

    def val_batches(self) -> Iterator[dict[str, Tensor]]:
        """This rank's share of the validation rows, in a fixed order (at most
        `val_max_batches` micro-batches over all ranks).

        Every rank yields the same number of batches (sharded models need every rank in
        each forward); with several ranks a short share wraps around to its own first rows.
        """
        if not self.val_rows:
            return iter(())
        b, world = self.micro_batch_size, self.world_size
        share = self.val_rows[self.rank::world] or self.val_rows[:1]
        per_rank = -(-len(self.val_rows) // world)  # rows
        n_batches = -(-per_rank // b)
        if self.val_max_batches:
            n_batches = min(n_batches, max(1, self.val_max_batches // world))
        n_rows = min(per_rank, n_batches * b) if world == 1 else n_batches * b
        rows = [share[k % len(share)] for k in range(n_rows)]
        return (collate(self.val, rows[s:s + b], self.pad_id, self.packing) for s in range(0, len(rows), b))


def split_validation(conversations: list[Conversation], fraction: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out `fraction` of the conversations (at least one when fraction > 0), seeded."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else max(1, round(len(conversations) * fraction))
    if n_val >= len(conversations):
        return conversations, []
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(conversations), generator=g).tolist()
    val_idx = set(perm[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in val_idx]
    val = [c for i, c in enumerate(conversations) if i in val_idx]
    return train, val
