"""Tokenizer stage: stratified per-source sample and the fertility report."""

import gzip
import json

from rodin.tokenizer import Tokenizer
from tests.data.corpus_fixtures import french_doc
from training.data.train_tokenizer import train_on_corpus, water_fill


def test_water_fill_shares_by_weight_and_redistributes():
    share = water_fill({"big": 1000, "mid": 300, "tiny": 10}, {}, 600)
    assert share["tiny"] == 10 and abs(share["big"] - 295) < 1e-6 and abs(share["mid"] - 295) < 1e-6
    assert water_fill({"a": 100, "b": 100}, {"a": 3, "b": 1}, 80) == {"a": 60.0, "b": 20.0}
    assert water_fill({"a": 100, "b": 100}, {"b": 0}, 80) == {"a": 80.0}


def test_train_on_corpus_writes_tokenizer_and_fertility(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(120):
            src = "web" if i % 3 else "books"
            f.write(json.dumps({"text": french_doc(i), "id": f"{src}/{i}", "metadata": {"source": src}}) + "\n")
    report = train_on_corpus(corpus, tmp_path / "tok", vocab_size=400, sample_mb=0.02, heldout_fraction=0.1)
    tok = Tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 400 and tok.has_atomic_chatml
    assert json.loads((tmp_path / "tok" / "fertility.json").read_text()) == report
    overall = report["overall"]
    assert overall["docs"] >= 5 and 1.0 < overall["tokens_per_word"] < 4.0
    assert 1.5 < overall["bytes_per_token"] < 6.0 and 0.0 <= overall["byte_fallback_rate"] < 0.05
    sample = report["sample_bytes_per_source"]
    # stratified: the minority source gets about as many sampled bytes as the majority one
    assert sample["books"] > 0.6 * sample["web"]
