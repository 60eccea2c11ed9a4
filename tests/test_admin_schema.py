"""The admin API's door and its contract: empty tokens, and the OpenAPI document held against
the served API by a property-based run (schemathesis) beside a live call.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.personas import PersonaError, load_personas
from app.phone import E164_PATTERN, is_e164
from app.server import create_app
from tests.admin_rig import (
    ADMIN,
    GREETING,
    FakeTwilioCalls,
    Instance,
    admin_settings,
    silence,
    wait_until,
)
from tests.conftest import make_settings
from tests.fakes.realtime import FakeRealtime
from tests.fakes.together import FakeTogether
from tests.fakes.twilio_rest import TOKEN

Serve = Callable[[Settings], Awaitable[TestServer]]


async def status_of(
    server: TestServer, method: str, path: str, headers: dict[str, str], body: Any = None
) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.make_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status


# -- the token -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "   "])
async def test_an_empty_admin_token_keeps_the_api_hidden(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", token)  # an empty line in .env
    server = await serve(make_settings())
    for auth in ("Bearer ", "Bearer", f"Bearer {token}", "Bearer x", None):
        headers = {} if auth is None else {"Authorization": auth}
        assert await status_of(server, "GET", "/admin/calls", headers) == 404, auth
        dial = {"to": "+15551234567"}
        assert await status_of(server, "POST", "/admin/dial", headers, dial) == 404, auth


async def test_an_empty_bearer_is_never_accepted(serve: Serve) -> None:
    server = await serve(make_settings(admin_token=ADMIN))
    for auth in ("Bearer ", "Bearer", "Bearer \t ", "bearer  ", " Bearer ", f"Bearer  {ADMIN}é"):
        status = await status_of(server, "GET", "/admin/calls", {"Authorization": auth})
        assert status == 401, auth
    for auth in (f"Bearer {ADMIN}", f"bearer {ADMIN}", f"Bearer  {ADMIN} "):
        assert await status_of(server, "GET", "/admin/calls", {"Authorization": auth}) == 200


# -- one E.164 rule ------------------------------------------------------------------------


def test_one_e164_rule_for_the_api_and_the_cli() -> None:
    from app.admin.dial import DialRequest, DialRequestError

    for number in ("+15551234567", "+6834002", "+123456789012345"):
        assert is_e164(number)
        assert DialRequest.parse(number).to == number
    for bad in (
        "+10",
        "+123456",
        "+1234567890123456",
        "15551234567",
        "+05551234567",
        "+1555123456\n",
        "+1555\u0661\u0662\u06634567",  # Arabic-Indic digits
        " +15551234567",
        15551234567,
    ):
        assert not is_e164(bad), bad
        with pytest.raises(DialRequestError):
            DialRequest.parse(bad)


@pytest.mark.parametrize(
    "numbers", ['["+10"]', '["+15551234567\\n"]', "[15551234567]", '"+15551234567"']
)
def test_a_persona_transfer_number_follows_the_same_rule(tmp_path: Path, numbers: str) -> None:
    persona = 'voice = "marin"\ngreeting = "Hi."\ninstructions = "Help."\n'
    (tmp_path / "ok.toml").write_text(persona + 'transfer_numbers = ["+15550100200"]\n')
    assert load_personas(tmp_path)["ok"].transfer_numbers == ("+15550100200",)
    (tmp_path / "bad.toml").write_text(persona + f"transfer_numbers = {numbers}\n")
    with pytest.raises(PersonaError, match="transfer_numbers"):
        load_personas(tmp_path)


async def test_the_document_states_the_rules(serve: Serve) -> None:
    server = await serve(make_settings(admin_token=ADMIN))
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            server.make_url("/admin/openapi.json"), headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp,
    ):
        doc = await resp.json()
    models = doc["components"]["schemas"]
    dial = models["DialBody"]["properties"]
    assert dial["to"]["pattern"] == E164_PATTERN
    assert dial["from"]["anyOf"][0]["pattern"] == E164_PATTERN
    assert models["TransferBody"]["properties"]["to"]["pattern"] == E164_PATTERN
    personas = dial["persona"]["anyOf"][0]["enum"]
    assert personas == sorted(p.stem for p in make_settings().prompts_dir.glob("*.toml"))
    mode = {"$ref": "#/components/schemas/Mode"}
    assert dial["mode"]["anyOf"][0] == models["ModeBody"]["properties"]["mode"] == mode
    assert models["Mode"]["enum"] == ["realtime", "live", "chained"]
    steer = models["SteerBody"]
    assert steer["properties"]["instructions"]["anyOf"][0]["minLength"] == 1
    assert [a["required"] for a in steer["anyOf"]] == [["instructions"], ["voice"]]
    assert "partial" in models["CallList"]["required"]
    sid = doc["paths"]["/admin/calls/{call_sid}/steer"]["post"]["parameters"][0]["schema"]
    ids = ("CA" + "0" * 32, "0bd2b5f0-2ae1-4c1f-9e5f-7f9d0a2b3c4d", "v3:abcdefgh_-ijklm")
    assert all(re.fullmatch(sid["pattern"], i) for i in ids)  # Twilio, Plivo/SignalWire, Telnyx
    assert not any(re.fullmatch(sid["pattern"], i) for i in ("CA1", "../etc", "v3:a b"))


# -- the document against the API ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def live_service() -> AsyncIterator[tuple[Instance, str, FakeTwilioCalls]]:
    """A service with every provider faked (so any valid request can succeed) and one live
    call, which outlasts the test."""
    async with AsyncExitStack() as stack:
        realtime = await stack.enter_async_context(FakeRealtime(reply_audio=GREETING[:4000]))
        together = await stack.enter_async_context(FakeTogether())
        twilio = await stack.enter_async_context(FakeTwilioCalls())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        port = free_port()  # PUBLIC_URL (for dialling) is the address Twilio's requests reach
        values = admin_settings(realtime, together, twilio)
        values.update(public_url=f"http://127.0.0.1:{port}", twilio_from_number="+15550009999")
        server = TestServer(create_app(make_settings(**values)), host="127.0.0.1", port=port)
        await server.start_server()
        stack.push_async_callback(server.close)
        service = Instance(server, http, TOKEN)
        live = await service.call(silence(60_000), tail_s=0)
        yield service, live.sid, twilio
        await live.twilio_ends_stream()
        await wait_until(  # before the fakes stop under sockets still closing
            lambda: (
                not service.calls and realtime.open_connections == 0 and together.open_sockets == 0
            ),
            what="the call and its sockets to close",
        )


def _documented(case: schemathesis.Case, status: int) -> bool:
    return str(status) in case.operation.definition.raw["responses"]


async def test_no_valid_request_is_refused_and_no_undocumented_5xx(
    live_service: tuple[Instance, str, FakeTwilioCalls],
) -> None:
    service, sid, twilio = live_service
    status, doc = await service.api("GET", "/admin/openapi.json")
    assert status == 200
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    # The event stream never ends by itself: tests/test_events.py holds it to its document.
    operations = [op for op in operations if not op.path.endswith("/events")]
    strategies = [op.as_strategy() for op in operations]
    # The live call, as often as an unknown one; what ends it (hang-up, transfer) comes last.
    on_call = sorted(
        (op for op in operations if "{call_sid}" in op.path),
        key=lambda op: op.path.endswith(("/hangup", "/transfer")),
    )
    strategies += [op.as_strategy(path_parameters={"call_sid": sid}) for op in on_call]
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    auth = {"Authorization": f"Bearer {ADMIN}"}

    def check(case: schemathesis.Case) -> None:
        with requests.Session() as session:
            response = case.call(base_url=service.url, headers=auth, session=session, timeout=10)
        code = response.status_code
        seen[(f"{case.method} {case.operation.path}", code)] += 1
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
            headers=auth,
        )
        unknown_call = code == 404 and case.path_parameters.get("call_sid") != sid
        assert 200 <= code < 300 or unknown_call or (code == 503 and _documented(case, code)), (
            case.method,
            case.formatted_path,
            case.body,
            code,
            response.text,
        )

    # Each operation gets its own examples, so a route added to the document is always
    # exercised (one draw over all of them can leave a route out as the schema grows).
    settings = hypothesis.settings(
        max_examples=10,
        deadline=None,
        derandomize=True,  # the same run every time: a failure is reproducible
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )

    def run() -> None:
        for strategy in strategies:
            settings(hypothesis.given(strategy)(check))()

    await asyncio.to_thread(run)
    succeeded = {op for (op, code) in seen if 200 <= code < 300}
    assert succeeded == {f"{op.method.upper()} {op.path}" for op in operations}, seen
    assert twilio.placed and twilio.rest.updates  # dials, hang-ups and transfers reached Twilio
