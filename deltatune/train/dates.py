"""Dates written in words and their ISO 8601 form, generated from the real calendar (`datetime`): every target is
correct and leap days are real. The demo teaches this rewrite; the benchmark's `dates` task scores it."""

from __future__ import annotations

import datetime as dt
import random

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
MONTHS = "January February March April May June July August September October November December".split()


def number_words(n: int) -> str:
    """0..99 in words: 42 -> 'forty-two'."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal_words(n: int) -> str:
    """1..31 as an ordinal: 21 -> 'twenty-first'."""
    words = number_words(n)
    head, _, last = words.rpartition("-")
    last = ORDINAL.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return f"{head}-{last}" if head else last


def year_words(year: int, rng: random.Random) -> str:
    """1987 -> 'nineteen eighty-seven'; 2005 -> 'two thousand five' (or 'two thousand and five')."""
    century, rest = divmod(year, 100)
    if century == 20 and (rest < 10 or rng.random() < 0.5):
        joiner = " and " if rng.random() < 0.3 else " "
        return "two thousand" + (joiner + number_words(rest) if rest else "")
    return (
        number_words(century)
        + " "
        + (number_words(rest) if rest >= 10 else f"oh {ONES[rest]}" if rest else "hundred")
    )


def date_in_words(day: dt.date, rng: random.Random) -> str:
    month, nth, year = MONTHS[day.month - 1], ordinal_words(day.day), year_words(day.year, rng)
    style = rng.randrange(3)
    if style == 0:
        return f"the {nth} of {month}, {year}"
    if style == 1:
        return f"{month} {nth}, {year}"
    return f"{month} the {nth}, {year}"


def make_dates(n: int, seed: int, exclude: set | None = None) -> list[tuple[str, str]]:
    """n distinct (words, ISO) pairs for dates between 1950 and 2049, none of them in `exclude`."""
    rng = random.Random(seed)
    start, end = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
    seen = set(exclude or ())
    pairs = []
    while len(pairs) < n:
        day = dt.date.fromordinal(rng.randint(start, end))
        if day in seen:
            continue
        seen.add(day)
        pairs.append((date_in_words(day, rng), day.isoformat()))
    return pairs
