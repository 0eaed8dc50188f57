"""The TOML configuration contract (DESIGN.md §8): msgspec Structs, loading and errors.

Ranges are msgspec constraints, so msgspec produces the error; cross-field checks live in
``__post_init__`` and raise ``_FieldError`` with a key relative to the struct that raised
it. ``load_config`` is the one place that turns either into a ``ConfigError`` naming the
file, the key path in TOML terms and what was expected.

Secrets are never part of the config: fields ending in ``_env`` hold environment variable
NAMES, read only when ``secret_from_env`` is called. Importing this module reads nothing.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import msgspec.json
import msgspec.structs
import msgspec.toml
from msgspec import Meta

__all__ = [
    "BreakerConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DemoConfig",
    "DeploymentConfig",
    "KeyConfig",
    "LimitsConfig",
    "ModelConfig",
    "MultiplexerConfig",
    "ObservabilityConfig",
    "ProviderConfig",
    "RouterConfig",
    "ServerConfig",
    "default_config",
    "load_config",
    "resolve_workers",
    "secret_from_env",
    "shm_name_for",
]

_ENV_NAME = "[A-Za-z_][A-Za-z0-9_]*"
_NAME = "^[A-Za-z0-9_.-]{1,64}$"  # no "/": provider names prefix "provider/model"
_URL = r"^(https?://[^\s/?#]+\S*)?$"
_SHM_NAME = "^(/[A-Za-z0-9_.-]{1,30})?$"
_HEADER_NAME = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_HEADER_VALUE = "^[^\r\n\x00]*$"

_LOCATION = re.compile(r" - at (`key` in )?`\$([^`]*)`$")  # msgspec's error suffix
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")

# Replaces msgspec's "matching regex '...'" with words a user can act on.
_PATTERN_HELP = {
    f"^{_ENV_NAME}$": "an environment variable NAME (letters, digits, `_`), not the secret",
    f"^({_ENV_NAME})?$": '"" or an environment variable NAME (letters, digits, `_`), '
    "not the secret",
    _NAME: "1-64 characters from A-Z a-z 0-9 _ . -",
    _URL: '"" or an http:// or https:// URL',
    _SHM_NAME: '"" or "/" followed by 1-30 characters from A-Z a-z 0-9 _ . -',
    _HEADER_NAME: "an HTTP header name",
    _HEADER_VALUE: "a header value without line breaks",
}

# Header names that carry credentials: allowing them in `headers` would put a secret inline.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "x-goog-api-key"}
)

_NonNegInt = Annotated[int, Meta(ge=0)]
_PosInt = Annotated[int, Meta(ge=1)]
_NonNegFloat = Annotated[float, Meta(ge=0)]
_PosFloat = Annotated[float, Meta(gt=0)]
_Fraction = Annotated[float, Meta(ge=0, le=1)]
_EnvName = Annotated[str, Meta(pattern=f"^{_ENV_NAME}$")]
_OptionalEnvName = Annotated[str, Meta(pattern=f"^({_ENV_NAME})?$")]
_NonEmptyStr = Annotated[str, Meta(min_length=1)]


class ConfigError(Exception):
    """An unusable configuration; ``str(err)`` is the message to show the user."""


class _FieldError(ValueError):
    """A cross-field check failed; ``key`` is relative to the struct that raised it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[server]``: listeners, request size limits, auth and process supervision."""

    host: _NonEmptyStr = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    workers: _NonNegInt = 0
    uds: Annotated[str, Meta(max_length=107)] = ""  # sun_path holds 108 bytes with the NUL
    max_body_bytes: _PosInt = 10 * 1024 * 1024
    max_header_bytes: _PosInt = 16 * 1024
    master_key_env: _OptionalEnvName = ""
    shm_name: Annotated[str, Meta(pattern=_SHM_NAME)] = ""
    drain_timeout_s: _PosFloat = 30.0
    heartbeat_timeout_s: _PosFloat = 10.0
    # On: each worker listens on its own socket bound with SO_REUSEPORT, and the kernel
    # spreads new connections over them by address hash. Off: one socket all workers
    # accept from, sharing bursts out by their connection counts (workers.accept), where
    # a stalled or dying worker strands no connection (README, "Configuration").
    reuse_port: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Rate limits of one level of the limiter hierarchy; 0 means unlimited."""

    rpm: _NonNegInt = 0
    tpm: _NonNegInt = 0
    max_concurrency: _NonNegInt = 0


class KeyConfig(LimitsConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[[keys]]``: a virtual key, whose secret is in the environment variable ``key_env``."""

    name: Annotated[str, Meta(pattern=_NAME)]
    key_env: _EnvName


class ProviderConfig(LimitsConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[[providers]]``: overrides a catalog provider or adds an OpenAI-compatible one."""

    name: Annotated[str, Meta(pattern=_NAME)]
    base_url: Annotated[str, Meta(pattern=_URL)] = ""
    api_key_env: _OptionalEnvName = ""
    wire: str = ""  # "" = the catalog's wire format; "openai" for a provider not in it
    headers: dict[
        Annotated[str, Meta(pattern=_HEADER_NAME)], Annotated[str, Meta(pattern=_HEADER_VALUE)]
    ] = {}
    timeout_s: _NonNegFloat = 0.0  # 0 = router.timeout_s
    # Wire-specific settings that are not secrets: Azure's api_version, Bedrock's region.
    options: dict[Annotated[str, Meta(pattern=_NAME)], str] = {}

    def __post_init__(self) -> None:
        for header in self.headers:
            if header.lower() in _CREDENTIAL_HEADERS:
                raise _FieldError(
                    f"headers.{_toml_key(header)}",
                    "credentials do not belong in the config; set api_key_env to the name "
                    "of an environment variable holding the key",
                )


class DeploymentConfig(LimitsConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[[models.deployments]]``: one place a model alias can be served from."""

    provider: _NonEmptyStr
    model: _NonEmptyStr
    input_cost_per_mtok: _NonNegFloat = 0.0
    output_cost_per_mtok: _NonNegFloat = 0.0
    weight: _PosFloat = 1.0


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[[models]]``: a name clients ask for and the deployments that can serve it."""

    name: _NonEmptyStr
    deployments: Annotated[list[DeploymentConfig], Meta(min_length=1)]


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[router]``: how a deployment is chosen and how often a request is retried."""

    profile: Literal["cost", "latency", "balanced", "reliability"] = "balanced"
    attempts: _PosInt = 3
    timeout_s: _PosFloat = 60.0
    backoff_base_s: _NonNegFloat = 0.05
    backoff_max_s: _NonNegFloat = 2.0
    # Tokens/min limits charge prompt + this many completion tokens when a request
    # gives no max_tokens, then reconcile with the provider's reported usage.
    estimate_completion_tokens: _PosInt = 256

    def __post_init__(self) -> None:
        if self.backoff_base_s > self.backoff_max_s:
            raise _FieldError(
                "backoff_base_s",
                f"must be <= backoff_max_s ({self.backoff_max_s!r}), got `{self.backoff_base_s!r}`",
            )


class BreakerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[breaker]``: when a deployment's circuit opens and how it recovers."""

    error_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    window_s: _PosFloat = 10.0
    min_requests: _PosInt = 20
    consecutive_failures: _PosInt = 5
    zscore: _PosFloat = 2.5
    # A latency anomaly must also be this much slower than the EWMA: smaller slowdowns
    # are noise at LLM timescales, and under load mostly the gateway's own queueing,
    # which must never open a healthy upstream's breaker.
    anomaly_min_s: _NonNegFloat = 0.25
    open_s: _PosFloat = 5.0
    half_open_probes: _PosInt = 1


class MultiplexerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[multiplexer]``: sharing identical in-flight upstream requests.

    ``eligible``: "deterministic" shares requests with temperature 0 or a seed (and
    those sent with ``x-llmkit-dedup: on``); "all" shares every identical request.
    ``table_slots``: the cross-worker in-flight table's size in shm (64 bytes each).
    """

    enabled: bool = True
    eligible: Literal["deterministic", "all"] = "deterministic"
    cross_worker: bool = True
    table_slots: Annotated[int, Meta(ge=8, le=1 << 20)] = 4096


class ObservabilityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[observability]``: shared-memory metrics, sampled tracing and the access log."""

    metrics: bool = True  # per-request metrics in shm (what /metrics shows)
    trace_sample_rate: _Fraction = 0.1  # share of requests traced (head sampling)
    otlp_endpoint: Annotated[str, Meta(pattern=_URL)] = ""  # "" = no export: tracing off
    service_name: _NonEmptyStr = "llmkit"
    access_log: bool = False  # one JSON line per request
    access_log_path: str = ""  # "" = standard error
    log_prompts: bool = False  # put request messages in the access log (never in spans)


class DemoConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[demo]``: the built-in demo provider that serves ``demo/<anything>``."""

    latency_ms: _NonNegFloat = 0.0
    chunk_interval_ms: _NonNegFloat = 0.0
    failure_rate: _Fraction = 0.0
    max_tokens: _PosInt = 16
    seed: int = 0


ClusterLevel = Literal["global", "keys", "providers", "deployments"]
_REDIS_URL = r"^((redis|rediss|unix)://\S+)?$"
_PATTERN_HELP[_REDIS_URL] = '"" or a redis://, rediss:// or unix:// URL'


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[cluster]``: limits and breaker state shared with other hosts through Redis.

    Off while ``redis_url`` is "". The requests- and tokens-per-minute limits of the
    levels in ``levels`` hold cluster-wide; concurrency stays per host.
    """

    redis_url: Annotated[str, Meta(pattern=_REDIS_URL)] = ""  # no password in it:
    password_env: _OptionalEnvName = ""  # the Redis password's environment variable
    name: Annotated[str, Meta(pattern=_NAME)] = "default"  # several clusters, one Redis
    sync_interval_s: Annotated[float, Meta(ge=0.005, le=10)] = 0.05
    failure_policy: Literal["fail_open", "fail_closed"] = "fail_open"
    levels: tuple[ClusterLevel, ...] = ("global", "keys", "providers", "deployments")
    # A host holds at most this fraction of a limit (at least one request): the
    # global overshoot or stranded budget is at most one such batch per host.
    batch_fraction: Annotated[float, Meta(gt=0, le=1)] = 0.05
    hosts: _NonNegInt = 0  # fail_open share = limit / hosts; 0 = hosts seen in Redis
    redis_timeout_s: _PosFloat = 0.5  # slower than this counts as down
    max_backoff_s: _PosFloat = 2.0  # reconnect attempts back off up to this
    share_breakers: bool = True

    def __post_init__(self) -> None:
        userinfo = self.redis_url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        if ":" in userinfo:
            raise _FieldError(
                "redis_url",
                "credentials do not belong in the config; set password_env to the name of "
                "an environment variable holding the Redis password",
            )

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The whole configuration file."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    keys: list[KeyConfig] = []
    providers: list[ProviderConfig] = []
    models: list[ModelConfig] = []
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    multiplexer: MultiplexerConfig = msgspec.field(default_factory=MultiplexerConfig)
    observability: ObservabilityConfig = msgspec.field(default_factory=ObservabilityConfig)
    demo: DemoConfig = msgspec.field(default_factory=DemoConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _check_unique("keys", "name", "key name", (key.name for key in self.keys))
        # Two keys sharing one secret could not be told apart by the limiter.
        _check_unique("keys", "key_env", "key_env", (key.key_env for key in self.keys))
        _check_unique("providers", "name", "provider name", (p.name for p in self.providers))
        _check_unique("models", "name", "model name", (m.name for m in self.models))

    def deployments(self) -> list[tuple[str, DeploymentConfig]]:
        """Every (model name, deployment) pair, in declaration order."""
        return [(model.name, dep) for model in self.models for dep in model.deployments]


def _check_unique(section: str, field: str, what: str, values: Iterable[str]) -> None:
    first_index: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in first_index:
            raise _FieldError(
                f"{section}[{index}].{field}",
                f"duplicate {what} `{value}` (first used by {section}[{first_index[value]}])",
            )
        first_index[value] = index


def default_config() -> Config:
    """The configuration used when no file is given."""
    return Config()


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Read, override and validate a config file; raise ``ConfigError`` if it is unusable."""
    source = os.fspath(path) if path is not None else "<no config file>"
    raw = _read_toml(path, source) if path is not None else {}
    overridden = _apply_overrides(raw, overrides or {}, source)
    try:
        # What msgspec.toml.decode(..., type=Config) does, split so overrides reach the dict.
        return msgspec.convert(
            raw,
            type=Config,
            builtin_types=(datetime.datetime, datetime.date, datetime.time),
            str_keys=True,
        )
    except msgspec.ValidationError as exc:
        key, expected = _explain(exc, raw)
        origin = " (set by override)" if key in overridden else ""
        where = f"{source}: {key}" if key else source
        raise ConfigError(f"{where}: {expected}{origin}") from exc


def shm_name_for(config: Config, config_path: str | os.PathLike[str] | None) -> str:
    """The POSIX shared-memory name of this gateway instance: ``server.shm_name`` or derived.

    The derived name is ``/llmkit-<port>-<8 hex>`` (at most 22 bytes), the hex taken from
    sha256 of host, port, uds and the resolved config path. With ``server.port = 0`` pass
    a config carrying the bound port, or instances on free ports would share a name.
    """
    server = config.server
    if server.shm_name:
        return server.shm_name
    resolved = os.path.realpath(config_path) if config_path is not None else ""
    identity = msgspec.json.encode([server.host, server.port, server.uds, resolved])
    return f"/llmkit-{server.port}-{hashlib.sha256(identity).hexdigest()[:8]}"


def resolve_workers(config: Config) -> int:
    """``server.workers``, or the number of cores this process may run on when it is 0."""
    if config.server.workers:
        return config.server.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def secret_from_env(env_name: str) -> str | None:
    """The secret in environment variable ``env_name``; None if the name is "" or unset/empty."""
    if not env_name:
        return None
    return os.environ.get(env_name) or None


def _read_toml(path: str | os.PathLike[str], source: str) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        raw: dict[str, Any] = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, object], source: str) -> set[str]:
    """Set each dotted key in the raw TOML dict; return the keys that were set."""
    applied: set[str] = set()
    for dotted, value in overrides.items():
        if value is None:
            continue
        names = dotted.split(".")
        if _type_at(names) is None:
            raise ConfigError(f"{source}: override `{dotted}`: unknown key")
        table = raw
        for name in names[:-1]:
            child = table.setdefault(name, {})
            if not isinstance(child, dict):
                break  # the file's own type error for this table is reported when decoding
            table = child
        else:
            table[names[-1]] = value
            applied.add(dotted)
    return applied


def _explain(exc: msgspec.ValidationError, raw: dict[str, Any]) -> tuple[str, str]:
    """Turn a msgspec error into (TOML key path, what was expected)."""
    text, path = str(exc), ""
    match = _LOCATION.search(text)
    if match:
        text, path = text[: match.start()], match.group(2)
        if match.group(1):
            text = f"key: {text}"
    if path.endswith("[...]"):
        path, text = path[: -len("[...]")], f"value: {text}"
    segments: list[str | int] = [
        name if name else int(index) for name, index in _SEGMENT.findall(path)
    ]
    if isinstance(exc.__cause__, _FieldError):
        return _join(_toml_path(segments), exc.__cause__.key), exc.__cause__.message
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text, re.S)
    if unknown:
        hint = _unknown_key_hint(segments, unknown.group(1))
        return _toml_path([*segments, unknown.group(1)]), f"unknown key{hint}"
    missing = re.fullmatch(r"Object missing required field `(.*)`", text)
    if missing:
        return _toml_path([*segments, missing.group(1)]), "required key is missing"
    return _toml_path(segments), _expected(text, segments, raw)


def _expected(text: str, segments: Sequence[str | int], raw: dict[str, Any]) -> str:
    for pattern, meaning in _PATTERN_HELP.items():
        text = text.replace(f"matching regex {pattern!r}", f"that is {meaning}")
    declared = _type_at(segments)
    if text.startswith("Invalid enum value") and get_origin(declared) is Literal:
        text += f" (expected one of: {', '.join(map(str, get_args(declared)))})"
    value = _raw_value(raw, segments)
    # Only numbers are echoed: a string may be a secret pasted where its env var name goes.
    if ", got" not in text and isinstance(value, int | float) and not isinstance(value, bool):
        text += f", got `{value!r}`"
    return text


def _unknown_key_hint(table: Sequence[str | int], name: str) -> str:
    declared = _type_at(table)
    if not _is_struct(declared):
        return ""
    known = [field.name for field in msgspec.structs.fields(declared)]
    if f"{name}_env" in known:
        return (
            f" (secrets are not written in the config: set `{name}_env` to the name of "
            "an environment variable holding it)"
        )
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _type_at(segments: Sequence[str | int]) -> Any:
    """The declared type at a key path under ``Config``, or None if there is no such key."""
    declared: Any = Config
    for segment in segments:
        declared = _unannotated(declared)
        if isinstance(segment, int):
            if get_origin(declared) is not list:
                return None
            declared = get_args(declared)[0]
        elif _is_struct(declared):
            fields = {field.name: field.type for field in msgspec.structs.fields(declared)}
            declared = fields.get(segment)
            if declared is None:
                return None
        else:
            return None
    return _unannotated(declared)


def _raw_value(raw: Any, segments: Sequence[str | int]) -> Any:
    node = raw
    for segment in segments:
        if isinstance(segment, int) and isinstance(node, list) and segment < len(node):
            node = node[segment]
        elif isinstance(segment, str) and isinstance(node, dict) and segment in node:
            node = node[segment]
        else:
            return None
    return node


def _unannotated(declared: Any) -> Any:
    return get_args(declared)[0] if get_origin(declared) is Annotated else declared


def _is_struct(declared: Any) -> bool:
    return isinstance(declared, type) and issubclass(declared, msgspec.Struct)


def _toml_path(segments: Sequence[str | int]) -> str:
    path = ""
    for segment in segments:
        if isinstance(segment, int):
            path += f"[{segment}]"
        else:
            path = _join(path, _toml_key(segment))
    return path


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return path + key if key.startswith("[") else f"{path}.{key}"


def _toml_key(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return msgspec.json.encode(name).decode()
