"""The whole pipeline on a small corpus: rejections, exact and near dedup across sources, shards that
decode back to the cleaned text, index/EOS agreement, stats, and resume after an interruption."""

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rodin.tokenizer import Tokenizer
from tests.data.corpus_fixtures import ENGLISH, GERMAN, OCR_GARBAGE, french_doc, near_duplicate
from training.data import tokenize as tokenize_mod
from training.data.clean import CleanStep
from training.data.prepare import PrepareConfig, prepare
from training.data.sources import parse_source

WEB_SEEDS, BOOK_SEEDS = range(100, 112), range(112, 122)


def make_corpus(root: Path) -> list:
    web, books = root / "web", root / "books"
    web.mkdir(parents=True)
    books.mkdir()
    rows = [{"text": french_doc(s), "id": f"w{s}"} for s in WEB_SEEDS]
    rows += [{"text": near_duplicate(french_doc(100)), "id": "near"}, {"text": ENGLISH, "id": "en"},
             {"text": "Trop court pour être utile.", "id": "short"}, {"text": GERMAN, "id": "de"}]
    with gzip.open(web / "part-0.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    for s in BOOK_SEEDS:
        (books / f"livre-{s}.txt").write_text(french_doc(s), encoding="utf-8")
    (books / "copie-exacte.txt").write_text(french_doc(105) + "\n", encoding="utf-8")  # same text as web w105
    (books / "ocr.txt").write_text(OCR_GARBAGE, encoding="utf-8")
    (books / "binaire.txt").write_bytes(b"\x00\x01\x02" * 50)
    (books / "latin1.txt").write_bytes("Un texte encodé en latin-1 : été, où.".encode("latin-1"))
    return [parse_source(f"web={web}"), parse_source(f"books={books}")]


def run(out: Path, sources, tokenizer, **kw) -> dict:
    cfg = PrepareConfig(out=out, sources=sources, tasks=3, tokenizer=tokenizer.path, val_fraction=0.1, **kw)
    return prepare(cfg)


def corpus_texts(out: Path) -> list[str]:
    texts = []
    for p in sorted((out / "corpus").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def split_docs(out: Path, split: str, tok: Tokenizer) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")
    ends = np.load(out / f"{split}.idx.npy")
    starts = np.concatenate([[0], ends[:-1]])
    return [tok.decode(tokens[s:e - 1].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("prep")
    sources = make_corpus(root / "in")
    report = run(root / "out", sources, tokenizer, workers=2)
    return root, sources, report


def test_rejections_and_dedup_across_sources(parallel_run):
    root, _, report = parallel_run
    texts = corpus_texts(root / "out")
    counts = Counter(texts)
    assert max(counts.values()) == 1                                   # no duplicates left
    assert counts[french_doc(105)] == 1                                # exact copy across sources: one kept
    assert counts[french_doc(100)] + counts[near_duplicate(french_doc(100))] == 1  # near dup: one kept
    distinct = {french_doc(s) for s in [*WEB_SEEDS, *BOOK_SEEDS] if s != 100}
    assert distinct <= set(texts) and len(texts) == len(distinct) + 1  # every distinct document kept
    assert not any(t.startswith("The package") or "Trop court" in t for t in texts)
    rej = report["rejections"]
    assert rej["clean:empty_after_clean"] == 1                        # English: all its paragraphs dropped
    assert rej["language:not_french"] == 1                             # German
    assert rej["quality:too_few_words"] == 1 and rej["quality:ocr_quality"] == 1
    assert rej["exact_dedup:duplicate"] == 1 and rej["near_dedup:duplicate"] == 1
    assert report["skipped_inputs"] == {"binary_file": 1, "invalid_utf8": 1}
    assert report["totals"]["near_dedup"]["docs"] == len(texts)
    assert report["sources"]["web"]["read"]["docs"] == 16 and report["sources"]["books"]["read"]["docs"] == 12


def test_shards_decode_to_the_corpus_and_index_matches_eos(parallel_run, tokenizer):
    root, _, report = parallel_run
    out = root / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 3
    assert meta["tokenizer_sha256"] == tokenizer.sha256
    train, val = split_docs(out, "train", tokenizer), split_docs(out, "val", tokenizer)
    assert sorted(train + val) == sorted(corpus_texts(out))            # every document once, train/val disjoint
    assert len(val) >= 1
    for split in ("train", "val"):
        tokens = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        ends = np.load(out / f"{split}.idx.npy")
        np.testing.assert_array_equal(np.flatnonzero(tokens == 3) + 1, ends)
        assert ends[-1] == len(tokens) == meta["splits"][split]["tokens"]
    assert report["tokens"]["total"] == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert "| web | 16 docs / " in (out / "stats.md").read_text()


def _outputs(out: Path) -> dict:
    files = {name: (out / name).read_bytes() for name in
             ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy")}
    files["corpus"] = corpus_texts(out)
    for p in sorted((out / "work" / "tokens").glob("*")):
        if p.suffix != ".json":
            files[f"tokens/{p.name}"] = p.read_bytes()
    report = json.loads((out / "stats.json").read_text())
    files["counts"] = (report["totals"], report["rejections"], report["tokens"]["per_source"])
    return files


def test_resume_after_crash_in_cleaning_gives_identical_output(parallel_run, tokenizer, tmp_path, monkeypatch):
    root, sources, _ = parallel_run
    original = CleanStep.run

    def crash_in_task_1(self, data, rank=0, world_size=1):
        for i, doc in enumerate(original(self, data, rank, world_size)):
            if rank == 1 and i == 2:
                raise RuntimeError("simulated crash")
            yield doc

    monkeypatch.setattr(CleanStep, "run", crash_in_task_1)
    with pytest.raises(RuntimeError, match="rerun the same command"):
        run(tmp_path, sources, tokenizer, workers=1)
    assert (tmp_path / "work/logs/1_clean/completions/00000").exists()
    assert not (tmp_path / "work/clean/00001.jsonl.gz").exists()      # the crashed task left no final file
    monkeypatch.setattr(CleanStep, "run", original)
    run(tmp_path, sources, tokenizer, workers=1)
    assert _outputs(tmp_path) == _outputs(root / "out")


def test_resume_after_crash_in_tokenization_gives_identical_output(parallel_run, tokenizer, tmp_path, monkeypatch):
    root, sources, _ = parallel_run
    original = tokenize_mod._ShardFile.add
    calls = {"n": 0}

    def crash_midway(self, ids, n_bytes):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("simulated crash")
        return original(self, ids, n_bytes)

    monkeypatch.setattr(tokenize_mod._ShardFile, "add", crash_midway)
    with pytest.raises(RuntimeError):
        run(tmp_path, sources, tokenizer, workers=1)
    assert list((tmp_path / "work/tokens").glob(".*.tmp"))             # partial shard left under a temp name
    monkeypatch.setattr(tokenize_mod._ShardFile, "add", original)
    run(tmp_path, sources, tokenizer, workers=1)
    assert _outputs(tmp_path) == _outputs(root / "out")


def test_changed_configuration_is_refused(parallel_run, tokenizer):
    root, sources, _ = parallel_run
    with pytest.raises(SystemExit, match="different configuration"):
        run(root / "out", sources, tokenizer, workers=2, lang_threshold=0.9)
