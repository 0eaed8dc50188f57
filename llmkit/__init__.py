"""LLMKit: one OpenAI-compatible endpoint in front of many model providers."""

__version__ = "0.1.0"
