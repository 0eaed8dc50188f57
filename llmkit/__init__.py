"""LLMKit: one OpenAI-compatible endpoint in front of many model providers."""

from llmkit.client import AsyncClient, Client

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]
