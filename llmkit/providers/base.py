"""The adapter interface every wire format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmkit.types import ChatCompletion, ChatCompletionChunk, ChatRequest


@dataclass(frozen=True, slots=True)
class Target:
    """Where one attempt goes: a deployment resolved against its provider."""

    provider: str
    model: str
    deployment: str
    index: int = 0

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"


class Adapter(ABC):
    """Translates an OpenAI-shaped request to one provider's wire format and back."""

    name: str

    @abstractmethod
    async def complete(self, request: ChatRequest, target: Target) -> ChatCompletion:
        """One whole completion; raises an ``llmkit.errors`` error on failure."""

    @abstractmethod
    def stream(self, request: ChatRequest, target: Target) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks in OpenAI's order: role delta, content deltas, finish, usage."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most adapters keep no pool
        """Release pooled connections."""
