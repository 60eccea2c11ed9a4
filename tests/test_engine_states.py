"""Named states of the engine layer: modes parsed at the edge, the realtime breaker's
checked moves, and the engine availability that /ready reports."""

from __future__ import annotations

import enum

import pytest

from app.engines.breaker import Breaker, BreakerState
from app.engines.chained.engine import ChainedEngine
from app.engines.factory import Engines, EngineState
from app.engines.realtime import RealtimeEngine
from app.modes import Mode, UnknownMode, parse_mode
from app.states import InvalidTransition, checked
from tests.conftest import make_settings


def test_modes_parse_from_their_names_and_nothing_else() -> None:
    assert parse_mode("realtime") is Mode.REALTIME
    assert parse_mode("chained") is Mode.CHAINED
    assert parse_mode("live") is Mode.LIVE
    for bad in ("", "Realtime", "chain", "live "):
        with pytest.raises(UnknownMode, match="one of realtime, live, chained"):
            parse_mode(bad)


def test_create_makes_the_named_engine_and_refuses_a_misspelled_mode() -> None:
    engines = Engines(make_settings(together_api_key="tg-test"))
    assert isinstance(engines.create(Mode.REALTIME), RealtimeEngine)
    assert isinstance(engines.create("chained"), ChainedEngine)
    with pytest.raises(ValueError):
        engines.create("chianed")


def test_order_and_alternatives_are_modes() -> None:
    engines = Engines(make_settings(together_api_key="tg-test"))
    assert engines.order("chained") == [Mode.CHAINED, Mode.REALTIME]
    assert engines.alternatives("realtime") == [Mode.CHAINED]
    with pytest.raises(UnknownMode):
        engines.order("nope")


def test_engine_state_follows_credentials_and_the_breaker() -> None:
    now = [0.0]
    breaker = Breaker(threshold=1, cooldown=5.0, clock=lambda: now[0])
    engines = Engines(make_settings(together_api_key=None), breaker)
    assert engines.states() == {
        Mode.REALTIME: EngineState.AVAILABLE,
        Mode.LIVE: EngineState.UNCONFIGURED,
        Mode.CHAINED: EngineState.UNCONFIGURED,
    }
    engines.report("realtime", ok=False)
    assert engines.state(Mode.REALTIME) is EngineState.HELD_OFF
    assert engines.states() == {
        Mode.REALTIME: EngineState.HELD_OFF,
        Mode.LIVE: EngineState.UNCONFIGURED,
        Mode.CHAINED: EngineState.UNCONFIGURED,
    }
    now[0] = 5.0  # half-open: a probe may go, so new calls can use it again
    assert engines.state(Mode.REALTIME) is EngineState.AVAILABLE


def test_breaker_moves_closed_open_half_open_and_back() -> None:
    now = [0.0]
    breaker = Breaker(threshold=2, cooldown=10.0, clock=lambda: now[0])
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    now[0] = 5.0
    breaker.failure()  # a late failure while open starts the cool-down again
    now[0] = 14.0
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 15.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe
    breaker.failure()  # the probe failed: open again, for a full cool-down
    assert breaker.state is BreakerState.OPEN
    now[0] = 25.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()  # counting starts over
    assert breaker.state is BreakerState.CLOSED


def test_a_success_while_open_closes_the_breaker() -> None:
    """A call that was already on realtime when the breaker opened may still succeed."""
    breaker = Breaker(threshold=1, cooldown=10.0, clock=lambda: 0.0)
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_a_move_outside_the_table_raises() -> None:
    class Light(enum.Enum):
        RED = 1
        GREEN = 2

    moves = {Light.RED: frozenset({Light.GREEN}), Light.GREEN: frozenset[Light]()}
    assert checked("light", Light.RED, Light.GREEN, moves) is Light.GREEN
    with pytest.raises(InvalidTransition, match="light: GREEN -> RED"):
        checked("light", Light.GREEN, Light.RED, moves)
