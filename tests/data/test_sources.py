"""Sources: local files of every supported format, bad input counted and skipped, hub recipes
run through `datasets` streaming on local Parquet/JSONL files of the recipe's schema."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.data.corpus_fixtures import french_doc
from training.data.sources import RECIPES, HubReader, LocalFilesReader, detect_format, parse_recipe, parse_source


def _read_all(reader, world_size=1):
    docs = []
    for rank in range(world_size):
        docs += list(reader.run(None, rank, world_size))
    return docs


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(french_doc(1), encoding="utf-8")
    (d / "b.html").write_text(f"<html><body><p>{french_doc(2)}</p></body></html>", encoding="utf-8")
    (d / "sub" / "c.txt.gz").write_bytes(gzip.compress(french_doc(3).encode()))
    (d / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(french_doc(4).encode()))
    rows = [{"text": french_doc(10 + i), "id": f"r{i}"} for i in range(3)]
    (d / "e.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [french_doc(20), french_doc(21)], "id": ["p0", "p1"]}), d / "f.parquet")
    (d / "man1").mkdir()
    (d / "man1" / "outil.1.gz").write_bytes(gzip.compress(b".TH OUTIL 1\n.SH NOM\noutil \\- fait des choses\n"))
    # bad input
    (d / "bad_utf8.txt").write_bytes("du texte ".encode() + b"\xff\xfe\xfa invalide")
    (d / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    (d / "empty.txt").write_bytes(b"")
    (d / "image.png").write_bytes(b"\x89PNG")
    big = json.dumps({"text": "x" * 5000})
    lines = [json.dumps({"text": french_doc(30)}), big, "{not json", json.dumps({"body": "pas de champ text"}),
             b"\xff".decode("latin-1"), json.dumps({"text": french_doc(31)})]
    (d / "g.jsonl").write_bytes("\n".join(lines).replace("ÿ", "").encode() + b"\n\xff\xfe\n")
    return d


def test_local_reader_reads_every_format_and_counts_bad_input(mixed_folder):
    reader = LocalFilesReader(parse_source(f"mix={mixed_folder}"), max_line_bytes=4096)
    docs = _read_all(reader)
    by_id = {d.id.split("/", 1)[1]: d for d in docs}
    texts = [d.text for d in docs]
    for seed in (1, 3, 4, 10, 11, 12, 20, 21, 30, 31):
        assert french_doc(seed) in texts, seed
    assert by_id["b.html"].metadata["format"] == "html" and french_doc(2) in by_id["b.html"].text
    assert by_id["man1/outil.1.gz"].metadata["format"] == "man"
    assert all(d.metadata["source"] == "mix" for d in docs)
    assert "e.jsonl#r1" in by_id and "f.parquet#p0" in by_id
    s = {k: v.total for k, v in reader.stats.stats.items()}
    assert s["skipped_invalid_utf8"] == 2          # bad_utf8.txt + the \xff line of g.jsonl
    assert s["skipped_binary_file"] == 1 and s["skipped_empty_file"] == 1
    assert s["skipped_enormous_line"] == 1 and s["skipped_invalid_json"] == 1
    assert s["skipped_missing_text_field"] == 1
    assert s["read/mix/docs"] == len(docs) == 12  # 4 files + 3 + 2 rows + 1 man page + 2 good lines
    assert not any("PNG" in t for t in texts)


def test_files_are_dealt_to_tasks_without_overlap_or_loss(mixed_folder):
    spec = parse_source(f"mix={mixed_folder}")
    one = sorted(d.id for d in _read_all(LocalFilesReader(spec)))
    three = sorted(d.id for d in _read_all(LocalFilesReader(spec), world_size=3))
    assert one == three


def test_source_options_glob_max_files_and_errors(mixed_folder, tmp_path):
    spec = parse_source(f"mix={mixed_folder},glob=*.txt,max_files=2")
    files = LocalFilesReader(spec).list_source_files()
    assert len(files) == 2 and all(f.endswith(".txt") for f in files)
    single = _read_all(LocalFilesReader(parse_source(f"one={mixed_folder / 'a.txt'}")))
    assert [d.text for d in single] == [french_doc(1)]
    with pytest.raises(FileNotFoundError):
        parse_source(f"x={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="unknown options"):
        parse_source(f"x={mixed_folder},colour=blue")
    with pytest.raises(ValueError, match="unknown recipe"):
        parse_recipe("wikipedya")
    assert detect_format("x/y.JSONL.gz") == "jsonl" and detect_format("man/man8/apt.8.gz") == "man"


def test_missing_parquet_column_is_reported_and_skipped(tmp_path):
    pq.write_table(pa.table({"contenu": [french_doc(1)] * 3}), tmp_path / "x.parquet")
    (tmp_path / "y.txt").write_text(french_doc(2), encoding="utf-8")
    reader = LocalFilesReader(parse_source(f"p={tmp_path}"))
    docs = _read_all(reader)
    assert [d.text for d in docs] == [french_doc(2)]
    assert reader.stats["skipped_missing_text_field"].total == 3


def test_recipes_name_the_rodin_sources():
    assert set(RECIPES) == {"hplt", "cc100", "wikipedia", "wikisource", "pleias_books", "pleias_news", "legifrance"}
    assert RECIPES["wikipedia"].dataset == "wikimedia/wikipedia" and RECIPES["wikipedia"].config == "20231101.fr"
    assert RECIPES["hplt"].config == "fra_Latn"
    assert RECIPES["pleias_books"].text_field == "complete_text" and RECIPES["pleias_books"].ocr_field == "ocr"


def test_hub_recipe_streams_local_parquet_with_the_recipe_schema(tmp_path):
    """The hub code path (datasets.load_dataset streaming + datatrove reader) on local Parquet shaped
    like PleIAs/French-PD-Books: text in `complete_text`, OCR score in `ocr`."""
    for shard in range(2):
        rows = {"file_id": [f"b{shard}{i}" for i in range(3)], "ocr": [0.9, 0.5, 0.95],
                "title": ["Titre"] * 3, "complete_text": [french_doc(40 + 3 * shard + i) for i in range(3)]}
        pq.write_table(pa.table(rows), tmp_path / f"train-{shard:05d}.parquet")
    spec = parse_recipe(f"pleias_books,data_files={tmp_path}/*.parquet")
    assert spec.recipe.dataset == "parquet" and spec.text_field == "complete_text"
    docs = _read_all(HubReader(spec), world_size=2)  # two streaming shards, one per task
    assert sorted(d.text for d in docs) == sorted(french_doc(40 + i) for i in range(6))
    assert {d.metadata["source"] for d in docs} == {"pleias_books"}
    assert sorted(d.metadata["ocr"] for d in docs) == [0.5, 0.5, 0.9, 0.9, 0.95, 0.95]


def test_hub_recipe_on_local_jsonl_counts_rows_without_the_text_field(tmp_path):
    rows = [{"id": 1, "text": french_doc(50)}, {"id": 2, "titre": "sans texte"}, {"id": 3, "text": french_doc(51)}]
    (tmp_path / "wiki.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    reader = HubReader(parse_recipe(f"wikipedia,data_files={tmp_path}/wiki.jsonl"))
    docs = _read_all(reader)
    assert [d.text for d in docs] == [french_doc(50), french_doc(51)]
    assert reader.stats["skipped_missing_text_field"].total == 1
