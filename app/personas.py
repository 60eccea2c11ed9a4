"""Personas: one TOML file per agent in PROMPTS_DIR, written for the ear.

A persona may declare business tools (`[[tools]]`, `[[mcp_servers]]`, see
`app.tools.declarations`); a bad declaration is a `PersonaError` at start-up. The
`${NAME}` their URLs and headers name are read as the settings are: the environment,
then `.env` in the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from app.phone import is_e164
from app.tools.declarations import DeclarationError, Toolbox, parse_toolbox

__all__ = ["Persona", "PersonaError", "load_personas"]


@dataclass(frozen=True, slots=True)
class Persona:
    """Who the agent is on a call."""

    name: str
    voice: str
    greeting: str
    instructions: str
    tts_voice: str | None = None
    transfer_numbers: tuple[str, ...] = ()
    tools: Toolbox = field(default_factory=Toolbox)
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    voicemail_message: str = ""  # left on an answering machine (outbound calls), after the beep

    def instructions_on(self, when: float) -> str:
        """The instructions for a call at `when` (unix seconds): `{today}` becomes that
        day in the persona's `timezone`, so a model booking by date knows the date."""
        day = datetime.fromtimestamp(when, self.timezone)
        return self.instructions.replace(
            "{today}", f"{day:%A}, {day:%B} {day.day}, {day.year} ({day:%Y-%m-%d})"
        )


class PersonaError(ValueError):
    """A persona file is missing or malformed."""


def load_personas(directory: Path) -> dict[str, Persona]:
    """Read every `*.toml` persona in `directory`; any defect stops start-up."""
    if not directory.is_dir():
        raise PersonaError(f"PROMPTS_DIR {directory} is not a directory")
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None} | dict(os.environ)
    personas: dict[str, Persona] = {}
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            personas[path.stem] = Persona(
                name=path.stem,
                voice=str(data["voice"]),
                greeting=str(data["greeting"]).strip(),
                instructions=str(data["instructions"]).strip(),
                tts_voice=str(data["tts_voice"]) if "tts_voice" in data else None,
                transfer_numbers=_numbers(path, data.get("transfer_numbers", [])),
                tools=parse_toolbox(data, env),
                timezone=_zone(path, data.get("timezone", "UTC")),
                voicemail_message=str(data.get("voicemail_message", "")).strip(),
            )
        except DeclarationError as exc:
            raise PersonaError(f"persona file {path}: {exc}") from None
        except (tomllib.TOMLDecodeError, KeyError, OSError) as exc:
            raise PersonaError(f"persona file {path} is invalid: {exc!r}") from exc
    if not personas:
        raise PersonaError(f"no persona files (*.toml) in {directory}")
    return personas


def _numbers(path: Path, numbers: object) -> tuple[str, ...]:
    """A persona's transfer numbers, each E.164 (`app.phone`), or the file is refused."""
    if not isinstance(numbers, list) or not all(is_e164(n) for n in numbers):
        raise PersonaError(f"persona file {path}: transfer_numbers must be E.164: {numbers!r}")
    return tuple(numbers)


def _zone(path: Path, name: object) -> ZoneInfo:
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise PersonaError(f"persona file {path}: timezone: unknown time zone {name!r}") from None
