"""Text normalisers for scoring (WER/CER) and the canonical Uzbek apostrophes for training text.

Russian (:func:`normalize_ru`): lower case, ``ё`` -> ``е``, numbers spelled out (num2words), punctuation
and dashes removed. Uzbek (:func:`normalize_uz`): the apostrophe variants of ``oʻ``/``gʻ`` and of the
tutuq belgisi unified, Cyrillic transliterated to Latin (the 1995 official alphabet), lower case,
punctuation removed. A judge that writes Uzbek in either script, with any apostrophe, scores the same.
The transliteration is written here (a table and two context rules): no maintained library does Uzbek.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

# Every character used for the oʻ/gʻ sign or the tutuq belgisi in the wild.
APOSTROPHES = "'\u02bb\u02bc\u2018\u2019\u0060\u00b4\u02b9\u02bd\u02c8\u055a\u2032"
OKINA = "\u02bb"  # ʻ: oʻ, gʻ (official)
TUTUQ = "\u02bc"  # ʼ: the tutuq belgisi (official)
_APOS_RE = re.compile(f"[{re.escape(APOSTROPHES)}]")

_CYR_TO_LAT = {
    "а": "a", "б": "b", "в": "v", "г": "g", "ғ": "g'", "д": "d", "ж": "j", "з": "z", "и": "i", "й": "y",
    "к": "k", "қ": "q", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t",
    "у": "u", "ў": "o'", "ф": "f", "х": "x", "ҳ": "h", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "sh",
    "ъ": "'", "ь": "", "э": "e", "ю": "yu", "я": "ya", "ё": "yo", "ы": "i",
}
_VOWELS_CYR = set("аеёиоуўэюяы")
_LAT_TO_CYR = [  # longest first
    ("o'", "ў"), ("g'", "ғ"), ("sh", "ш"), ("ch", "ч"), ("yo", "ё"), ("yu", "ю"), ("ya", "я"), ("ye", "е"),
    ("ts", "ц"), ("a", "а"), ("b", "б"), ("d", "д"), ("e", "е"), ("f", "ф"), ("g", "г"), ("h", "ҳ"),
    ("i", "и"), ("j", "ж"), ("k", "к"), ("l", "л"), ("m", "м"), ("n", "н"), ("o", "о"), ("p", "п"),
    ("q", "қ"), ("r", "р"), ("s", "с"), ("t", "т"), ("u", "у"), ("v", "в"), ("x", "х"), ("y", "й"),
    ("z", "з"), ("'", "ъ"),
]


def _strip_punctuation(text: str, keep: str = "") -> str:
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in keep:
            out.append(ch)
        elif cat.startswith("P") or cat.startswith("S"):
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _spell_numbers_ru(text: str) -> str:
    from num2words import num2words

    def spell(match: re.Match[str]) -> str:
        whole, frac = match.group(1), match.group(2)
        if frac:
            return f" {num2words(float(whole + '.' + frac), lang='ru')} "
        return f" {num2words(int(whole), lang='ru')} "

    # "1 000" and "1\u00a0000" are one number in Russian typography; "3,5" is a decimal.
    text = re.sub(r"(?<=\d)[ \u00a0\u202f](?=\d{3}\b)", "", text)
    return re.sub(r"(\d+)(?:[.,](\d+))?", spell, text)


def normalize_ru(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower().replace("ё", "е")
    text = _spell_numbers_ru(text).replace("ё", "е")
    return " ".join(_strip_punctuation(text).split())


def uz_cyrillic_to_latin(text: str) -> str:
    """Uzbek Cyrillic -> Latin (``oʻ``/``gʻ`` written with ``'``); ``е`` is ``ye`` at the start of a word and
    after a vowel, ``e`` elsewhere; capitals follow the source letter."""
    out = []
    for i, ch in enumerate(text):
        low = ch.lower()
        if low == "е":
            prev = text[i - 1].lower() if i else " "
            lat = "ye" if (not prev.isalpha() or prev in _VOWELS_CYR or prev in "ъь") else "e"
        elif low in _CYR_TO_LAT:
            lat = _CYR_TO_LAT[low]
        else:
            out.append(ch)
            continue
        out.append(lat.capitalize() if ch != low and lat else lat)
    return "".join(out)


def uz_latin_to_cyrillic(text: str) -> str:
    """Uzbek Latin -> Cyrillic, best effort (``e`` at the start of a word is ``э``)."""
    text = unify_apostrophes(text)
    out, i = [], 0
    while i < len(text):
        for lat, cyr in _LAT_TO_CYR:
            chunk = text[i: i + len(lat)]
            if chunk.lower() == lat:
                if lat == "e" and (i == 0 or not text[i - 1].isalpha()):
                    cyr = "э"
                out.append(cyr.upper() if chunk[0].isupper() else cyr)
                i += len(lat)
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def unify_apostrophes(text: str) -> str:
    return _APOS_RE.sub("'", text)


def canonical_uz_apostrophes(text: str) -> str:
    """Training text: ``oʻ``/``gʻ`` with U+02BB, the tutuq belgisi with U+02BC, whatever the source typed."""
    text = unify_apostrophes(text)
    text = re.sub(r"(?<=[oOgG])'(?=\w)", OKINA, text)
    return re.sub(r"(?<=\w)'(?=\w)", TUTUQ, text)


def normalize_uz(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = uz_cyrillic_to_latin(text).lower()
    text = unify_apostrophes(text)
    text = _strip_punctuation(text, keep="'")
    # an apostrophe is a letter only between letters (oʻzbek, maʼno); quotes at word edges go
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return " ".join(text.split())


NORMALIZERS: dict[str, Callable[[str], str]] = {"ru": normalize_ru, "uz": normalize_uz}


def normalize(text: str, language: str) -> str:
    return NORMALIZERS[language](text)
