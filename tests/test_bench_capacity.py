"""bench.capacity: what a caller hears from the arrival times of the agent's audio, and
the benchmark's core at a tiny scale through a real service process on 127.0.0.1."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.capacity import Outcome, gap_share, run_level, verdict

PIECE = 800  # 100 ms of mu-law


def on_time(start: float, pieces: int) -> list[tuple[float, int]]:
    return [(start + 0.1 * n, PIECE) for n in range(pieces)]


def test_audio_that_keeps_up_leaves_no_gap() -> None:
    assert gap_share(on_time(0.05, 100), began=0.0, window=(1.0, 9.0)) == pytest.approx(
        0.0, abs=1e-9
    )


def test_a_late_piece_is_silence_until_it_arrives_and_the_rest_plays_after_it() -> None:
    heard = on_time(0.0, 100)
    heard[40] = (4.3, PIECE)  # due at 4.0: 300 ms of silence, then the queue catches up
    heard[41:44] = [(4.3, PIECE)] * 3
    assert gap_share(heard, began=0.0, window=(1.0, 9.0)) == pytest.approx(0.3 / 8)


def test_silence_before_the_first_word_and_after_the_last_counts() -> None:
    heard = [(3.0 + 0.1 * n, PIECE) for n in range(30)]  # 3.0 .. 6.0
    assert gap_share(heard, began=0.5, window=(1.0, 9.0)) == pytest.approx(5 / 8)
    assert gap_share([], began=0.5, window=(1.0, 9.0)) == 1.0


def test_a_call_that_began_late_is_measured_from_its_start() -> None:
    assert gap_share(on_time(5.0, 40), began=5.0, window=(1.0, 9.0)) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(gap_share([], began=9.5, window=(1.0, 9.0)))


@pytest.mark.slow
async def test_the_limit_admits_two_and_refuses_three(tmp_path: Path) -> None:
    level = await run_level(5, 2, 1.5, tmp_path, seed=1, ramp_s=0.2, settle_s=0.3)

    assert level.count(Outcome.ADMITTED) == 2
    assert level.count(Outcome.REFUSED) == 3
    assert level.count(Outcome.FAILED) == 0
    assert level.refusals == {"webhook/max_calls": 3}
    assert 503 in level.ready.statuses
    assert level.ready.reasons["max_calls"] >= 1
    admitted = [c for c in level.callers if c.outcome is Outcome.ADMITTED]
    assert all(c.call.heard for c in admitted)  # the model talked to both
    assert len(level.gaps) == 2
    assert len(level.up_p99) == 2
    assert level.problems == 0
    assert "2 admitted" in verdict(level)
