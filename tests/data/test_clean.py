"""Cleaning: HTML/man to text, Unicode repair, boilerplate, OCR garbage, foreign paragraphs."""

import unicodedata
from collections import Counter

from tests.data.corpus_fixtures import ENGLISH, OCR_GARBAGE, french_doc
from training.data.clean import (clean_text, drop_english_paragraphs, fix_mojibake, html_to_text,
                                 normalize_unicode, ocr_quality, remove_boilerplate_lines, remove_garbage_lines,
                                 roff_to_text)


def test_html_to_text_keeps_prose_and_pre_drops_furniture():
    html = """<html><head><title>T</title><style>p{color:red}</style></head><body>
    <div class="navheader">Précédent | Suivant</div><nav>Accueil</nav>
    <h1>Le   titre</h1><p>Bonjour,
       le monde\u00a0!</p><script>alert('x')</script>
    <pre class="screen">  apt install vim\n    echo ok</pre>
    <ul><li>un</li><li>deux</li></ul><div class="footer">Copyright</div></body></html>"""
    text = html_to_text(html)
    assert "Le titre" in text and "Bonjour, le monde\u00a0!" in text  # whitespace folded, NBSP kept
    assert "  apt install vim\n    echo ok" in text                   # <pre> verbatim
    for junk in ("Précédent", "Accueil", "alert", "color:red", "Copyright"):
        assert junk not in text
    assert text.index("un") < text.index("deux")


def test_html_with_declared_latin1_and_empty_input():
    assert html_to_text(b"") == ""
    assert "été" in html_to_text("<p>été</p>".encode("utf-8"))


def test_mojibake_is_repaired_and_clean_text_untouched():
    broken = "Le systÃ¨me dâ€™exploitation est dÃ©jÃ  installÃ©."
    assert fix_mojibake(broken) == "Le système d’exploitation est déjà installé."
    clean = "Ça coûte 12,50 € « déjà » – l’été."
    assert fix_mojibake(clean) is clean


def test_normalize_unicode_nfc_controls_newlines():
    decomposed = "e\u0301te\u0301"  # é as e + combining acute
    out = normalize_unicode(f"{decomposed}\r\nligne\x00\x07 deux\u200b\ufeff\u00ad\u00a0!")
    assert out == "été\nligne deux\u00a0!"
    assert unicodedata.is_normalized("NFC", out)


def test_boilerplate_lines_removed_but_prose_mentioning_cookies_kept():
    text = ("Accepter les cookies\nPartager sur Facebook\n"
            "Les cookies de ma grand-mère sont délicieux, elle les prépare avec du beurre salé et du chocolat noir "
            "et les offre à tous les voisins du quartier.\nTous droits réservés 2024")
    out, n = remove_boilerplate_lines(text)
    assert n == 3 and out.startswith("Les cookies de ma grand-mère")


def test_ocr_quality_separates_clean_and_garbage():
    assert ocr_quality(french_doc(1)) > 0.95
    assert ocr_quality(OCR_GARBAGE) < 0.8
    out, n = remove_garbage_lines("Une vraie phrase en français, bien formée.\n~~~ |||| ^^^ ||| ~~~ %%%% ####\n- 12 -")
    assert n == 2 and out == "Une vraie phrase en français, bien formée."  # page number "- 12 -" too


def test_english_paragraphs_dropped_french_kept():
    fr = french_doc(2)
    out, n = drop_english_paragraphs(fr + "\n\n" + ENGLISH)
    assert n == 1 and out == fr


def test_clean_text_counts_what_it_did():
    counts = Counter()
    out = clean_text("Le systÃ¨me\r\nAccepter les cookies\n\n\n\n" + french_doc(3) + "\n\n" + ENGLISH, counts=counts)
    assert out.startswith("Le système\n\n") and "cookies" not in out and "package manager" not in out
    assert counts["mojibake_fixed_docs"] == 1 and counts["boilerplate_lines"] == 1
    assert counts["english_paragraphs"] == 1


def test_roff_to_text_man_page():
    roff = r""".\" comment
.TH CAT 1 "Septembre 2022"
.SH NOM
cat \- Concaténer des fichiers
.SH DESCRIPTION
.PP
Concaténer le ou les \fIFICHIER\fP(s) sur la
sortie standard.
.TP
\fB\-n\fP, \fB\-\-number\fP
numéroter toutes les lignes
"""
    text = roff_to_text(roff)
    assert "NOM" in text and "cat - Concaténer des fichiers" in text
    assert "Concaténer le ou les FICHIER(s) sur la sortie standard." in text
    assert "-n, --number numéroter toutes les lignes" in text
    assert "comment" not in text and "\\f" not in text and ".TH" not in text
