"""Token shard format and the per-source budget blend."""

import json

import numpy as np
import pytest
from datatrove.data import Document

from tests.data.corpus_fixtures import french_doc
from training.data.blend import blend, plan_blend, collect_documents
from training.data.dedup import find_exact_duplicates
from training.data.tokenize import TokenShardWriter, read_token_metas, token_dtype


def test_token_dtype_follows_vocabulary_size():
    assert token_dtype(8000) == np.uint16 and token_dtype(64000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128_000) == np.uint32


def _write_shards(folder, tokenizer, docs_by_source):
    docs = [Document(text=t, id=f"{s}{i}", metadata={"source": s})
            for s, texts in docs_by_source.items() for i, t in enumerate(texts)]
    list(TokenShardWriter(str(tokenizer.path), str(folder), batch_size=4).run(iter(docs), rank=0))
    list(TokenShardWriter(str(tokenizer.path), str(folder)).run(iter([]), rank=1))  # an empty task is fine


def test_shard_writer_format(tmp_path, tokenizer):
    _write_shards(tmp_path, tokenizer, {"a": [french_doc(i) for i in range(5)], "b/x": [french_doc(9)]})
    metas = read_token_metas(tmp_path)
    assert [m["rank"] for m in metas] == [0, 1] and set(metas[0]["shards"]) == {"a", "b_x"}
    tokens = np.fromfile(tmp_path / "00000.a.bin", dtype=np.uint16)
    ends = np.load(tmp_path / "00000.a.idx.npy")
    assert ends.tolist() == (np.flatnonzero(tokens == 3) + 1).tolist() and len(ends) == 5
    starts = [0, *ends[:-1]]
    assert [tokenizer.decode(tokens[s:e - 1].tolist()) for s, e in zip(starts, ends)] == [french_doc(i) for i in range(5)]
    assert metas[0]["shards"]["a"]["tokens"] == len(tokens) and metas[0]["tokenizer_sha256"] == tokenizer.sha256
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_budgets_subsample_repeat_and_hold_out(tmp_path, tokenizer):
    _write_shards(tmp_path, tokenizer, {"big": [french_doc(i) for i in range(40)],
                                        "small": [french_doc(100 + i) for i in range(6)]})
    _, docs, _ = collect_documents(tmp_path)
    big_total, small_total = int(docs["big"].lengths.sum()), int(docs["small"].lengths.sum())
    train, val, summary = plan_blend(docs, {"big": big_total // 4, "small": 3 * small_total}, val_fraction=0.1)
    for name in ("big", "small"):
        assert not set(train[name].tolist()) & set(val[name].tolist())   # val never in train
        assert len(val[name]) >= 1
    big_taken = summary["big"]["train_tokens"]
    assert big_total // 4 <= big_taken < big_total // 4 + docs["big"].lengths.max()
    assert summary["small"]["repeats"] > 2.5 and np.bincount(train["small"]).max() >= 3
    capped = plan_blend(docs, {"small": 3 * small_total}, 0.1, allow_repeat=False)[2]["small"]
    assert capped["repeats"] == 1.0
    assert plan_blend(docs, {"small": 0}, 0.1)[2]["small"]["train_tokens"] == 0
    with pytest.raises(ValueError, match="unknown source"):
        plan_blend(docs, {"wiki": 10}, 0.1)


def test_blend_writes_train_val_meta(tmp_path, tokenizer):
    shards, out = tmp_path / "tok", tmp_path / "final"
    _write_shards(shards, tokenizer, {"a": [french_doc(i) for i in range(10)], "b": [french_doc(50 + i) for i in range(10)]})
    meta = blend(shards, out, {"a": 10**9}, val_fraction=0.2, allow_repeat=False)
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["splits"] == meta["splits"]
    for split in ("train", "val"):
        tokens = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(tokens) == meta["splits"][split]["tokens"] == np.load(out / f"{split}.idx.npy")[-1]
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 20
    assert not list(out.glob(".*"))


def test_exact_duplicates_keep_first_copy_in_task_order(tmp_path):
    np.save(tmp_path / "00000.npy", np.array([5, 7, 5, 9], dtype=np.uint64))
    np.save(tmp_path / "00001.npy", np.array([7, 11], dtype=np.uint64))
    np.save(tmp_path / "00002.npy", np.zeros(0, dtype=np.uint64))
    remove = find_exact_duplicates(tmp_path, 3)
    assert remove[0].tolist() == [2] and remove[1].tolist() == [0] and remove[2].tolist() == []
    with pytest.raises(FileNotFoundError, match="task 3"):
        find_exact_duplicates(tmp_path, 4)
