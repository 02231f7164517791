"""Prices in USD per 1M tokens, to turn token usage into a cost estimate.

The built-in table covers a few well-known OpenAI models (list prices, standard tier, as of 2025); anything
else costs 0 unless `--price-input` / `--price-output` are given. Dated snapshots (`gpt-4o-mini-2024-07-18`)
use the price of their base name.
"""

from __future__ import annotations

from selfinstruct.teachers.base import Usage

PRICES: dict[str, tuple[float, float]] = {
    # model: (input, output) USD per 1M tokens
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-3.5-turbo-instruct": (1.50, 2.00),
    "davinci-002": (2.00, 2.00),
    "babbage-002": (0.40, 0.40),
}


def lookup_price(model: str) -> tuple[float, float] | None:
    """The table entry for `model` or for the longest table name it extends with a `-suffix`."""
    name = model.rsplit("/", 1)[-1]  # "openai/gpt-4o" as some routers spell it
    if name in PRICES:
        return PRICES[name]
    matches = [k for k in PRICES if name.startswith(k + "-") and name[len(k) + 1 : len(k) + 2].isdigit()]
    return PRICES[max(matches, key=len)] if matches else None


def resolve_prices(model: str, price_input: float | None, price_output: float | None) -> tuple[float, float]:
    """Configured prices win; a missing one comes from the table, else 0."""
    table = lookup_price(model) or (0.0, 0.0)
    return (
        table[0] if price_input is None else price_input,
        table[1] if price_output is None else price_output,
    )


def cost(usage: Usage, prices: tuple[float, float]) -> float:
    return (usage.prompt_tokens * prices[0] + usage.completion_tokens * prices[1]) / 1_000_000
