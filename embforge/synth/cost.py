"""Token usage and dollar cost per model, and the budget check.

Prices are USD per million tokens and come from a table the user can extend or override in the config;
the defaults below are list prices at the time of writing and only a starting point. A model with no
price is tracked in tokens; `--budget-usd` refuses to start on such a model rather than guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # model prefix -> {"input": $/1M prompt tokens, "output": $/1M completion tokens}
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1": {"input": 2.00, "output": 8.00},
    "gpt-4-turbo": {"input": 10.00, "output": 30.00},
    "gpt-4": {"input": 30.00, "output": 60.00},
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
}


class BudgetError(ValueError):
    pass


def find_price(model: str, table: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """Exact name first, then the longest matching prefix (so dated snapshots like gpt-4o-2024-08-06 match)."""
    if model in table:
        return table[model]
    best = max((k for k in table if model.startswith(k)), key=len, default=None)
    return table[best] if best else None


@dataclass
class CostTracker:
    prices: dict[str, dict[str, float]]
    discount: float = 1.0  # multiplier, e.g. 0.5 for the Batch API
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> prompt/completion/requests
    unpriced: set[str] = field(default_factory=set)

    def cost_of(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = find_price(model, self.prices)
        if price is None:
            return 0.0
        return self.discount * (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6

    def add(self, model: str, usage: dict | None, *, discount: float | None = None) -> float:
        u = usage or {}
        p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        slot = self.usage.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0,
                                             "usd": 0.0})
        slot["prompt_tokens"] += p
        slot["completion_tokens"] += c
        slot["requests"] += 1
        if find_price(model, self.prices) is None:
            self.unpriced.add(model)
        cost = self.cost_of(model, p, c) * ((discount / self.discount) if discount is not None else 1.0)
        slot["usd"] += cost
        return cost

    @property
    def total_usd(self) -> float:
        return sum(s["usd"] for s in self.usage.values())

    def summary(self) -> dict:
        return {"total_usd": round(self.total_usd, 6), "per_model": self.usage,
                "unpriced_models": sorted(self.unpriced)}


@dataclass
class Budget:
    """Stops dispatch before a request could push spending past the limit.

    In-flight requests are charged at their worst case (prompt estimate + max_tokens) until they finish,
    so concurrency can never overshoot the budget by more than the estimate's error.
    """
    tracker: CostTracker
    model: str
    limit_usd: float | None
    reserved: float = 0.0

    def __post_init__(self):
        if self.limit_usd is not None and find_price(self.model, self.tracker.prices) is None:
            raise BudgetError(f"--budget-usd is set but there is no price for model {self.model!r}: add it under "
                              f"'prices' in the config (USD per 1M input/output tokens)")

    def worst_case(self, prompt_chars: int, max_tokens: int) -> float:
        # ~4 chars per token in English; 2 is a safe over-estimate for any script.
        return self.tracker.cost_of(self.model, prompt_chars // 2 + 16, max_tokens)

    def try_reserve(self, amount: float) -> bool:
        if self.limit_usd is None:
            self.reserved += amount
            return True
        if self.tracker.total_usd + self.reserved + amount > self.limit_usd:
            return False
        self.reserved += amount
        return True

    def release(self, amount: float) -> None:
        self.reserved = max(0.0, self.reserved - amount)
