"""The benchmarks' helper logic: frame stamps, percentiles, histogram bounds, clock origin."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from app.audio.g711 import ulaw_decode
from bench.bargein import call_clock_origin
from bench.common import (
    STAMP_LIMIT,
    histogram_quantile,
    payload_key,
    percentile,
    stamp,
    stamp_key,
    stamped,
    unstamp,
)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 12345, (7 << 14) | 99, STAMP_LIMIT - 1])
def test_a_stamp_carries_its_number(n: int) -> None:
    assert unstamp(stamp(n)) == n
    audio = stamped(b"\x80" * 160, n)
    assert len(audio) == 160
    assert payload_key(base64.b64encode(audio).decode()) == stamp_key(n)


def test_stamps_are_distinct_and_quiet() -> None:
    keys = {stamp_key(n) for n in range(5000)}
    assert len(keys) == 5000
    pcm = ulaw_decode(stamp(STAMP_LIMIT - 1) + stamp(0))
    assert int(np.max(np.abs(pcm.astype(np.int32)))) <= 120  # below -48 dBFS


def test_out_of_range_and_foreign_bytes() -> None:
    with pytest.raises(ValueError):
        stamp(STAMP_LIMIT)
    assert unstamp(b"\x00" * 6) is None
    assert unstamp(stamp(5)[:4]) is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 95) == 3.0
    assert math.isnan(percentile([], 50))


def test_histogram_quantile_reads_prometheus_buckets() -> None:
    text = "\n".join(
        [
            "# TYPE lag histogram",
            'lag_bucket{le="0.001"} 90.0',
            'lag_bucket{le="0.002"} 99.0',
            'lag_bucket{le="0.005"} 100.0',
            'lag_bucket{le="+Inf"} 100.0',
            "lag_count 100.0",
        ]
    )
    assert histogram_quantile(text, "lag", 0.5) == (0.001, 100)
    assert histogram_quantile(text, "lag", 0.99) == (0.002, 100)
    assert histogram_quantile(text, "lag", 1.0) == (0.005, 100)


def test_call_clock_origin_is_the_earliest_consistent_send_time() -> None:
    silence, a, b = "/w==", "AAA=", "BBB="
    sent = [a, silence, silence, b]  # the repeated frame says nothing about its index
    arrivals = [(10.0005, a), (10.0404, silence), (10.0612, b)]
    origin = call_clock_origin(sent, arrivals)
    assert origin == pytest.approx(10.0005)
    assert call_clock_origin(sent, [(11.0, silence)]) is None
