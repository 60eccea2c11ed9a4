"""Phone numbers: the one definition of an E.164 number, for validation and for schemas.

E.164 caps a number at 15 digits, country code included. We also ask for at least 7: the
shortest numbers in service are a 3-digit country code and a 4-digit subscriber number
(Niue, Tokelau), so `+10` is a typo, not a number Twilio can call. ASCII digits only
(`[0-9]`, not `\\d`, which in Python and in pydantic's regex engine also matches other
scripts' digits), and a full match, so a trailing newline is not part of a number.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

__all__ = ["E164", "E164_PATTERN", "is_e164"]

E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"

E164 = Annotated[
    str,
    Field(
        pattern=E164_PATTERN,
        description="E.164 number: +, country code and number, 7 to 15 digits",
        examples=["+15551234567"],
    ),
]
"""A `str` that is an E.164 number, for pydantic models (the pattern shows in their schema)."""

_E164: TypeAdapter[str] = TypeAdapter(E164)


def is_e164(value: object) -> bool:
    """Whether `value` is an E.164 number, by the same rule as the `E164` type."""
    try:
        _E164.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True
