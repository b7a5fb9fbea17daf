"""Strings from the command line or a config turned into enum members, with one error line listing the rest."""

from __future__ import annotations

from enum import Enum

from llamaprune.core.errors import UsageError


def parse_choice(enum: type[Enum], value, name: str) -> Enum:
    """``enum(value)``, or a ValueError that lists the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise UsageError(f"{name} {value!r} is not one of: {allowed}") from None
