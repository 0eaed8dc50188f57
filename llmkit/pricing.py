"""What a request cost, from the provider's reported usage and a price table.

Prices are USD per million tokens. A deployment's ``input_cost_per_mtok`` /
``output_cost_per_mtok`` in the config win; otherwise the built-in table below, which
holds public list prices of common models as their providers published them (they
change: set the config keys to be exact). Unknown models cost 0 and say so by having
no price, rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.config import DeploymentConfig
from llmkit.types import Usage


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens; cached prompt tokens at ``cached_input`` when known."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, usage: Usage) -> float:
        """USD for one request's usage."""
        cached = cached_tokens(usage) if self.cached_input is not None else 0
        fresh = usage.prompt_tokens - cached
        total = fresh * self.input + usage.completion_tokens * self.output
        if cached:
            total += cached * (self.cached_input or 0.0)
        return total / 1_000_000


PRICES: dict[str, Price] = {
    "openai/gpt-4o": Price(2.50, 10.00, 1.25),
    "openai/gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "anthropic/claude-sonnet-4-5": Price(3.00, 15.00, 0.30),
    "anthropic/claude-haiku-4-5": Price(1.00, 5.00, 0.10),
    "gemini/gemini-2.5-pro": Price(1.25, 10.00, 0.31),
    "gemini/gemini-2.5-flash": Price(0.30, 2.50, 0.075),
    "cohere/command-a-03-2025": Price(2.50, 10.00),
    "mistral/mistral-large-latest": Price(2.00, 6.00),
    "deepseek/deepseek-chat": Price(0.27, 1.10, 0.07),
    "groq/llama-3.3-70b-versatile": Price(0.59, 0.79),
    "xai/grok-4": Price(3.00, 15.00, 0.75),
}


def price_for(provider: str, model: str, deployment: DeploymentConfig | None) -> Price | None:
    """The config's price for a deployment if it sets one, else the table's, else None."""
    if deployment is not None and (
        deployment.input_cost_per_mtok or deployment.output_cost_per_mtok
    ):
        return Price(deployment.input_cost_per_mtok, deployment.output_cost_per_mtok)
    return PRICES.get(f"{provider}/{model}")


def cached_tokens(usage: Usage) -> int:
    details = usage.prompt_tokens_details or {}
    cached = details.get("cached_tokens", 0)
    return min(int(cached), usage.prompt_tokens) if isinstance(cached, int) else 0
