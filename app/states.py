"""Checked transitions for the small state machines of the service (barge-in, breaker,
steers): a move the table does not allow is a bug, raised where it happens instead of
leaving the machine in a state nobody designed for."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

__all__ = ["InvalidTransition", "checked"]

S = TypeVar("S", bound=Enum)


class InvalidTransition(RuntimeError):
    """A state machine was asked for a move its transition table does not allow."""


def checked(machine: str, current: S, new: S, allowed: Mapping[S, frozenset[S]]) -> S:
    """`new`, if `allowed` lets `machine` move there from `current`; else raise."""
    if new not in allowed[current]:
        raise InvalidTransition(f"{machine}: {current.name} -> {new.name} is not a valid move")
    return new
