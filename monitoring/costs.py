"""What the judge costs: a price table per model, and per-step and cumulative totals.

Prices are US dollars per million tokens, input (prompt) and output (completion), as
providers publish them. The table comes from ``Settings.judge_prices``
(``REWARDQ_JUDGE_PRICES='{"gpt-4o-mini": [0.15, 0.60]}'``); the key ``"*"`` prices any
model not listed, and a model with no price costs nothing (the local judge).

Counting rule (:class:`CostLedger`): a result costs its ``usage`` once when it is
``ok`` and not ``cached``: that is the one successful judge call made for it. Failed
attempts before it (429, 5xx, timeouts) bill no tokens and count only as ``attempts``;
a cache hit, a duplicate that joined another caller's call, and an item of a
redelivered chunk whose verdict was already stored all come back ``cached`` and cost
nothing, so a verdict is paid for once however often it is delivered.

The workers' ``rewardq_judge_cost_usd_total`` metric counts every 200 reply instead,
including scoreless ones that were retried (the provider bills those too): the two
agree whenever every billed reply carried a score.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import ResultStatus, ScoreResult

TOKENS_PER_PRICE_UNIT = 1_000_000
ANY_MODEL = "*"


@dataclass(frozen=True)
class Price:
    """US dollars per million input and output tokens of one model."""

    input_per_mtok: float
    output_per_mtok: float

    def __post_init__(self) -> None:
        if not (self.input_per_mtok >= 0 and self.output_per_mtok >= 0):
            raise ConfigError(f"prices must be >= 0 dollars per 1M tokens, got {self}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one reply's tokens."""
        return (prompt_tokens * self.input_per_mtok
                + completion_tokens * self.output_per_mtok) / TOKENS_PER_PRICE_UNIT


PriceSpec = Price | Sequence[float]


class PriceTable(Mapping[str, Price]):
    """Model name -> :class:`Price`; ``"*"`` prices the models not listed.

    Args:
        prices: model -> ``Price`` or ``(input, output)`` dollars per 1M tokens.

    Raises:
        ConfigError: a price that is not two non-negative numbers.
    """

    def __init__(self, prices: Mapping[str, PriceSpec] | None = None) -> None:
        self._prices = {model: _as_price(model, p) for model, p in (prices or {}).items()}

    @classmethod
    def from_json(cls, text: str) -> PriceTable:
        """Parse ``{"model": [input, output], ...}`` (the ``REWARDQ_JUDGE_PRICES`` format).

        Raises:
            ConfigError: not a JSON object of two-number lists.
        """
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"judge prices are not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("judge prices must be a JSON object: model -> [input, output]")
        return cls(raw)

    @classmethod
    def from_settings(cls, settings: Any) -> PriceTable:
        """The table of ``settings.judge_prices`` (empty while that field does not exist)."""
        return cls(getattr(settings, "judge_prices", None) or {})

    def price(self, model: str) -> Price | None:
        """The price of ``model``, the ``"*"`` price, or ``None``."""
        return self._prices.get(model) or self._prices.get(ANY_MODEL)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one reply of ``model``; 0 for a model without a price."""
        price = self.price(model)
        return price.cost(prompt_tokens, completion_tokens) if price else 0.0

    def __getitem__(self, model: str) -> Price:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)


def _as_price(model: str, spec: object) -> Price:
    if isinstance(spec, Price):
        return spec
    if (isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in spec)):
        return Price(float(spec[0]), float(spec[1]))
    raise ConfigError(f"price of {model!r} must be [input, output] dollars per 1M tokens, "
                      f"got {spec!r}")


@dataclass
class CostTotals:
    """Counts and dollars over some results (one step, or a whole run).

    Attributes:
        items: results seen.
        judged: results paid for: ``ok`` and not ``cached`` (one successful call each).
        cached: ``ok`` results answered without a judge call of their own.
        failed: results not ``ok`` (failed, timeout, invalid).
        attempts: judge requests the results report, failed ones included.
        retries: attempts beyond each item's first.
        prompt_tokens / completion_tokens: tokens of the paid-for calls.
        cost_usd: their price.
    """

    items: int = 0
    judged: int = 0
    cached: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: CostTotals) -> None:
        """Add ``other``'s counts to these."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready counts."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def totals_of(results: Iterable[ScoreResult], model: str, prices: PriceTable) -> CostTotals:
    """Counts and cost of ``results`` judged by ``model`` (see the module's counting rule)."""
    totals = CostTotals()
    for r in results:
        totals.items += 1
        totals.attempts += r.attempts
        totals.retries += max(0, r.attempts - 1)
        if r.status is not ResultStatus.OK:
            totals.failed += 1
        elif r.cached:
            totals.cached += 1
        else:
            totals.judged += 1
            if r.usage is not None:
                totals.prompt_tokens += r.usage.prompt_tokens
                totals.completion_tokens += r.usage.completion_tokens
                totals.cost_usd += prices.cost(model, r.usage.prompt_tokens,
                                               r.usage.completion_tokens)
    return totals


@dataclass
class CostLedger:
    """Per-step and cumulative judge costs of a training run.

    Args:
        prices: the price table (or a mapping it is built from).
        model: the judge model the results came from.

    Example::

        ledger = CostLedger(PriceTable.from_settings(settings), settings.judge_model)
        batch = ledger.record(results, step=3)
        print(batch.cost_usd, ledger.steps[3].cost_usd, ledger.total.cost_usd)
    """

    prices: PriceTable | Mapping[str, PriceSpec]
    model: str
    steps: dict[int | None, CostTotals] = field(default_factory=dict)
    total: CostTotals = field(default_factory=CostTotals)

    def __post_init__(self) -> None:
        if not isinstance(self.prices, PriceTable):
            self.prices = PriceTable(self.prices)

    def record(self, results: Iterable[ScoreResult], step: int | None = None) -> CostTotals:
        """Count one batch of results into ``step`` and the total.

        Returns:
            This batch's totals; ``steps[step]`` holds the step's totals so far (a step
            may be recorded in several batches) and ``total`` the run's.
        """
        assert isinstance(self.prices, PriceTable)
        batch = totals_of(results, self.model, self.prices)
        self.steps.setdefault(step, CostTotals()).add(batch)
        self.total.add(batch)
        return batch
