"""Tools declared in a persona file: what loads, and the one clear start-up error for
what cannot work (through `load_personas` and the `serve` command)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.__main__ import main
from app.personas import PersonaError, load_personas
from tests.conftest import ROOT

PERSONA = """
voice = "coral"
greeting = "Hello."
instructions = "Help."
"""

TOOL = """
[[tools]]
name = "{name}"
description = "Look an order up."
url = "{url}"
{extra}

[tools.parameters]
type = "object"
required = ["order"]
[tools.parameters.properties.order]
type = "{kind}"
"""


def write(directory: Path, body: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "shop.toml").write_text(PERSONA + body)
    return directory


def tool(
    name: str = "lookup_order",
    url: str = "https://shop.example/tools/lookup",
    extra: str = "",
    kind: str = "string",
) -> str:
    return TOOL.format(name=name, url=url, extra=extra, kind=kind)


def test_a_declared_tool_loads_with_its_env_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_TOKEN", "shop-secret-value")
    monkeypatch.setenv("SHOP_BASE", "https://api.shop.example")
    extra = "\n".join(
        [
            "timeout_ms = 1500",
            'filler = "Checking."',
            'headers = { Authorization = "Bearer ${SHOP_TOKEN}" }',
        ]
    )
    body = tool(url="${SHOP_BASE}/lookup", extra=extra) + tool(
        name="other", url="${SHOP_MISSING:-http://127.0.0.1:8090}/other"
    )
    persona = load_personas(write(tmp_path, body))["shop"]
    lookup, other = persona.tools.http
    assert lookup.url == "https://api.shop.example/lookup"
    assert dict(lookup.headers) == {"Authorization": "Bearer shop-secret-value"}
    assert (lookup.timeout_ms, lookup.filler, lookup.method) == (1500, "Checking.", "POST")
    assert other.url == "http://127.0.0.1:8090/other"
    assert other.filler == persona.tools.filler  # the persona's default filler
    # Only what went into headers is a secret; a repr never shows them.
    assert persona.tools.secrets == {"shop-secret-value"}
    assert "shop-secret-value" not in repr(persona)


def test_mcp_servers_load(tmp_path: Path) -> None:
    body = """
[[mcp_servers]]
url = "http://127.0.0.1:8090/mcp"
allowed_tools = ["check_availability"]
"""
    (server,) = load_personas(write(tmp_path, body))["shop"].tools.mcp
    assert server.allowed_tools == {"check_availability"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (tool(kind="strin"), "tool 'lookup_order': not a JSON Schema at properties/order/type"),
        (tool(name="end_call"), "'end_call' is a built-in tool of every call"),
        (tool(name="transfer_call"), "'transfer_call' is a built-in tool of every call"),
        (tool(name="look up"), "name must be 1-64 letters, digits, _ or -"),
        (
            tool(extra='headers = { Authorization = "Bearer ${SHOP_TOKEN_UNSET}" }'),
            "header Authorization: environment variable SHOP_TOKEN_UNSET is not set",
        ),
        (tool(url="ftp://shop.example/x"), "url must be http:// or https://"),
        (tool(extra="timeout_ms = 0"), "timeout_ms must be an integer"),
        (tool(extra='method = "GET"'), "method must be one of PATCH, POST, PUT"),
        (tool(extra='retries = 3'), "unknown key(s) retries"),
        (tool() + tool(), "declared twice: lookup_order"),
        ('[[mcp_servers]]\nurl = "http://h/mcp"\nallowed_tools = ["end_call"]', "built-in"),
    ],
    ids=[
        "not-json-schema", "end_call", "transfer_call", "bad-name", "missing-env",
        "bad-url", "timeout", "method", "unknown-key", "duplicate", "mcp-clash",
    ],
)  # fmt: skip
def test_a_bad_declaration_is_one_clear_error(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(PersonaError) as raised:
        load_personas(write(tmp_path, body))
    text = str(raised.value)
    assert "shop.toml" in text and message in text
    assert "\n" not in text


def test_a_parameters_schema_must_describe_an_object(tmp_path: Path) -> None:
    body = tool().replace('type = "object"', 'type = "array"')
    with pytest.raises(PersonaError, match='parameters must have "type": "object"'):
        load_personas(write(tmp_path, body))


def test_serve_stops_at_start_with_the_error_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator reads one line naming the file, the tool and the variable."""
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("REALTIME_API_KEY", "sk-test")
    monkeypatch.setenv("VAD_MODEL_PATH", str(ROOT / "silero_vad.onnx"))
    monkeypatch.setenv("PROMPTS_DIR", str(write(tmp_path / "prompts", tool(kind="strin"))))
    monkeypatch.setenv("PERSONA", "shop")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "configuration error" in err[0] and "shop.toml" in err[0] and "lookup_order" in err[0]


def test_the_shipped_personas_load_without_clinic_settings() -> None:
    """The receptionist's clinic URL has a default: no setting is needed to start."""
    personas = load_personas(ROOT / "prompts")
    names = [t.name for t in personas["receptionist"].tools.http]
    assert names == [
        "check_availability",
        "book_appointment",
        "find_appointment",
        "move_appointment",
        "cancel_appointment",
    ]
    assert all(not p.tools for name, p in personas.items() if name != "receptionist")


def test_variables_come_from_the_environment_then_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the settings: `.env` in the working directory, the environment first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SHOP_TOKEN=from-dotenv\nSHOP_BASE=https://dotenv.example\n")
    monkeypatch.setenv("SHOP_BASE", "https://environment.example")
    extra = 'headers = { Authorization = "Bearer ${SHOP_TOKEN}" }'
    persona = load_personas(write(tmp_path / "p", tool(url="${SHOP_BASE}/x", extra=extra)))
    (declared,) = persona["shop"].tools.http
    assert declared.url == "https://environment.example/x"
    assert dict(declared.headers) == {"Authorization": "Bearer from-dotenv"}


def test_today_in_the_instructions_is_the_date_in_the_personas_time_zone(tmp_path: Path) -> None:
    """A model booking by date must know the date: `{today}` at the call's start, where
    the business is (01:30 UTC on 8 January is still the 7th in New York)."""
    body = 'timezone = "America/New_York"\n' + PERSONA.replace("Help.", "Today is {today}.")
    (tmp_path / "clinic.toml").write_text(body)
    persona = load_personas(tmp_path)["clinic"]
    when = datetime(2030, 1, 8, 1, 30, tzinfo=UTC).timestamp()
    assert persona.instructions_on(when) == "Today is Monday, January 7, 2030 (2030-01-07)."
    receptionist = load_personas(ROOT / "prompts")["receptionist"]
    assert "Today is Monday, January 7, 2030 (2030-01-07)." in receptionist.instructions_on(when)


def test_an_unknown_time_zone_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "clinic.toml").write_text('timezone = "Mars/Olympus"\n' + PERSONA)
    with pytest.raises(PersonaError, match=r"clinic\.toml: timezone: unknown time zone"):
        load_personas(tmp_path)
