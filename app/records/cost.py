"""Cost per call: the providers' usage, priced by a table of public list prices.

The engines report what their providers bill (`Usage`: per model, amounts per `Meter`);
`CallCost`, one per call, adds them up per engine and model, prices them with `Prices`
(the shipped `prices.toml`, rows replaced or added by `PRICES_FILE`), keeps the result in
the call's record (`call.json`'s `cost`, and so the end-of-call webhook's body) and adds
it to `phone_agent_cost_usd_total{engine}` as it comes. A model without a price (or a
meter its row lacks) is priced null and left out of the sums, with one warning per model
for the process: never an error.
"""

from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from collections.abc import Mapping
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from app.call.info import CallInfo
from app.call.observer import CallObserver
from app.engines.base import Meter, Usage

__all__ = ["CURRENCY", "CallCost", "Prices", "PricesError", "cost_counter"]

log = structlog.get_logger(__name__)

CURRENCY = "USD"
# Prices are written per this many units of a meter (per 1M tokens, per minute, ...).
_PER: dict[Meter, float] = {
    Meter.SESSION_SECONDS: 60.0,
    Meter.AUDIO_SECONDS: 60.0,
    **{m: 1_000_000.0 for m in Meter if m.endswith("_tokens") or m is Meter.CHARACTERS},
}
_ABOUT = frozenset({"source", "checked"})  # what a row says of itself, not prices
_DIGITS = 9  # a cost's decimals in the record: a millionth of a cent


class PricesError(ValueError):
    """A prices file that cannot be used (unreadable, not TOML, a bad row)."""


class Prices:
    """USD per unit of each meter, per model."""

    def __init__(self, rows: Mapping[str, Mapping[Meter, float]]) -> None:
        self._rows = rows
        self._warned: set[str] = set()

    @classmethod
    def load(cls, override: Path | None = None) -> Prices:
        """The shipped table, with `override`'s rows (PRICES_FILE) in place of its own;
        raises `PricesError` with the file and the reason."""
        shipped = resources.files("app.records").joinpath("prices.toml").read_text("utf-8")
        rows = _rows(shipped, "app/records/prices.toml")
        if override is not None:
            try:
                text = override.read_text("utf-8")
            except OSError as exc:
                raise PricesError(f"PRICES_FILE {override}: {exc.strerror or exc}") from None
            rows |= _rows(text, f"PRICES_FILE {override}")
        return cls(rows)

    def cost(self, model: str, amounts: Mapping[Meter, float]) -> float | None:
        """The USD `amounts` of `model` cost; None (warned once per model) without a price."""
        row = self._rows.get(model)
        missing = sorted(str(m) for m in amounts if row is None or m not in row)
        if row is None or missing:
            if model not in self._warned:
                self._warned.add(model)
                log.warning(
                    "cost.unpriced",
                    model=model,
                    meters=missing,
                    detail="its cost is null; add the model to PRICES_FILE",
                )
            return None
        return sum(amount * row[meter] for meter, amount in amounts.items())


def _rows(text: str, where: str) -> dict[str, dict[Meter, float]]:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PricesError(f"{where}: not TOML: {exc}") from None
    rows: dict[str, dict[Meter, float]] = {}
    for model, row in table.items():
        if not isinstance(row, dict):
            raise PricesError(f"{where}: {model!r} must be a table of prices")
        rows[model] = _row(row, f"{where}: [{model!r}]")
    return rows


def _row(row: dict[str, Any], where: str) -> dict[Meter, float]:
    prices: dict[Meter, float] = {}
    for key, value in row.items():
        if key in _ABOUT:
            if not isinstance(value, str | date):
                raise PricesError(f"{where}: {key} must be text or a date")
            continue
        try:
            meter = Meter(key)
        except ValueError:
            known = ", ".join(sorted([*Meter, *_ABOUT]))
            raise PricesError(f"{where}: unknown key {key!r} (known: {known})") from None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise PricesError(f"{where}: {key} must be a price of 0 or more, not {value!r}")
        prices[meter] = float(value) / _PER[meter]
    return prices


def cost_counter(registry: CollectorRegistry) -> Counter:
    """`phone_agent_cost_usd_total{engine}` in the app's registry."""
    return Counter(
        "phone_agent_cost_usd",
        "Model providers' cost of calls in USD (list prices), by engine; unpriced usage "
        "is not in it.",
        ["engine"],
        registry=registry,
    )


class CallCost(CallObserver):
    """One call's usage and cost, per engine and model, kept in its record."""

    def __init__(self, info: CallInfo, prices: Prices, counter: Counter) -> None:
        self._info = info
        self._prices = prices
        self._counter = counter
        # engine -> model -> meter -> amount
        self._usage: defaultdict[str, defaultdict[str, defaultdict[Meter, float]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(float))
        )
        info.record_sections["cost"] = self.section()

    def usage(self, engine: str, usage: Usage) -> None:
        totals = self._usage[str(engine)][usage.model]
        for meter, amount in usage.amounts.items():
            totals[meter] += amount
        usd = self._prices.cost(usage.model, usage.amounts)
        if usd:
            self._counter.labels(str(engine)).inc(usd)
        self._info.record_sections["cost"] = self.section()

    def section(self) -> dict[str, Any]:
        """The record's `cost`: USD per engine and model with the usage priced, the
        total of what has a price, and the models that have none."""
        engines: dict[str, Any] = {}
        unpriced: set[str] = set()
        for engine, models in self._usage.items():
            entries: dict[str, Any] = {}
            for model, amounts in models.items():
                usd = self._prices.cost(model, amounts)
                if usd is None:
                    unpriced.add(model)
                entries[model] = {
                    "usd": None if usd is None else round(usd, _DIGITS),
                    "usage": {str(m): _number(n) for m, n in amounts.items()},
                }
            priced = (e["usd"] for e in entries.values() if e["usd"] is not None)
            engines[engine] = {"usd": round(sum(priced), _DIGITS), "models": entries}
        return {
            "currency": CURRENCY,
            "usd": round(sum(e["usd"] for e in engines.values()), _DIGITS),
            "unpriced": sorted(unpriced),
            "engines": engines,
        }


def _number(amount: float) -> float | int:
    """Whole counts (tokens, characters) as integers, seconds to the millisecond."""
    return int(amount) if amount.is_integer() else round(amount, 3)
