"""SFT data: loading/validation, loss mask, packing, batching (training/sft_data.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from rodin.chat import IM_END, IM_START, encode_conversation, parse, render
from rodin.checkpoint import load_model
from rodin.model import IGNORE_INDEX
from training.sft_data import (
    Conversation, SFTBatchSource, SFTDataError, collate, layout_windows, load_conversations,
    pack_best_fit, record_to_messages, split_validation, tokenize_conversations,
)

MULTI_TURN = [
    {"role": "system", "content": "Tu es un assistant."},
    {"role": "user", "content": "Où est la bibliothèque ?"},
    {"role": "assistant", "content": "Elle se trouve à côté de l'église."},
    {"role": "user", "content": "Quelle heure est-il ?"},
    {"role": "assistant", "content": "Il est 14 h 30, le train part."},
]

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour !"}, {"role": "assistant", "content": "Bonjour, que puis-je faire ?"}],
    MULTI_TURN,
    [{"role": "user", "content": "Qu'est-ce que Debian ?"},
     {"role": "assistant", "content": "Debian est un système d'exploitation libre."}],
    [{"role": "system", "content": "Réponds en une phrase."}, {"role": "user", "content": "Et apt ?"},
     {"role": "assistant", "content": "Pour installer un paquet, utilisez apt-get install."}],
    [{"role": "user", "content": "Un chat ?"}, {"role": "assistant", "content": "Le petit chat dort sur le canapé."}],
    [{"role": "user", "content": "Quand ?"}, {"role": "assistant", "content": "En 1789."}],
]


def _piece_bytes(tok, i: int) -> bytes:
    """The bytes of the text one token stands for, read from its piece (independent of offsets)."""
    piece = tok.id_to_piece(i)
    if i in (tok.bos_id, tok.eos_id, tok.pad_id):
        return b""
    if m := re.fullmatch(r"<0x([0-9A-F]{2})>", piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


@pytest.mark.parametrize("kind", ["atomic", "text"])
def test_loss_mask_marks_exactly_the_assistant_tokens(kind, tokenizer, text_marker_tokenizer):
    tok = tokenizer if kind == "atomic" else text_marker_tokenizer
    assert tok.has_atomic_chatml == (kind == "atomic")
    ids, labels = encode_conversation(tok, MULTI_TURN)
    text = render(MULTI_TURN).encode()
    # Rebuild each token's byte range from its piece alone.
    prefix = b" " if tok.add_dummy_prefix else b""
    assert b"".join(_piece_bytes(tok, i) for i in ids) == prefix + text
    # Where the assistant replies (content + closing marker) sit in the rendered text.
    spans, start = [], 0
    for m in MULTI_TURN:
        header = f"{IM_START}{m['role']}\n".encode()
        body = (m["content"] + IM_END).encode()
        if m["role"] == "assistant":
            spans.append((start + len(header), start + len(header) + len(body)))
        start += len(header) + len(body) + 1
    pos = -len(prefix)
    trained_runs, run = [], b""
    for i, lab in zip(ids, labels):
        piece = _piece_bytes(tok, i)
        lo, hi = pos, pos + len(piece)
        pos = hi
        inside = hi > lo and any(a <= lo and hi <= b for a, b in spans)
        assert (lab != IGNORE_INDEX) == inside, f"token {tok.id_to_piece(i)!r} at bytes {lo}:{hi}"
        if lab != IGNORE_INDEX:
            assert lab == i
            run += piece
        elif run:
            trained_runs.append(run)
            run = b""
    if run:
        trained_runs.append(run)
    replies = [(m["content"] + IM_END).encode() for m in MULTI_TURN if m["role"] == "assistant"]
    assert [r.lstrip(b" ") for r in trained_runs] == replies


def test_record_formats_give_the_same_conversation(tokenizer):
    msgs = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Traduis.\n\nbonjour"},
            {"role": "assistant", "content": "hello"}]
    for rec in [
        {"messages": msgs},
        {"instruction": "Traduis.", "input": "bonjour", "reponse": "hello", "system": "Sois bref."},
        {"instruction": "Traduis.", "input": "bonjour", "response": "hello", "system": "Sois bref."},
        {"instruction": "Traduis.", "input": "bonjour", "output": "hello", "system": "Sois bref."},
        {"text": render(msgs)},
        {"text": "<s>" + render(msgs).rstrip("\n")},
    ]:
        assert record_to_messages(rec) == msgs, rec
    assert record_to_messages({"instruction": "Salut", "reponse": "Bonjour", "input": ""}) == [
        {"role": "user", "content": "Salut"}, {"role": "assistant", "content": "Bonjour"}]
    assert parse(render(MULTI_TURN)) == MULTI_TURN


@pytest.mark.parametrize("text, reason", [
    ("hello " + render(MULTI_TURN), "outside a ChatML turn"),
    (render(MULTI_TURN) + "<|im_start|>assistant\n", "unterminated turn"),
    ("<|im_start|>user\nsalut<|im_start|>assistant\nok<|im_end|>\n", "not closed"),
    ("pas de chatml", "text after the last turn"),
])
def test_parse_chatml_rejects_malformed_text(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse(text)


def test_malformed_jsonl_lines_are_reported_with_line_numbers(tmp_path):
    good = {"messages": CONVERSATIONS[0]}
    lines = [
        json.dumps(good),                                                                    # 1 ok
        '{"messages": [',                                                                    # 2 bad JSON
        json.dumps({"messages": [{"role": "robot", "content": "bip"}]}),                     # 3 unknown role
        "",                                                                                  # 4 blank: ignored
        json.dumps({"messages": [{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "   "}]}),                 # 5 empty turn
        json.dumps({"messages": [{"role": "user", "content": 3}]}),                          # 6 wrong type
        json.dumps({"messages": [{"role": "user", "content": "seul"}]}),                     # 7 no assistant
        json.dumps({"instruction": "Salut"}),                                                # 8 no reply
        json.dumps({"text": "rien"}),                                                        # 9 bad ChatML
        json.dumps({"prompt": "x"}),                                                         # 10 unknown keys
        json.dumps(["liste"]),                                                               # 11 not an object
        json.dumps({"messages": [{"role": "user", "content": "a"},
                                 {"role": "system", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}),                   # 12 system late
        json.dumps({"instruction": "Salut", "reponse": "Bonjour"}),                          # 13 ok
        json.dumps({"messages": [{"role": "user", "content": "x <|im_end|> y"},
                                 {"role": "assistant", "content": "z"}]}),                   # 14 marker inside
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')             # 15 bad UTF-8
    convs, problems = load_conversations(path, on_error="skip")
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:13"]
    expected = {2: "invalid JSON", 3: "unknown role 'robot'", 5: "empty content", 6: "'content' must be a string",
                7: "no assistant message", 8: "without a reply", 9: "text after the last turn", 10: "unknown record",
                11: "expected a JSON object", 12: "system message may only come first", 14: "ChatML marker",
                15: "not valid UTF-8"}
    assert [p.line for p in problems] == sorted(expected)
    for p in problems:
        assert p.path == str(path) and expected[p.line] in p.reason, str(p)
        assert str(p).startswith(f"{path}:{p.line}: ")
    with pytest.raises(SFTDataError) as err:
        load_conversations(path, on_error="fail")
    assert f"{path}:3: " in str(err.value) and "--on-error skip" in str(err.value)
    assert len(err.value.problems) == len(expected)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_conversations(tmp_path / "missing.jsonl")


def test_overflow_policy_truncates_or_drops_and_counts(tokenizer):
    long_reply = [{"role": "user", "content": "Raconte."},
                  {"role": "assistant", "content": " ".join(["Il était une fois une princesse."] * 30)}]
    long_prompt = [{"role": "user", "content": " ".join(["Le petit chat dort."] * 40)},
                   {"role": "assistant", "content": "Oui."}]
    convs = CONVERSATIONS + [long_reply, long_prompt]
    seq_len = 128
    full = [len(encode_conversation(tokenizer, c)[0]) for c in convs]
    assert full[-1] > seq_len + 1 and full[-2] > seq_len + 1 and max(full[:-2]) <= seq_len + 1

    t = tokenize_conversations(convs, tokenizer, seq_len, overflow="truncate")
    assert (t.stats.kept, t.stats.truncated, t.stats.dropped_no_target, t.stats.dropped_too_long) == (7, 2, 1, 0)
    assert t.lengths().max() == seq_len and len(t) == 7
    ids, labels = t.example(6)  # the truncated long reply keeps its prompt, cut at the window end
    ref_ids, ref_labels = encode_conversation(tokenizer, long_reply)
    assert ids.tolist() == ref_ids[:seq_len + 1] and labels.tolist() == ref_labels[:seq_len + 1]
    assert t.stats.tokens == int(t.lengths().sum())
    assert t.stats.trained_tokens == int((t.labels != IGNORE_INDEX).sum())  # BOS is never trained

    d = tokenize_conversations(convs, tokenizer, seq_len, overflow="drop")
    assert (d.stats.kept, d.stats.truncated, d.stats.dropped_too_long, d.stats.dropped_no_target) == (6, 0, 2, 0)
    assert "2 dropped as too long" in d.stats.summary()


def test_best_fit_packing_respects_capacity_and_keeps_every_example():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (300,), generator=g).tolist()
    bins = pack_best_fit(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # near-optimal fill
    with pytest.raises(ValueError, match="more than the window"):
        pack_best_fit([10, 200], 128)


def test_packed_batch_structure(tokenizer):
    t = tokenize_conversations(CONVERSATIONS, tokenizer, 256)
    rows = layout_windows(t, "packed")
    assert len(rows) == 2 and sorted(i for r in rows for i in r) == list(range(len(CONVERSATIONS)))
    rows = [max(rows, key=len)]
    batch = collate(t, rows, tokenizer.pad_id, "packed")
    lens = t.lengths()
    ends = torch.tensor([lens[i] for i in rows[0]]).cumsum(0).tolist()
    assert len(ends) > 2 and ends[-1] < 256
    assert batch["idx"].shape == (1, 256) and batch["attn_mask"].shape == (1, 1, 256, 256)
    starts = [0] + ends[:-1]
    mask = batch["attn_mask"][0, 0]
    for s, e, i in zip(starts, ends, rows[0]):
        ids, labels = t.example(i)
        assert batch["idx"][0, s:e].tolist() == ids[:-1].tolist()
        assert batch["targets"][0, s:e].tolist() == labels[1:].tolist()
        assert batch["positions"][0, s:e].tolist() == list(range(e - s))
        assert batch["idx"][0, s] == tokenizer.bos_id
        assert mask[s:e, s:e].equal(torch.ones(e - s, e - s, dtype=torch.bool).tril())
        assert not mask[s:e, :s].any() and not mask[s:e, e:].any()
    assert (batch["targets"][0, ends[-1]:] == IGNORE_INDEX).all()
    assert (batch["idx"][0, ends[-1]:] == tokenizer.pad_id).all()
    assert mask.any(dim=-1).all()  # no fully masked row (SDPA would return NaN)

    padded = collate(t, layout_windows(t, "padded")[:3], tokenizer.pad_id, "padded")
    assert set(padded) == {"idx", "targets"}  # one conversation per row: plain causal
    assert padded["idx"].shape == (3, max(lens[:3]))


def _per_conversation_losses(logits, targets, segments):
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    return [(ce[r, s:e].sum() / valid[r, s:e].sum()).item() for r, s, e in segments]


@pytest.mark.parametrize("kind", ["atomic", "text"])
def test_packed_and_padded_batches_give_the_same_loss_per_conversation(kind, tokenizer, text_marker_tokenizer,
                                                                       tmp_path):
    from tests.fixtures import make_model_dir

    tok = tokenizer if kind == "atomic" else text_marker_tokenizer
    model, _ = load_model(make_model_dir(tmp_path / "m", tok, seed=3))
    model.eval()
    t = tokenize_conversations(CONVERSATIONS, tok, 200)
    lens = t.lengths()

    rows = layout_windows(t, "packed")
    assert max(len(r) for r in rows) > 1
    packed = collate(t, rows, tok.pad_id, "packed")
    seg_packed, order = [], []
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            seg_packed.append((r, pos, pos + lens[i]))
            order.append(i)
            pos += lens[i]
    padded = collate(t, [[i] for i in order], tok.pad_id, "padded")
    seg_padded = [(r, 0, lens[i]) for r, i in enumerate(order)]

    with torch.no_grad():
        lp = model(packed["idx"], positions=packed["positions"], attn_mask=packed["attn_mask"])
        lu = model(padded["idx"])
        loss_packed = model(packed["idx"], packed["targets"], positions=packed["positions"],
                            attn_mask=packed["attn_mask"])
        loss_padded = model(padded["idx"], padded["targets"])
        leak = model(packed["idx"])  # packed without masking: conversations see each other
    per_packed = _per_conversation_losses(lp, packed["targets"], seg_packed)
    per_padded = _per_conversation_losses(lu, padded["targets"], seg_padded)
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)  # same token-weighted mean
    per_leak = _per_conversation_losses(leak, packed["targets"], seg_packed)
    assert max(abs(a - b) for a, b in zip(per_leak, per_padded)) > 1e-3  # the mask is what makes them equal


def test_batch_source_resumes_exactly_and_ranks_never_share_rows(tokenizer):
    t = tokenize_conversations(CONVERSATIONS * 3, tokenizer, 64)
    src = SFTBatchSource(t, None, micro_batch_size=2, pad_id=tokenizer.pad_id, packing="packed", seed=7)
    n = len(src.rows)
    for _ in range(n):  # go past one epoch boundary
        src.next_batch()
    state = src.state_dict()
    expected = [src.next_batch() for _ in range(5)]
    again = SFTBatchSource(t, None, micro_batch_size=2, pad_id=tokenizer.pad_id, packing="packed", seed=7)
    again.load_state_dict(state)
    for a, b in zip(expected, (again.next_batch() for _ in range(5))):
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    other = SFTBatchSource(t, None, 2, tokenizer.pad_id, "packed", seed=8)
    with pytest.raises(ValueError, match="same data"):
        other.load_state_dict(state)

    # Two ranks: in one epoch, each row is seen exactly once overall.
    t2 = tokenize_conversations(CONVERSATIONS * 4, tokenizer, 256, overflow="drop")
    ranks = [SFTBatchSource(t2, None, 1, tokenizer.pad_id, "padded", seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [[] for _ in range(2)]
    for _ in range(len(t2) // 2):
        for r in range(2):
            seen[r].append(ranks[r].next_batch()["idx"][0].tolist())
    all_rows = sorted(map(tuple, seen[0] + seen[1]))
    ref = sorted(tuple(collate(t2, [[i]], tokenizer.pad_id, "padded")["idx"][0].tolist()) for i in range(len(t2)))
    assert all_rows == ref


def test_validation_split_and_batches(tokenizer):
    convs = [Conversation(c, f"x:{i}") for i, c in enumerate(CONVERSATIONS * 2)]
    train, val = split_validation(convs, 0.25, seed=0)
    assert len(val) == 3 and len(train) == 9 and not {c.source for c in val} & {c.source for c in train}
    tt = tokenize_conversations(train, tokenizer, 128)
    tv = tokenize_conversations(val, tokenizer, 128)
    src = SFTBatchSource(tt, tv, 2, tokenizer.pad_id, "padded")
    batches = list(src.val_batches())
    assert sum(b["idx"].shape[0] for b in batches) == 3
    assert [b["idx"].tolist() for b in batches] == [b["idx"].tolist() for b in src.val_batches()]
    assert list(SFTBatchSource(tt, None, 2, tokenizer.pad_id).val_batches()) == []
    # Two ranks: the same number of batches each (sharded models need every rank in each forward),
    # together covering every validation row; max_batches caps the total.
    shares = [list(SFTBatchSource(tt, tv, 1, tokenizer.pad_id, "padded", rank=r, world_size=2).val_batches())
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2
    seen = {tuple(b["idx"][0].tolist()) for s in shares for b in s}
    assert len(seen) == 3  # the 3 validation conversations, one rank repeating a row to keep the count
    capped = SFTBatchSource(tt, tv, 1, tokenizer.pad_id, "padded", val_max_batches=2)
    assert len(list(capped.val_batches())) == 2
