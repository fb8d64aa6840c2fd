"""Normalisers and WER/CER on fixed strings with known values."""

from __future__ import annotations

import pytest

pytest.importorskip("jiwer")

from training.evaluate import error_rates
from training.textnorm import (
    canonical_uz_apostrophes,
    normalize_ru,
    normalize_uz,
    uz_cyrillic_to_latin,
    uz_latin_to_cyrillic,
)


def test_russian_case_punctuation_yo_and_numbers() -> None:
    assert normalize_ru("Ёлка, ЁЖ — «Привет»!") == "елка еж привет"
    assert normalize_ru("В 2024 году") == "в две тысячи двадцать четыре году"
    assert normalize_ru("21 рубль") == "двадцать один рубль"
    assert normalize_ru("3,5 кг") == "три целых пять десятых кг"
    assert normalize_ru("1 000 рублей") == normalize_ru("1000 рублей")


def test_uzbek_apostrophe_variants_are_one_letter() -> None:
    variants = ["Oʻzbekiston", "O'zbekiston", "O‘zbekiston", "O’zbekiston", "O`zbekiston", "Oʼzbekiston"]
    assert {normalize_uz(v) for v in variants} == {"o'zbekiston"}
    assert normalize_uz("G‘alaba, ma’lumot!") == "g'alaba ma'lumot"
    assert normalize_uz("'salom' dedi") == "salom dedi"  # quotes at word edges are not letters


def test_uzbek_cyrillic_and_latin_score_the_same() -> None:
    assert normalize_uz("Ўзбекистон гўзал, ғалаба!") == "o'zbekiston go'zal g'alaba"
    assert uz_cyrillic_to_latin("Ер ва тешик") == "Yer va teshik"  # е: ye at a word's start, e inside
    assert uz_cyrillic_to_latin("Маълумот") == "Ma'lumot"
    assert normalize_uz("Шаҳар ҳовлиси") == normalize_uz("Shahar hovlisi")
    assert uz_latin_to_cyrillic("Oʻzbekiston goʻzal, shahar, ertaga") == "Ўзбекистон гўзал, шаҳар, эртага"


def test_canonical_apostrophes_for_training_text() -> None:
    assert canonical_uz_apostrophes("O'zbekiston g`alaba ma'no") == "O\u02bbzbekiston g\u02bbalaba ma\u02bcno"


def test_wer_and_cer_known_values() -> None:
    # one substitution and one deletion over four words; one substitution over four letters
    assert error_rates(["a b c d"], ["a x c"], "uz") == (0.5, pytest.approx(3 / 7))
    assert error_rates(["abcd"], ["abxd"], "uz")[1] == 0.25
    # corpus-level: 1 error over 2 + 3 reference words
    wer, _ = error_rates(["Привет, мир!", "Ваш заказ готов."], ["привет мир", "ваш заказ не готов"], "ru")
    assert wer == pytest.approx(1 / 5)
    # normalisation first: only case, punctuation, ё and script differ, so no error
    assert error_rates(["Ёж пришёл в 5 часов."], ["еж пришел в пять часов"], "ru") == (0.0, 0.0)
    assert error_rates(["Oʻzbekiston gʻalaba"], ["Ўзбекистон ғалаба"], "uz") == (0.0, 0.0)


def test_empty_reference_is_refused() -> None:
    with pytest.raises(ValueError):
        error_rates(["!!!"], ["x"], "ru")
