"""The demo corpus command on a fake Debian documentation tree (same layout as the packages)."""

import gzip
import json

import numpy as np
import pytest

from rodin.chat import render
from rodin.tokenizer import Tokenizer
from tests.data.corpus_fixtures import SENTENCES, french_doc
from training.data import demo_corpus


def section_text(n: int) -> str:
    """Three sentences no other section uses (sections must not repeat each other)."""
    return " ".join(SENTENCES[3 * n:3 * n + 3])


def _docbook_page(title: str, sections: list[int]) -> str:
    sections = "".join(
        f'<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="s{n}"></a>'
        f'{i + 1}.{n}.\u00a0Section numéro {n}</h2></div></div></div>'
        f'<div class="para">{section_text(n)}</div></div>'
        for i, n in enumerate(sections))
    return (f'<?xml version="1.0" encoding="UTF-8"?><html xmlns="http://www.w3.org/1999/xhtml"><head>'
            f'<title>{title}</title></head><body><div class="navheader">Précédent Suivant</div>{sections}</body></html>')


def make_debian_root(root, with_reference=True, with_man=True):
    hb = root / "usr/share/doc/debian-handbook/html/fr-FR"
    hb.mkdir(parents=True)
    for p in range(5):
        (hb / f"chap{p}.html").write_text(_docbook_page(f"Chapitre {p}", [2 * p, 2 * p + 1]), encoding="utf-8")
    if with_reference:
        ref = root / "usr/share/debian-reference"
        ref.mkdir(parents=True)
        (ref / "ch01.fr.html").write_text(_docbook_page("Référence", [10, 11, 12]), encoding="utf-8")
        (ref / "ch01.en.html").write_text("<p>English only</p>", encoding="utf-8")
    if with_man:
        man = root / "usr/share/man/fr/man1"
        man.mkdir(parents=True)
        for k in range(3):
            body = french_doc(90 + k).replace("\n\n", "\n.PP\n")
            roff = f'.TH OUTIL{k} 1\n.SH NOM\noutil{k} \\- fait une chose utile\n.SH DESCRIPTION\n.PP\n{body}\n'
            (man / f"outil{k}.1.gz").write_bytes(gzip.compress(roff.encode()))
    return root


def test_demo_corpus_builds_everything(tmp_path, capsys):
    root = make_debian_root(tmp_path / "root")
    out = tmp_path / "demo"
    demo_corpus.main(["--out", str(out), "--root", str(root), "--vocab-size", "400", "--workers", "1", "--tasks", "2"])
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == 400
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    assert len(train) == meta["splits"]["train"]["tokens"] > 1000 and (out / "val.bin").is_file()
    report = json.loads((out / "stats.json").read_text())
    assert set(report["sources"]) == {"debian_handbook", "debian_reference", "manpages_fr"}
    assert report["sources"]["debian_reference"]["read"]["docs"] == 1   # only *.fr.html
    assert report["fertility"]["overall"]["tokens_per_word"] > 0
    records = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    kinds = {r["generator"] for r in records}
    assert kinds == {"heading-to-section", "command-to-description"} and len(records) == 16  # 13 sections, 3 man pages
    for r in records:
        assert r["synthetic"] is True and [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert "<|im_start|>assistant\n" in render(r["messages"])
    section = next(r for r in records if r["origin"].endswith("chap0.html#s1"))
    assert "« Section numéro 1 »" in section["messages"][1]["content"]
    assert section["messages"][2]["content"] == section_text(1)
    assert report["totals"]["near_dedup"]["docs"] == 9                  # nothing lost: all pages are clean
    assert "sft.jsonl" in capsys.readouterr().out and "SYNTHETIC" in (out / "README.md").read_text()


def test_missing_packages_name_the_apt_command(tmp_path):
    root = make_debian_root(tmp_path / "root", with_reference=False, with_man=False)
    with pytest.raises(SystemExit, match="apt-get install debian-reference-fr manpages-fr"):
        demo_corpus.debian_sources(str(root))
    assert [s.name for s in demo_corpus.debian_sources(str(root), allow_missing=True)] == ["debian_handbook"]
    with pytest.raises(SystemExit, match="apt-get install debian-handbook debian-reference-fr manpages-fr"):
        demo_corpus.debian_sources(str(tmp_path / "empty"), allow_missing=True)
