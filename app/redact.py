"""Personal data out of text: phone numbers, e-mail addresses and card numbers masked.

Used when `REDACT_PII` is on, for what leaves the call as text (transcripts, records,
webhook bodies, traces, logs); audio is never touched. Imports nothing of `app`, so any
layer may use it.

What counts (chosen to mask what a caller says or types, and not times, dates, prices,
amounts or ids):

- E-mail: `local@domain.tld` (the usual address characters, a dot in the domain).
- Card number: 13 to 19 digits, written without gaps or grouped as cards are printed
  (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4; spaces or dashes), that pass the Luhn check; a run
  failing Luhn (an order number) is left alone, and so are other groupings (two phone
  numbers in a row are not one card).
- Phone number: E.164 (`+`, or `%2B` in a URL, and 8 to 15 digits, groups separated by a
  space, dot or dash, an area code in parentheses allowed); a North American number (ten
  digits as 3-3-4 or `(3) 3-4`, separators optional, with or without a leading `1`/`+1`);
  a local 3-4 number with its separator (`555-0123`); a national number with trunk 0
  (`020 7946 0958`, `07700 900123`: 10 or 11 digits in 2 to 4 groups).
  Not: a digit run glued to letters (ids such as call SIDs), dates (`2024-11-29`), times
  (`10:30`), prices (`$1,299.99`), or a bare run of digits other than ten.

Spoken forms ("john at example dot com", "four one five ...") are not recognised: the
transcription services write numbers and addresses in the forms above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["CARD", "EMAIL", "PHONE", "keep_last_four", "luhn_valid", "redact", "scrub"]

PHONE = "[phone]"
EMAIL = "[email]"
CARD = "[card]"

# A number must not be glued to a word or another digit (ids, hex, longer runs).
_START = r"(?<![\w+])"
_END = r"(?![\w])"
_SEP = r"[ .-]"

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_CARD = re.compile(
    _START
    + r"(?:\d{13,19}"  # written without gaps
    + r"|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"  # 4-4-4-4(-3), as printed
    + r"|\d{4}([ -])\d{6}\2\d{4,5})"  # 4-6-5 (American Express), 4-6-4 (Diners)
    + _END
)
_PHONE = re.compile(
    "|".join(
        (
            # E.164: + country code (or %2B, URL-encoded), then groups (one may be a
            # parenthesised area code).
            r"(?<![\w+])(?:\+|%2[Bb])\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}" + _END,
            # North America: (415) 555-0123, 415-555-0123, 4155550123, 1 415 555 0123.
            _START + rf"(?:1{_SEP}?)?(?:\(\d{{3}}\) ?|\d{{3}}{_SEP}?)\d{{3}}{_SEP}?\d{{4}}" + _END,
            # National with trunk 0: 020 7946 0958, 07700 900123, 0612-345678.
            _START + rf"0\d{{1,4}}(?:{_SEP}\d{{2,6}}){{1,3}}" + _END,
            # Local: 555-0123 (the separator is required: a bare 7-digit run is not a phone).
            _START + rf"\d{{3}}{_SEP}\d{{4}}" + _END,
        )
    )
)
_DIGIT = re.compile(r"\D")
# The quick pre-check: every number masked has at least seven digits with at most a few
# separators between them; text without such a run and without '@' (most log lines,
# times, prices, ids whose digits letters break up) skips the patterns.
_DIGIT_RUN = re.compile(r"\d(?:[ ().+-]{0,3}\d){6}")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (the check card numbers carry)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_digits_ok(match: re.Match[str]) -> str:
    """Mask a phone candidate if its digit count is a phone's (E.164: 8 to 15)."""
    text = match.group()
    count = len(_DIGIT.sub("", text.removeprefix("%2B").removeprefix("%2b")))
    if text.startswith(("+", "%2")):
        return PHONE if 8 <= count <= 15 else text
    if text.startswith("0") and count in (10, 11):
        return PHONE
    return PHONE if count in (7, 10, 11) and not text.startswith("0") else text


def _card(match: re.Match[str]) -> str:
    text = match.group()
    return CARD if luhn_valid(_DIGIT.sub("", text)) else text


def redact(text: str) -> str:
    """`text` with each e-mail address, card number and phone number masked."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL, text)
    if not _DIGIT_RUN.search(text):
        return text
    text = _CARD.sub(_card, text)
    return _PHONE.sub(_phone_digits_ok, text)


def scrub(value: Any) -> Any:
    """`redact` applied to every string inside JSON-like data (dicts, lists, tuples);
    keys and other values are kept. Returns new containers; the input is not changed."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def keep_last_four(number: str) -> str:
    """A phone number with every digit but the last four masked: `+*******0123`."""
    digits = sum(ch.isdigit() for ch in number)
    out = []
    for ch in number:
        if ch.isdigit() and digits > 4:
            digits -= 1
            out.append("*")
        else:
            out.append(ch)
    return "".join(out)
