"""Engine order and breakers with the live engine: ENGINE_ORDER, keys, one breaker each."""

from __future__ import annotations

from app.engines.breaker import Breaker
from app.engines.factory import Engines, EngineState
from app.engines.live import LiveEngine
from app.modes import Mode
from tests.conftest import make_settings

ALL_KEYS = {"live_api_key": "sk-live", "together_api_key": "tg-test"}


def test_calls_start_on_their_mode_then_follow_engine_order() -> None:
    engines = Engines(make_settings(**ALL_KEYS))
    assert engines.order("live") == [Mode.LIVE, Mode.REALTIME, Mode.CHAINED]
    assert engines.order("realtime") == [Mode.REALTIME, Mode.LIVE, Mode.CHAINED]
    assert engines.alternatives("live") == [Mode.REALTIME, Mode.CHAINED]
    assert engines.alternatives("realtime") == [Mode.LIVE, Mode.CHAINED]
    assert isinstance(engines.create("live"), LiveEngine)


def test_engine_order_is_a_setting_filtered_to_engines_with_keys() -> None:
    engines = Engines(make_settings(engine_order="chained, live", **ALL_KEYS))
    assert engines.order("realtime") == [Mode.REALTIME, Mode.CHAINED, Mode.LIVE]
    assert engines.alternatives("realtime") == [Mode.CHAINED, Mode.LIVE]
    no_live = Engines(make_settings(together_api_key="tg-test"))
    assert no_live.order("live") == [Mode.REALTIME, Mode.CHAINED]
    assert no_live.states()[Mode.LIVE] is EngineState.UNCONFIGURED


def test_each_engine_has_its_own_breaker() -> None:
    now = [0.0]
    engines = Engines(make_settings(**ALL_KEYS))
    engines.breakers[Mode.LIVE] = Breaker(threshold=1, cooldown=5.0, clock=lambda: now[0])
    engines.report("live", ok=False)
    assert engines.states() == {
        Mode.REALTIME: EngineState.AVAILABLE,
        Mode.LIVE: EngineState.HELD_OFF,
        Mode.CHAINED: EngineState.AVAILABLE,
    }
    assert engines.order("live") == [Mode.REALTIME, Mode.CHAINED]
    now[0] = 5.0  # half-open: one call probes live again
    assert engines.order("live") == [Mode.LIVE, Mode.REALTIME, Mode.CHAINED]
    assert engines.order("live") == [Mode.REALTIME, Mode.CHAINED]
    engines.report("live", ok=True)
    assert engines.state("live") is EngineState.AVAILABLE


def test_when_every_breaker_is_open_the_last_engine_is_still_tried() -> None:
    engines = Engines(make_settings(**ALL_KEYS))
    for mode in Mode:
        engines.breakers[mode] = Breaker(threshold=1, cooldown=60.0, clock=lambda: 0.0)
        engines.report(mode, ok=False)
    assert engines.order("realtime") == [Mode.CHAINED]
