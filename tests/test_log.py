"""Log lines as an operator reads them: tracebacks in both formats, secrets never."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog

from app import log
from app.config import Settings

SECRETS = {
    "twilio_auth_token": "twilio-auth-0123456789",
    "realtime_api_key": "sk-realtime-abcdef",
    "together_api_key": 'tg-key-with-"quote"',
    "admin_token": "admin-bearer-xyz",
    "stream_token_secret": "stream-secret-987",
}


@pytest.fixture
def configured() -> Iterator[Callable[[str, Settings], io.StringIO]]:
    """Configure logging into a buffer; the previous configuration comes back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(fmt: str, settings: Settings) -> io.StringIO:
        out = io.StringIO()
        log.configure(fmt, "DEBUG", secrets=settings.secret_values(), stream=out)
        return out

    yield configure
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_everything() -> None:
    """Lines that carry the secrets every way a line can."""
    key, quoted = SECRETS["realtime_api_key"], SECRETS["together_api_key"]
    logger = structlog.get_logger("test")
    logger.warning(f"provider echoed {key}")  # in the event text
    logger.warning("provider.error", message=f"Incorrect API key provided: {key}")  # a value
    logger.warning("nested", detail={"body": [f"token={SECRETS['admin_token']}"]})
    logger.warning("quoted", detail=f"key {quoted} refused")  # escaped by the renderer
    logger.warning("by_name", authorization="Bearer whatever")  # masked by its name
    try:
        raise RuntimeError(f"401 for {SECRETS['twilio_auth_token']}")
    except RuntimeError:
        logger.exception("structlog.failed")
        logging.getLogger("aiohttp.server").exception(
            "stdlib failed with %s", SECRETS["stream_token_secret"]
        )


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_value_reaches_a_line(
    configured: Callable[[str, Settings], io.StringIO],
    settings_factory: Callable[..., Settings],
    fmt: str,
) -> None:
    settings = settings_factory(**SECRETS)
    out = configured(fmt, settings)
    _log_everything()
    text = out.getvalue()
    assert text.count("\n") >= 7
    for name, secret in SECRETS.items():
        assert secret not in text, name
        assert json.dumps(secret)[1:-1] not in text, name
        assert repr(secret)[1:-1] not in text, name
    assert "Bearer whatever" not in text
    assert text.count(log.MASK) >= 7
    assert "provider echoed ***" in text


def test_json_lines_carry_tracebacks_from_structlog_and_the_standard_library(
    configured: Callable[[str, Settings], io.StringIO],
    settings_factory: Callable[..., Settings],
) -> None:
    out = configured("json", settings_factory(**SECRETS))
    _log_everything()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = {line["event"]: line for line in lines if "failed" in line["event"]}
    assert set(failed) == {"structlog.failed", "stdlib failed with ***"}
    for line in failed.values():
        assert "exc_info" not in line
        assert line["exception"].startswith("Traceback (most recent call last):")
        assert "RuntimeError: 401 for ***" in line["exception"]
        assert "_log_everything" in line["exception"]


def test_console_lines_carry_tracebacks_from_the_standard_library(
    configured: Callable[[str, Settings], io.StringIO],
    settings_factory: Callable[..., Settings],
) -> None:
    out = configured("console", settings_factory(**SECRETS))
    _log_everything()
    text = out.getvalue()
    assert text.count("Traceback (most recent call last):") == 2
    assert text.count("RuntimeError: 401 for ***") == 2


def test_secret_values_are_every_secret_setting(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(**SECRETS)
    assert set(settings.secret_values()) == set(SECRETS.values())
    with_redis = settings_factory(redis_url="redis://:redis-pass-42@cache:6379/0")
    assert "redis-pass-42" in with_redis.secret_values()
    assert settings_factory(realtime_api_key="").secret_values() == []


def test_short_values_are_not_masked(
    configured: Callable[[str, Settings], io.StringIO],
    settings_factory: Callable[..., Settings],
) -> None:
    """A three-character 'secret' would blank ordinary words; it is not one."""
    out = configured("json", settings_factory(admin_token="abc"))
    structlog.get_logger("test").info("abc is the alphabet's start")
    assert "abc is the alphabet" in out.getvalue()
