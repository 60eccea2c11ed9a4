"""Shared fixtures: settings for tests and the service on 127.0.0.1."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.config import Settings
from app.server import create_app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "audio"


def make_settings(**overrides: Any) -> Settings:
    """Settings that never read the developer's `.env` and point at nothing real."""
    values: dict[str, Any] = {
        "prompts_dir": ROOT / "prompts",
        "vad_model_path": ROOT / "silero_vad.onnx",
        "realtime_api_key": "sk-test-realtime",
        "realtime_url": "ws://127.0.0.1:9/v1/realtime",
        "together_base_url": "http://127.0.0.1:9/v1",
        "realtime_connect_timeout": 2.0,
        # Calls a test drives are recorded out of the working tree.
        "archive_dir": Path(tempfile.gettempdir()) / "phone-agent-tests" / "calls",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Settings], Any]]:
    """Start the service with given settings; every server is closed after the test."""
    servers: list[TestServer] = []

    async def start(settings: Settings) -> TestServer:
        app: web.Application = create_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
