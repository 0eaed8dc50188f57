"""Azure OpenAI: OpenAI's wire format behind deployment URLs and an ``api-key`` header.

``{base_url}/openai/deployments/{deployment}/{path}?api-version={api_version}``, where
the deployment is the model name the config gives and ``api_version`` comes from the
provider's ``options`` (catalog default 2024-10-21).
"""

from __future__ import annotations

from urllib.parse import quote

from llmkit.providers.base import Target
from llmkit.providers.openai import OpenAIAdapter


class AzureAdapter(OpenAIAdapter):
    wire = "azure"

    def url(self, target: Target, path: str) -> str:
        provider = target.provider
        version = quote(provider.options.get("api_version", "2024-10-21"), safe="")
        deployment = quote(target.model, safe="")
        return f"{provider.base_url}/openai/deployments/{deployment}/{path}?api-version={version}"
