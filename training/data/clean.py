"""Text cleaning: HTML and man pages to text, Unicode repair, boilerplate and OCR garbage.

Pure functions (`clean_text`, `html_to_text`, `roff_to_text`, `ocr_quality`, ...) that the
pipeline's `CleanStep` (a datatrove step) applies to every document. Run alone to see what
cleaning does to a file:

    python -m training.data.clean page.html
    python -m training.data.clean /usr/share/man/fr/man1/cat.1.gz --format man
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

# ---------------------------------------------------------------------------------------
# HTML

_DROP_TAGS = {"script", "style", "noscript", "head", "nav", "header", "footer", "form", "iframe",
              "svg", "button", "select", "option", "template", "aside", "menu"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol",
               "li", "dl", "dt", "dd", "table", "tr", "blockquote", "pre", "figure", "figcaption",
               "hr", "address", "body", "html", "caption", "thead", "tbody", "tfoot"}
_CELL_TAGS = {"td", "th"}
# Class/id names that mark navigation and page furniture in CMS and DocBook output.
_BOILERPLATE_ATTR = re.compile(
    r"(^|[\s_-])(nav|navbar|navheader|navfooter|docnav|breadcrumbs?|menu|sidebar-nav|footer|header|"
    r"cookies?|banner|share|social|pagination|skip|toc|indexterm|legalnotice|copyright)($|[\s_-])",
    re.IGNORECASE)
_SPACES = re.compile(r"[ \t\n\r\f\v]+")  # not \s: French NBSPs are kept
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_PRE_OPEN, _PRE_CLOSE = "\ue000", "\ue001"  # private-use marks around <pre> blocks


def html_to_text(html: str | bytes) -> str:
    """Readable text of an HTML page: blocks on their own lines, `<pre>` kept verbatim,
    scripts, styles, navigation and page furniture (by tag or class/id) dropped."""
    import lxml.etree
    import lxml.html

    if isinstance(html, bytes):
        # lxml would assume Latin-1 for bytes without a <meta charset>: decode here instead
        try:
            html = html.decode("utf-8")
        except UnicodeDecodeError:
            m = re.search(rb"charset=[\"']?([A-Za-z0-9_-]+)", html[:4096])
            try:
                html = html.decode(m.group(1).decode() if m else "cp1252", errors="replace")
            except LookupError:
                html = html.decode("cp1252", errors="replace")
    html = _XML_DECL.sub("", html, count=1)  # lxml refuses str input that declares an encoding
    if not html.strip():
        return ""
    try:
        root = lxml.html.fromstring(html)
    except (lxml.etree.ParserError, ValueError):
        return ""
    out: list[str] = []

    def walk(el, in_pre: bool) -> None:
        tag = el.tag if isinstance(el.tag, str) else ""
        tag = tag.rsplit("}", 1)[-1].lower()
        if not tag:  # comment or processing instruction: keep only its tail
            if el.tail:
                out.append(el.tail if in_pre else _SPACES.sub(" ", el.tail))
            return
        attrs = f"{el.get('class', '')} {el.get('id', '')}"
        if tag in _DROP_TAGS or (attrs.strip() and _BOILERPLATE_ATTR.search(attrs)):
            if el.tail:
                out.append(el.tail if in_pre else _SPACES.sub(" ", el.tail))
            return
        pre = in_pre or tag == "pre"
        block = tag in _BLOCK_TAGS
        if block:
            out.append("\n\n" if tag not in ("li", "dt", "dd", "tr") else "\n")
        if tag == "pre" and not in_pre:
            out.append(_PRE_OPEN)
        if tag == "br":
            out.append("\n")
        if tag in _CELL_TAGS:
            out.append(" ")
        if el.text:
            out.append(el.text if pre else _SPACES.sub(" ", el.text))
        for child in el:
            walk(child, pre)
        if tag == "pre" and not in_pre:
            out.append(_PRE_CLOSE)
        if block:
            out.append("\n\n" if tag not in ("li", "dt", "dd", "tr") else "\n")
        if el.tail:
            out.append(el.tail if in_pre else _SPACES.sub(" ", el.tail))

    walk(root, False)
    return _tidy_lines("".join(out))


def _tidy_lines(text: str) -> str:
    """Strip the lines of flowing text; keep the indentation of lines inside <pre> blocks."""
    out, in_pre = [], False
    for line in text.split("\n"):
        has_open, has_close = _PRE_OPEN in line, _PRE_CLOSE in line
        pre_line = in_pre or has_open
        line = line.replace(_PRE_OPEN, "").replace(_PRE_CLOSE, "")
        out.append(line.rstrip() if pre_line else line.strip())
        if has_open:
            in_pre = True
        if has_close:
            in_pre = False
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# ---------------------------------------------------------------------------------------
# man pages (roff)

_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_ESCAPES = [
    (re.compile(r"\\\(em"), "—"), (re.compile(r"\\\(en"), "–"), (re.compile(r"\\\((lq|Lq)"), "“"),
    (re.compile(r"\\\((rq|Rq)"), "”"), (re.compile(r"\\\(aq"), "'"), (re.compile(r"\\\(bu"), "•"),
    (re.compile(r"\\\(co"), "©"), (re.compile(r"\\\(dq"), '"'), (re.compile(r"\\\(\w\w"), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""), (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[ ~0]"), "\u00a0"),
    (re.compile(r"\\[&|^/,%:)]"), ""), (re.compile(r"\\\*\(..|\\\*\[[^\]]*\]|\\\*."), ""),
    (re.compile(r"\\[ehH]'[^']*'"), ""), (re.compile(r"\\e"), lambda m: "\\"), (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\c"), ""),
]
_ROFF_TEXT_MACROS = {"B", "I", "BI", "IB", "RB", "BR", "IR", "RI", "SM", "SB", "Nm", "Nd", "Ar", "Fl", "Pa", "Dq", "Sq", "Ql"}
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}


def roff_to_text(src: str) -> str:
    """Plain text of a man page written in roff (man/mdoc macros): headings and paragraphs kept,
    formatting requests and escapes dropped. Fast and dependency-free (no groff run)."""
    out: list[str] = []
    for raw in src.split("\n"):
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, arg = parts[0], (parts[1] if len(parts) > 1 else "")
            arg = arg.replace('"', "") if macro not in ("TH",) else arg
            if macro in _ROFF_HEADINGS:
                out.append("\n" + arg.strip() + "\n")
            elif macro in _ROFF_TEXT_MACROS:
                out.append(arg + (" " if macro in ("RB", "BR", "IR", "RI") else "\n"))
            elif macro in ("PP", "LP", "P", "TP", "IP", "HP", "Pp", "sp", "br", "Bl", "El", "It"):
                out.append("\n")
                if macro == "IP" and arg:
                    out.append(arg.split(" ")[0] + " ")
            elif macro in ("nf", "fi", "TH", "Dd", "Dt", "Os", "ad", "na", "ne", "in", "ti", "ft", "ps",
                           "RS", "RE", "so", "ds", "de", "tr", "hy", "nh", "ll", "UR", "UE", "MT", "ME",
                           "TS", "TE", "EX", "EE", "ie", "if", "el", "nr", "rm", "ig", "ss", "cs"):
                continue
            else:
                continue
        else:
            out.append(line + "\n")
    text = "".join(out)
    text = _ROFF_FONT.sub("", text)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    text = text.replace("\\\\", "\\")
    # roff fills lines; join wrapped lines of a paragraph back together
    paragraphs = [re.sub(r"\s*\n\s*", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


# ---------------------------------------------------------------------------------------
# Unicode

# Sequences that UTF-8 read as Latin-1/cp1252 leaves in French text ("Ã©" for "é", "â€™" for "’").
_MOJIBAKE = re.compile(r"[ÃÂ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013"
                       r"\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021\u2022\u2026\u2030\u2039"
                       r"\u203a\u20ac\u2122]|â€")
# C0/C1 controls except \t and \n; zero-width chars, BOM, soft hyphen, bidi controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u202a-\u202e"
                      r"\u2060-\u2064\ufeff\u00ad\ufffe\uffff]")


def fix_mojibake(text: str) -> str:
    """Repair double-encoded UTF-8 with ftfy, only where the telltale sequences appear
    (ftfy runs at ~2 MB/s; most documents need nothing)."""
    if not _MOJIBAKE.search(text):
        return text
    import ftfy

    return ftfy.fix_encoding(text)


def normalize_unicode(text: str) -> str:
    """NFC, Unix newlines, control/invisible characters removed (\\t and \\n kept;
    French non-breaking spaces U+00A0/U+202F kept)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


# ---------------------------------------------------------------------------------------
# Boilerplate lines

_BOILERPLATE_LINE = re.compile(
    r"^\W*(accepter (les|tous les) cookies|(nous )?utilisons des cookies|ce site utilise des cookies|"
    r"politique de (confidentialit[ée]|cookies)|mentions l[ée]gales|tous droits r[ée]serv[ée]s|"
    r"copyright\b|©|partager (sur|cet article)|suivez-nous|abonnez-vous|inscrivez-vous [àa] (la|notre) newsletter|"
    r"lire (la suite|aussi|plus)|en savoir plus|cliquez ici|retour (en haut|à l'accueil|au sommaire)|"
    r"se connecter|connexion|mot de passe oubli[ée]|votre navigateur|activez javascript|javascript (est )?(requis|d[ée]sactiv[ée])|"
    r"accueil\s*[>»›/]|page (pr[ée]c[ée]dente|suivante)|pr[ée]c[ée]dent\s*$|suivant\s*$|sommaire\s*$|"
    r"publi[ée] le \d|mis à jour le \d|laisser un commentaire|\d+ commentaires?\s*$|"
    r"all rights reserved|cookie policy|privacy policy|skip to (main )?content|share (on|this))",
    re.IGNORECASE)


def remove_boilerplate_lines(text: str, max_len: int = 120) -> tuple[str, int]:
    """Drop short lines that are site furniture (cookie banners, share buttons, legal footers...).
    Returns the text and how many lines were removed."""
    kept, removed = [], 0
    for line in text.split("\n"):
        if len(line) <= max_len and _BOILERPLATE_LINE.search(line):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept), removed


# ---------------------------------------------------------------------------------------
# OCR garbage

_OPEN = r"[«(\[\"'“‘]*"
_CLOSE = r"[»)\]\"'”’.,;:!?…]*"
_PLAUSIBLE = (r"(?:[^\W\d_]+(?:[-'’][^\W\d_]+)*|\d+(?:[.,:/h-]\d+)*[a-zàéè]{0,3}|[.,;:!?…—–-]+)")
# a token is garbage when it is not plausible (letters with hyphens/apostrophes, a number, punctuation),
# or when it is a run of 5+ consonants ("qrstvwx") which abbreviations are not
_GARBAGE_TOKEN = re.compile(
    rf"(?<!\S)(?:(?!{_OPEN}{_PLAUSIBLE}{_CLOSE}(?!\S))\S+"
    rf"|{_OPEN}[b-df-hj-np-tv-xzB-DF-HJ-NP-TV-XZ]{{5,}}{_CLOSE}(?!\S))")


def ocr_quality(text: str, sample_chars: int = 20_000) -> float:
    """Share of plausible words (letters with optional hyphen/apostrophe, numbers, punctuation)
    in a sample of the text: ~0.95+ for clean French prose, < 0.8 for noisy OCR."""
    sample = text[:sample_chars]
    n = len(sample.split())
    if not n:
        return 0.0
    return 1.0 - len(_GARBAGE_TOKEN.findall(sample)) / n


# Latin letters (ASCII, Latin-1, Latin Extended-A: all of French) deleted by str.translate,
# which counts letters at C speed where a per-character Python loop would dominate cleaning.
_LATIN_LETTERS = {c: None for c in range(0x250) if chr(c).isalpha()}


def remove_garbage_lines(text: str, min_letters_ratio: float = 0.5, min_len: int = 12) -> tuple[str, int]:
    """Drop lines that are mostly non-letters (OCR debris, ASCII art, page furniture such as
    '- 12 -' or '_____'). Short lines are kept (headings, list items). Letters are Latin
    letters: a line in another script counts as garbage in this French corpus."""
    kept, removed = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= min_len:
            compact = s.replace(" ", "")
            letters = len(compact) - len(compact.translate(_LATIN_LETTERS))
            if letters < min_letters_ratio * len(compact):
                removed += 1
                continue
        elif s and len(s) > 2 and not s.isdigit() and len(s.translate(_LATIN_LETTERS)) == len(s):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept), removed


# ---------------------------------------------------------------------------------------
# Foreign paragraphs (e.g. untranslated English paragraphs inside a French manual)

_FR_STOP = ("le la les de des du un une et est que qui dans pour pas sur au aux il elle ils ne se ce cette ces "
            "son sa ses par plus avec sont être été nous vous leur mais ou où lui y en à très tout comme peut "
            "fait aussi si donc dont").split()
_EN_STOP = ("the of and to in is that it for on with as are be this by an or from at which not have has was "
            "were can will would should their they there these those its into than but also been when what").split()
_FR_STOP_RE = re.compile(r"(?<![\w'])(?:" + "|".join(map(re.escape, _FR_STOP)) + r")(?![\w'])")
_EN_STOP_RE = re.compile(r"(?<![\w'])(?:" + "|".join(_EN_STOP) + r")(?![\w'])")


def drop_english_paragraphs(text: str, min_words: int = 12) -> tuple[str, int]:
    """Remove paragraphs that are clearly English (English function words outnumber French
    ones 3 to 1). Cheap enough to run on every paragraph, unlike a full language identifier."""
    kept, removed = [], 0
    for para in text.split("\n\n"):
        n_words = len(para.split())
        if n_words >= min_words:
            low = para.lower()
            en = len(_EN_STOP_RE.findall(low))
            if en >= 3 and en / n_words > 0.1 and en >= 3 * max(len(_FR_STOP_RE.findall(low)), 1):
                removed += 1
                continue
        kept.append(para)
    return "\n\n".join(kept), removed


# ---------------------------------------------------------------------------------------


@dataclass
class CleanConfig:
    fix_mojibake: bool = True
    remove_boilerplate: bool = True
    remove_garbage_lines: bool = True
    drop_english_paragraphs: bool = True


def clean_text(text: str, cfg: CleanConfig = CleanConfig(), counts: Counter | None = None) -> str:
    """The full text cleaning applied to every document (after HTML/roff conversion)."""
    counts = counts if counts is not None else Counter()
    if cfg.fix_mojibake:
        fixed = fix_mojibake(text)
        if fixed != text:
            counts["mojibake_fixed_docs"] += 1
        text = fixed
    text = normalize_unicode(text)
    if cfg.remove_boilerplate:
        text, n = remove_boilerplate_lines(text)
        counts["boilerplate_lines"] += n
    if cfg.remove_garbage_lines:
        text, n = remove_garbage_lines(text)
        counts["garbage_lines"] += n
    if cfg.drop_english_paragraphs:
        text, n = drop_english_paragraphs(text)
        counts["english_paragraphs"] += n
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def convert_markup(text: str, fmt: str) -> str:
    """Markup to text for `fmt` in {"html", "man", "text"}."""
    if fmt == "html":
        return html_to_text(text)
    if fmt == "man":
        return roff_to_text(text)
    return text


class CleanStep(PipelineStep):
    """datatrove step: markup conversion (from `metadata["format"]`) + `clean_text`.
    Documents left empty are dropped and counted as `dropped_empty_after_clean`."""

    name = "🧽 clean"
    type = "✂️ - FORMAT"

    def __init__(self, cfg: CleanConfig | None = None):
        super().__init__()
        self.cfg = cfg or CleanConfig()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: Counter = Counter()
        for doc in data:
            with self.track_time():
                fmt = doc.metadata.pop("format", "text")
                text = convert_markup(doc.text, fmt)
                doc.text = clean_text(text, self.cfg, counts)
            if not doc.text.strip():
                self.stat_update("dropped_empty_after_clean")
                self.stat_update(f"clean/{doc.metadata.get('source', '?')}/dropped_empty_after_clean")
                continue
            yield doc
        for key, value in counts.items():
            self.stat_update(key, value=value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Print the cleaned text of one file (HTML, man page or plain text, optionally compressed).",
        epilog="example: python -m training.data.clean /usr/share/doc/debian-handbook/html/fr-FR/apt.html | less",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="file to clean (.html, .txt, man page .1-.9; .gz/.zst/.xz/.bz2 accepted)")
    ap.add_argument("--format", choices=["auto", "html", "man", "text"], default="auto",
                    help="markup of the file (default: from the file name)")
    args = ap.parse_args(argv)
    from training.data.sources import detect_format, read_bytes

    fmt = detect_format(args.path) if args.format == "auto" else args.format
    raw = read_bytes(args.path).decode("utf-8", errors="replace")
    counts: Counter = Counter()
    print(clean_text(convert_markup(raw, fmt if fmt in ("html", "man") else "text"), counts=counts))
    print(f"\n--- {dict(counts)}", file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
