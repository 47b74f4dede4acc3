"""Document filters: French language identification and quality rules adapted to French.

- `FrenchLanguageFilter`: a cascade: unmistakably French samples (French function words
  frequent, other languages' markers absent) pass directly; the rest go to lingua (models ship
  inside the wheel, works offline) in low-accuracy mode, restricted to French and the languages it is usually confused with or mixed with,
  applied to three 400-character windows of each document rather than the whole text.
- `QualityFilter`: Gopher / C4 / FineWeb-style rules with French stop words and French
  punctuation, plus an OCR-quality rule for digitised books and newspapers. Every rejection
  is counted under its rule's name (`dropped_<rule>`).

    python -m training.data.filters page.txt          # which rule (if any) rejects a file
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from training.data.clean import ocr_quality

# ---------------------------------------------------------------------------------------
# Language

CANDIDATE_LANGUAGES = ("FRENCH", "ENGLISH", "GERMAN", "SPANISH", "ITALIAN", "PORTUGUESE", "DUTCH", "LATIN",
                       "CATALAN")

_detector = None


def language_detector():
    """A process-wide lingua detector over CANDIDATE_LANGUAGES (built lazily: not picklable)."""
    global _detector
    if _detector is None:
        from lingua import Language, LanguageDetectorBuilder

        langs = [getattr(Language, name) for name in CANDIDATE_LANGUAGES]
        # low-accuracy mode: trigram models only, loads in ~0.2 s instead of ~3 s per process and is
        # reliable on the >= 120-character samples it gets here
        _detector = LanguageDetectorBuilder.from_languages(*langs).with_low_accuracy_mode().build()
    return _detector


def language_sample(text: str, window: int = 400, windows: int = 3) -> str:
    """Up to `windows` slices of `window` characters from the start, middle and end."""
    if len(text) <= window * windows:
        return text
    step = (len(text) - window) // (windows - 1)
    return "\n".join(text[i * step: i * step + window] for i in range(windows))


# Fast path of the language cascade: words that are frequent in French and rare in the other
# candidate languages, and markers of those languages (including Catalan, which shares "les",
# "des"). A sample where the former make >= 12% of the words and the latter <= 1.5% is French
# beyond doubt; everything else goes to lingua.
_FR_MARKERS = frozenset("les des est une du dans pour pas sur avec sont aux cette qui nous vous ils elles être "
                        "été mais où leur très au ces ce il elle ne se sa son ses".split())
_FOREIGN_MARKERS = frozenset(
    "the and of is to with that this was for are "          # English
    "der die und das ist nicht mit ein eine auch sich "     # German
    "el los las y con para por del una muy pero como "      # Spanish
    "il gli della che di è per non sono anche delle "       # Italian
    "uma com não dos das os em mais também "                # Portuguese
    "amb els és però molt aquesta "                         # Catalan
    "de het een van niet ook zijn "                         # Dutch ("de" is also French: counted once below)
    "cum quod enim sunt atque autem ad".split()) - {"de"}   # Latin
_SAMPLE_WORDS = re.compile(r"[^\W\d_]+")


def french_by_markers(sample: str) -> bool:
    words = _SAMPLE_WORDS.findall(sample.lower())
    if len(words) < 30:
        return False
    fr = sum(w in _FR_MARKERS for w in words)
    foreign = sum(w in _FOREIGN_MARKERS for w in words)
    return fr >= 0.12 * len(words) and foreign <= 0.015 * len(words)


def french_score(text: str) -> float:
    """Confidence (0-1) that the text is French, on a sample of the text: 1.0 from the marker
    fast path, else lingua's confidence."""
    from lingua import Language

    sample = language_sample(text)
    if french_by_markers(sample):
        return 1.0
    return language_detector().compute_language_confidence(sample, Language.FRENCH)


class FrenchLanguageFilter(BaseFilter):
    """Keep documents whose French confidence is at least `threshold`; stores `metadata["fr_score"]`."""

    name = "🇫🇷 french language"

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = french_score(doc.text)
        doc.metadata["fr_score"] = round(score, 3)
        if score < self.threshold:
            self.stat_update(f"language/{doc.metadata.get('source', '?')}/dropped_not_french")
            return False, "not_french"
        return True


# ---------------------------------------------------------------------------------------
# Quality rules

FRENCH_STOP_WORDS = frozenset(
    "le la les l de des du d un une et est en que qui dans pour pas sur au aux il elle ils elles on ne se "
    "ce cette ces son sa ses par plus avec sont nous vous je tu leur leurs mais ou où y a été être".split())
_WORDS = re.compile(r"\w+(?:['’]\w+)*")
_NO_ALPHA_TOKEN = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")  # a whitespace-separated token without letters
_TERMINAL = ('.', '!', '?', '…', '»', '"', '”', ':', ';', ')')
_BULLETS = ("•", "-", "*", "–", "—", "·", "▪", "►", "‣", "○", "●")


@dataclass
class QualityConfig:
    """Thresholds of the quality rules (Gopher/C4/FineWeb values, adapted to French)."""

    min_words: int = 50                    # Gopher: 50
    max_words: int = 2_000_000             # books are long; Gopher's 100k would drop them
    min_mean_word_len: float = 3.0         # Gopher: 3-10 (French words are a bit longer than English)
    max_mean_word_len: float = 12.0
    max_symbol_ratio: float = 0.1          # '#' and '…' per word (Gopher)
    max_bullet_lines: float = 0.9          # share of lines starting with a bullet (Gopher)
    max_ellipsis_lines: float = 0.3        # share of lines ending with an ellipsis (Gopher)
    min_alpha_words: float = 0.7           # share of words with a letter (Gopher 0.8; technical French lower)
    min_stop_words: int = 2                # French stop words present (Gopher: 2 English ones)
    max_dup_line_frac: float = 0.3         # Gopher repetition rules
    max_dup_line_char_frac: float = 0.2
    max_top_ngram_frac: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    max_dup_ngram_frac: tuple = ((5, 0.15), (7, 0.13), (10, 0.10))
    min_line_punct_ratio: float = 0.12     # FineWeb: share of lines ending with punctuation
    max_short_line_ratio: float = 0.67     # FineWeb: share of lines under 30 characters
    max_line_chars: int = 100_000          # a single enormous line: scraped junk or a broken file
    min_ocr_quality: float = 0.8           # plausible-word share (see clean.ocr_quality)
    min_published_ocr: float | None = None  # threshold on a source's own OCR score (metadata 'ocr')
    repetition_sample_words: int = 50_000  # repetition rules look at the first N words


def _ngram_stats(hashes: np.ndarray, lens: np.ndarray, n: int) -> tuple[float, float]:
    """(share of characters in the most frequent n-gram, share in duplicated n-grams).

    Words arrive as 64-bit hashes; n-grams are combined polynomially (wrapping uint64) and
    counted with np.unique, which keeps the rule at numpy speed on long books."""
    m = len(hashes) - n + 1
    if m <= 0:
        return 0.0, 0.0
    g = hashes[:m].copy()
    for k in range(1, n):
        g = g * np.uint64(1_000_003) + hashes[k:k + m]
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    total = float(lens.sum()) or 1.0
    best = int(np.argmax(counts))
    top_frac = 0.0
    if counts[best] > 1:
        first = int(np.argmax(inverse == best))
        top_frac = float(lens[first:first + n].sum()) * int(counts[best]) / total
    repeated = (counts[inverse] > 1).astype(np.int32)
    cover = np.zeros(len(hashes) + 1, dtype=np.int32)
    cover[:m] += repeated
    cover[n:n + m] -= repeated
    covered = np.cumsum(cover[:-1]) > 0
    return top_frac, float(lens[covered].sum()) / total


def quality_check(text: str, cfg: QualityConfig = QualityConfig(), metadata: dict | None = None) -> str | None:
    """Name of the first rule the document fails, or None if it passes them all."""
    words = _WORDS.findall(text.lower())
    n = len(words)
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    mean_len = sum(map(len, words)) / n
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "mean_word_length"
    if (text.count("#") + text.count("…") + text.count("...")) / n > cfg.max_symbol_ratio:
        return "symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return "too_few_words"
    if max(map(len, lines)) > cfg.max_line_chars:
        return "enormous_line"
    if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines:
        return "bullet_lines"
    if sum(ln.endswith(("…", "...")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    n_tokens = len(text.split())
    if 1 - len(_NO_ALPHA_TOKEN.findall(text)) / max(n_tokens, 1) < cfg.min_alpha_words:
        return "alpha_words"
    lower = words[: cfg.repetition_sample_words]
    if len(FRENCH_STOP_WORDS.intersection(lower)) < cfg.min_stop_words:
        return "stop_words"
    # repetition (Gopher): duplicated lines, then top / duplicated n-grams
    line_counts = Counter(lines)
    dup_lines = sum(c for c in line_counts.values() if c > 1)
    if dup_lines / len(lines) > cfg.max_dup_line_frac:
        return "duplicate_lines"
    if sum(len(ln) * c for ln, c in line_counts.items() if c > 1) / max(sum(map(len, lines)), 1) > cfg.max_dup_line_char_frac:
        return "duplicate_line_chars"
    hashes = np.fromiter(map(hash, lower), dtype=np.int64, count=len(lower)).view(np.uint64)
    lens = np.fromiter(map(len, lower), dtype=np.int64, count=len(lower))
    for n_, limit in cfg.max_top_ngram_frac:
        if _ngram_stats(hashes, lens, n_)[0] > limit:
            return f"top_{n_}gram"
    for n_, limit in cfg.max_dup_ngram_frac:
        if _ngram_stats(hashes, lens, n_)[1] > limit:
            return f"duplicate_{n_}grams"
    # FineWeb line rules
    if sum(ln.endswith(_TERMINAL) for ln in lines) / len(lines) < cfg.min_line_punct_ratio:
        return "line_punctuation"
    if sum(len(ln) < 30 for ln in lines) / len(lines) > cfg.max_short_line_ratio:
        return "short_lines"
    # OCR
    if cfg.min_published_ocr is not None and metadata and metadata.get("ocr") is not None:
        try:
            if float(metadata["ocr"]) < cfg.min_published_ocr:
                return "published_ocr_score"
        except (TypeError, ValueError):
            pass
    if ocr_quality(text) < cfg.min_ocr_quality:
        return "ocr_quality"
    return None


class QualityFilter(BaseFilter):
    """datatrove filter running `quality_check`; rejections counted as `dropped_<rule>`, also per source."""

    name = "🥇 quality rules"

    def __init__(self, cfg: QualityConfig | None = None):
        super().__init__()
        self.cfg = cfg or QualityConfig()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = quality_check(doc.text, self.cfg, doc.metadata)
        if reason:
            self.stat_update(f"quality/{doc.metadata.get('source', '?')}/dropped_{reason}")
            return False, reason
        return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Run the language and quality filters on text files and print the verdicts.",
        epilog="example: python -m training.data.filters article.txt notes.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="UTF-8 text files (one document each)")
    ap.add_argument("--min-words", type=int, default=QualityConfig.min_words, help="minimum words per document")
    args = ap.parse_args(argv)
    cfg = QualityConfig(min_words=args.min_words)
    print("thresholds:", asdict(cfg))
    for p in args.paths:
        text = open(p, encoding="utf-8", errors="replace").read()
        print(f"{p}: french={french_score(text):.3f} quality={quality_check(text, cfg) or 'pass'}")


if __name__ == "__main__":
    main()
