"""Build the providers a config can reach, and the adapters that speak their wires."""

from __future__ import annotations

import importlib
import os

from llmkit.config import Config, ConfigError, ProviderConfig, secret_from_env
from llmkit.providers.base import Adapter, Provider
from llmkit.providers.catalog import BY_NAME, CatalogEntry
from llmkit.upstream import Upstream

DEMO = "demo"

# wire format -> "module:class"; imported once per worker when the gateway is built.
ADAPTERS: dict[str, str] = {
    "openai": "llmkit.providers.openai:OpenAIAdapter",
    "azure": "llmkit.providers.azure:AzureAdapter",
    "anthropic": "llmkit.providers.anthropic:AnthropicAdapter",
    "gemini": "llmkit.providers.gemini:GeminiAdapter",
    "bedrock": "llmkit.providers.bedrock:BedrockAdapter",
    "cohere": "llmkit.providers.cohere:CohereAdapter",
}


def build_providers(config: Config) -> dict[str, Provider]:
    """Every catalog row, with the config's overrides, plus config-only providers."""
    overrides = {p.name: p for p in config.providers}
    providers = {DEMO: Provider(DEMO, DEMO, "", auth="none")}
    for entry in BY_NAME.values():
        providers[entry.name] = _provider(entry, overrides.get(entry.name), config)
    for name, override in overrides.items():
        if override.wire and override.wire not in ADAPTERS:
            known = ", ".join(sorted(ADAPTERS))
            raise ConfigError(f"provider '{name}': unknown wire '{override.wire}' ({known})")
        if name not in BY_NAME and name != DEMO:
            entry = CatalogEntry(
                name, override.wire or "openai", "", override.api_key_env,
                key_required=bool(override.api_key_env),
            )  # fmt: skip
            providers[name] = _provider(entry, override, config)
    _check_deployments(config, providers, overrides)
    return providers


def provider_names(config: Config) -> list[str]:
    """Every provider's name in a fixed order (demo, catalog, config-only): the order of
    their cells in shared memory, so it must not depend on the environment."""
    extra = [p.name for p in config.providers if p.name not in BY_NAME and p.name != DEMO]
    return [DEMO, *BY_NAME, *extra]


def build_adapters(upstream: Upstream) -> dict[str, Adapter]:
    """One adapter per wire format, sharing the worker's upstream pool."""
    adapters: dict[str, Adapter] = {}
    for wire, path in ADAPTERS.items():
        module, _, cls = path.partition(":")
        adapters[wire] = getattr(importlib.import_module(module), cls)(upstream)
    return adapters


def _provider(entry: CatalogEntry, override: ProviderConfig | None, config: Config) -> Provider:
    key_env = (override.api_key_env if override else "") or entry.key_env
    headers = {**entry.headers, **(override.headers if override else {})}
    options = {**entry.options, **(override.options if override else {})}
    timeout = (override.timeout_s if override else 0) or config.router.timeout_s
    wire = (override.wire if override else "") or entry.wire
    base_url = ((override.base_url if override else "") or entry.base_url).rstrip("/")
    return Provider(
        name=entry.name,
        wire=wire,
        base_url=base_url,
        auth=entry.auth,
        api_key=secret_from_env(key_env),
        headers=headers,
        timeout_s=timeout,
        options=options,
        credentials=_credentials(entry.auth),
        key_env=key_env,
        key_required=entry.key_required,
    )


def _credentials(auth: str) -> dict[str, str]:
    if auth != "sigv4":
        return {}
    names = ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_REGION")
    return {name.lower(): os.environ[name] for name in names if os.environ.get(name)}


def _check_deployments(
    config: Config, providers: dict[str, Provider], overrides: dict[str, ProviderConfig]
) -> None:
    """A deployment must name a provider that can be called: known, with a URL and key."""
    for m, model in enumerate(config.models):
        for d, deployment in enumerate(model.deployments):
            where = f"models[{m}].deployments[{d}].provider"
            provider = providers.get(deployment.provider)
            if provider is None:
                raise ConfigError(f"{where}: unknown provider '{deployment.provider}'")
            problem = unusable(provider)
            if problem:
                raise ConfigError(f"{where}: {problem}")


def unusable(provider: Provider) -> str | None:
    """Why ``provider`` cannot be called as configured, or None."""
    if provider.wire == DEMO:
        return None
    if provider.wire not in ADAPTERS:
        return f"provider '{provider.name}' speaks '{provider.wire}', which is not supported yet"
    if not provider.base_url and provider.wire != "bedrock":
        return f"provider '{provider.name}' needs base_url in [[providers]]"
    if provider.key_required and not provider.api_key:
        return f"provider '{provider.name}' has no key: set {provider.key_env}"
    if provider.auth == "sigv4" and "aws_access_key_id" not in provider.credentials:
        return f"provider '{provider.name}' has no access key id: set AWS_ACCESS_KEY_ID"
    return None
