"""Language identification and the quality rules: each rejects what it should, clean French passes."""

import pytest
from datatrove.data import Document

from tests.data.corpus_fixtures import ENGLISH, GERMAN, OCR_GARBAGE, SENTENCES, french_doc
from training.data.filters import FrenchLanguageFilter, QualityConfig, QualityFilter, french_score, quality_check


@pytest.mark.parametrize("seed", range(5))
def test_clean_french_passes_every_rule(seed):
    assert quality_check(french_doc(seed)) is None
    assert french_score(french_doc(seed)) > 0.9


def _lines(lines):
    return "\n".join(lines)


BAD = {
    "too_few_words": "Bonjour le monde, ceci est court.",
    "mean_word_length": " ".join(["a b c d e f g h i j"] * 10) + " le la de et",
    "symbol_ratio": " ".join(f"#tag{i} le chat est là" for i in range(30)),
    "bullet_lines": _lines(f"- élément numéro {i} de la liste des courses pour la semaine" for i in range(30)),
    "ellipsis_lines": _lines(f"{s[:-1]}..." for s in SENTENCES[:20]),
    "alpha_words": " ".join(f"{1000 + i} {20000 + 7 * i} {300000 + i} le chat" for i in range(40)),
    "stop_words": ENGLISH,
    "duplicate_lines": _lines([SENTENCES[0]] * 10 + SENTENCES[1:8]),
    "top_2gram": " ".join(["le chat"] * 60 + SENTENCES[:2]),
    "duplicate_5grams": SENTENCES[3] + " " + " ".join([SENTENCES[0] + " " + SENTENCES[1]] * 4),
    "line_punctuation": _lines(s.rstrip(".") for s in SENTENCES[:20]),
    "short_lines": _lines(" ".join(s.split()[i:i + 3]) + "." for s in SENTENCES[:10] for i in range(0, 12, 3)),
    "enormous_line": " ".join(SENTENCES * 40),
    "ocr_quality": OCR_GARBAGE,
}


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_rule_rejects_its_bad_document(rule):
    assert quality_check(BAD[rule]) == rule


def test_published_ocr_score_rule_only_with_threshold():
    doc = french_doc(7)
    assert quality_check(doc, QualityConfig(), {"ocr": 0.3}) is None
    assert quality_check(doc, QualityConfig(min_published_ocr=0.6), {"ocr": 0.3}) == "published_ocr_score"
    assert quality_check(doc, QualityConfig(min_published_ocr=0.6), {"ocr": 0.9}) is None


def test_language_filter_keeps_french_drops_others_and_counts():
    flt = FrenchLanguageFilter(0.5)
    docs = [Document(text=t, id=str(i), metadata={"source": "s"})
            for i, t in enumerate([french_doc(1), ENGLISH, GERMAN, french_doc(2)])]
    kept = list(flt.run(iter(docs)))
    assert [d.id for d in kept] == ["0", "3"]
    assert kept[0].metadata["fr_score"] > 0.9
    assert flt.stats["dropped_not_french"].total == 2
    assert flt.stats["language/s/dropped_not_french"].total == 2


def test_quality_filter_counts_rejections_per_rule_and_source():
    flt = QualityFilter()
    docs = [Document(text=t, id=str(i), metadata={"source": "web"})
            for i, t in enumerate([french_doc(1), BAD["too_few_words"], BAD["duplicate_lines"], BAD["too_few_words"]])]
    assert [d.id for d in flt.run(iter(docs))] == ["0"]
    assert flt.stats["dropped_too_few_words"].total == 2
    assert flt.stats["dropped_duplicate_lines"].total == 1
    assert flt.stats["quality/web/dropped_too_few_words"].total == 2


OTHER_LANGUAGES = {
    "catalan": "Les persones que viuen a la ciutat diuen que el mercat és molt antic i que les botigues "
               "obren cada dia amb productes de la terra. Aquesta setmana els veïns han organitzat una festa "
               "per celebrar l'arribada de la primavera, però la pluja ha obligat a ajornar-la. Des de fa anys "
               "les famílies es troben a la plaça per parlar de les collites i dels preus del mercat.",
    "spanish": "Las personas que viven en la ciudad dicen que el mercado es muy antiguo y que las tiendas abren "
               "cada día con productos de la tierra. Esta semana los vecinos han organizado una fiesta para "
               "celebrar la llegada de la primavera, pero la lluvia ha obligado a aplazarla hasta el domingo.",
    "italian": "Le persone che vivono in città dicono che il mercato è molto antico e che le botteghe aprono ogni "
               "giorno con prodotti della terra. Questa settimana gli abitanti hanno organizzato una festa per "
               "celebrare l'arrivo della primavera, ma la pioggia ha costretto a rimandarla alla domenica.",
    "portuguese": "As pessoas que vivem na cidade dizem que o mercado é muito antigo e que as lojas abrem todos os "
                  "dias com produtos da terra. Esta semana os vizinhos organizaram uma festa para celebrar a "
                  "chegada da primavera, mas a chuva obrigou a adiar a festa para o domingo seguinte.",
    "latin": "Gallia est omnis divisa in partes tres, quarum unam incolunt Belgae, aliam Aquitani, tertiam qui "
             "ipsorum lingua Celtae, nostra Galli appellantur. Hi omnes lingua, institutis, legibus inter se "
             "differunt. Gallos ab Aquitanis Garumna flumen, a Belgis Matrona et Sequana dividit.",
}


@pytest.mark.parametrize("lang", sorted(OTHER_LANGUAGES))
def test_fast_path_never_takes_other_languages_and_lingua_rejects_them(lang):
    from training.data.filters import french_by_markers

    text = OTHER_LANGUAGES[lang]
    assert not french_by_markers(text)
    assert french_score(text) < 0.5


def test_fast_path_takes_plain_french_but_not_french_mixed_with_english():
    from training.data.filters import french_by_markers, language_sample

    assert french_by_markers(language_sample(french_doc(3)))
    assert not french_by_markers(french_doc(3)[:300] + " " + ENGLISH[:600])
