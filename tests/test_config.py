import importlib
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
import pytest

from llmkit.config import (
    Config,
    ConfigError,
    DeploymentConfig,
    KeyConfig,
    ModelConfig,
    ProviderConfig,
    default_config,
    load_config,
    resolve_workers,
    secret_from_env,
    shm_name_for,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "llmkit" / "examples" / "llmkit.toml"

TWO_DEPLOYMENTS = """
[[models]]
name = "fast"
[[models.deployments]]
provider = "openai"
model = "gpt-4o-mini"
[[models.deployments]]
provider = "demo"
model = "fast"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llmkit.toml"
    path.write_text(text)
    return path


def config_error(path: Path | None, overrides: Mapping[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def field_names(struct: type[msgspec.Struct]) -> set[str]:
    return {field.name for field in msgspec.structs.fields(struct)}


# --- defaults and the example ---------------------------------------------------------


def test_defaults() -> None:
    config = default_config()
    assert config == load_config(None)
    assert (config.server.host, config.server.port, config.server.workers) == ("127.0.0.1", 8080, 0)
    assert config.server.max_body_bytes == 10485760
    assert config.server.master_key_env == ""
    assert config.server.log_level == "info"
    assert (config.limits.rpm, config.limits.tpm, config.limits.max_concurrency) == (0, 0, 0)
    assert (config.keys, config.providers, config.models) == ([], [], [])
    assert (config.router.profile, config.router.attempts, config.router.timeout_s) == (
        "balanced",
        3,
        60.0,
    )
    assert config.breaker.error_rate == 0.5
    assert config.breaker.min_requests == 20
    assert config.multiplexer.enabled is True
    assert config.observability.trace_sample_rate == 0.1
    assert config.demo.max_tokens == 16
    assert config.deployments() == []


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == default_config()


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert ("demo-fast", DeploymentConfig(provider="demo", model="fast")) in config.deployments()
    local = next(p for p in config.providers if p.base_url == "http://127.0.0.1:9001/v1")
    assert local.api_key_env != ""
    assert config.keys[0].key_env == "LLMKIT_KEY_TEAM_A"


def test_example_sets_every_key_of_every_section() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    assert set(raw) == field_names(Config)
    list_tables: dict[str, type[msgspec.Struct]] = {
        "keys": KeyConfig,
        "providers": ProviderConfig,
        "models": ModelConfig,
    }
    for section in field_names(Config):
        entries = raw[section] if isinstance(raw[section], list) else [raw[section]]
        struct = list_tables.get(section, type(getattr(default_config(), section)))
        assert set().union(*entries) == field_names(struct), section
    deployment_keys = set().union(*(d for m in raw["models"] for d in m["deployments"]))
    assert deployment_keys == field_names(DeploymentConfig)


def test_full_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        workers = 2
        uds = "/tmp/llmkit.sock"
        master_key_env = "MASTER"
        log_level = "debug"
        [limits]
        rpm = 100
        [[keys]]
        name = "team-a"
        key_env = "KEY_A"
        tpm = 5
        [[providers]]
        name = "local"
        base_url = "https://example.test/v1"
        headers = { "X-Team" = "a" }
        timeout_s = 3
        [router]
        profile = "cost"
        attempts = 1
        [breaker]
        error_rate = 1.0
        [multiplexer]
        enabled = false
        [observability]
        trace_sample_rate = 0
        [demo]
        failure_rate = 0.25
        seed = -4
        """
        + TWO_DEPLOYMENTS,
    )
    config = load_config(str(path))
    assert (config.server.port, config.server.workers, config.server.uds) == (
        9000,
        2,
        "/tmp/llmkit.sock",
    )
    assert config.server.log_level == "debug"
    assert config.limits.rpm == 100
    assert config.keys == [KeyConfig(name="team-a", key_env="KEY_A", tpm=5)]
    assert config.providers[0].headers == {"X-Team": "a"}
    assert config.providers[0].timeout_s == 3.0
    assert (config.router.profile, config.router.attempts) == ("cost", 1)
    assert config.multiplexer.enabled is False
    assert config.demo.failure_rate == 0.25
    assert config.demo.seed == -4
    assert config.deployments() == [
        ("fast", DeploymentConfig(provider="openai", model="gpt-4o-mini")),
        ("fast", DeploymentConfig(provider="demo", model="fast")),
    ]


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        default_config().server.port = 1  # type: ignore[misc]


def test_import_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tripwire(Mapping[str, str]):
        def __getitem__(self, key: str) -> str:
            raise AssertionError(f"environment read at import: {key}")

        def __iter__(self) -> Iterator[str]:
            raise AssertionError("environment listed at import")

        def __len__(self) -> int:
            raise AssertionError("environment sized at import")

    monkeypatch.delitem(sys.modules, "llmkit.config")
    # A context, not the test-wide patch: pytest itself writes os.environ between phases.
    with monkeypatch.context() as patch:
        patch.setattr(os, "environ", Tripwire())
        module = importlib.import_module("llmkit.config")
    assert module.default_config().server.port == 8080


# --- overrides ------------------------------------------------------------------------


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\nworkers = 4\nhost = '0.0.0.0'\n")
    config = load_config(
        path, {"server.port": 8081, "server.workers": 2, "server.uds": "/tmp/x.sock"}
    )
    assert (config.server.port, config.server.workers, config.server.uds) == (
        8081,
        2,
        "/tmp/x.sock",
    )
    assert config.server.host == "0.0.0.0"


def test_override_none_is_ignored(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[server]\nport = 9000\n"), {"server.port": None})
    assert config.server.port == 9000


def test_overrides_without_file_create_sections() -> None:
    config = load_config(None, {"router.profile": "latency", "demo.latency_ms": 5})
    assert (config.router.profile, config.demo.latency_ms) == ("latency", 5.0)


def test_override_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    message = config_error(path, {"server.port": 70000})
    assert message == f"{path}: server.port: Expected `int` <= 65535, got `70000` (set by override)"
    message = config_error(None, {"server.workers": "2"})
    assert (
        message == "<no config file>: server.workers: Expected `int`, got `str` (set by override)"
    )


@pytest.mark.parametrize("key", ["server.prot", "port", "server.port.x", "keys.name", "nope.rpm"])
def test_override_of_unknown_key(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, "")
    assert config_error(path, {key: 1}) == f"{path}: override `{key}`: unknown key"


def test_override_does_not_hide_a_file_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    assert config_error(path, {"server.port": 1}) == (
        f"{path}: server: Expected `object`, got `int`"
    )


# --- error messages -------------------------------------------------------------------

DEPLOYMENT_WITH = TWO_DEPLOYMENTS + "{}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prot = 1", "prot: unknown key"),
        ("[server]\nprot = 1", "server.prot: unknown key (did you mean `port`?)"),
        ('[server]\n"my key" = 1', 'server."my key": unknown key'),
        ("[foo]\nbar = 1", "foo: unknown key"),
        ("[sever]\nport = 1", "sever: unknown key (did you mean `server`?)"),
        (
            DEPLOYMENT_WITH.format("wieght = 2"),
            "models[0].deployments[1].wieght: unknown key (did you mean `weight`?)",
        ),
        ('[server]\nport = "80"', "server.port: Expected `int`, got `str`"),
        ("[server]\nport = 80.0", "server.port: Expected `int`, got `float`"),
        ("[server]\nport = 1979-05-27", "server.port: Expected `int`, got `date`"),
        ("[multiplexer]\nenabled = 1", "multiplexer.enabled: Expected `bool`, got `int`"),
        ("server = 5", "server: Expected `object`, got `int`"),
        ("[models]\nname = 'x'", "models: Expected `array`, got `object`"),
        ("[server]\nport = 70000", "server.port: Expected `int` <= 65535, got `70000`"),
        ("[router]\nattempts = 0", "router.attempts: Expected `int` >= 1, got `0`"),
        ("[limits]\nrpm = -1", "limits.rpm: Expected `int` >= 0, got `-1`"),
        ("[breaker]\nerror_rate = 0", "breaker.error_rate: Expected `float` > 0.0, got `0`"),
        (
            "[observability]\ntrace_sample_rate = 1.5",
            "observability.trace_sample_rate: Expected `float` <= 1.0, got `1.5`",
        ),
        (
            DEPLOYMENT_WITH.format("weight = 0"),
            "models[0].deployments[1].weight: Expected `float` > 0.0, got `0`",
        ),
        (
            DEPLOYMENT_WITH.format("input_cost_per_mtok = -0.5"),
            "models[0].deployments[1].input_cost_per_mtok: Expected `float` >= 0.0, got `-0.5`",
        ),
        ("[server]\nhost = ''", "server.host: Expected `str` of length >= 1"),
        (
            "[router]\nprofile = 'fastest'",
            "router.profile: Invalid enum value 'fastest' "
            "(expected one of: cost, latency, balanced, reliability)",
        ),
        (
            "[router]\nbackoff_base_s = 3",
            "router.backoff_base_s: must be <= backoff_max_s (2.0), got `3.0`",
        ),
        (
            "[[models]]\nname = 'a'\ndeployments = []",
            "models[0].deployments: Expected `array` of length >= 1",
        ),
        ("[[models]]\nname = 'a'", "models[0].deployments: required key is missing"),
        (
            "[[models]]\nname = 'a'\n[[models.deployments]]\nmodel = 'x'",
            "models[0].deployments[0].provider: required key is missing",
        ),
        ("[[keys]]\nkey_env = 'K'", "keys[0].name: required key is missing"),
        (
            "[[providers]]\nname = 'x'\nbase_url = 'ftp://host'",
            'providers[0].base_url: Expected `str` that is "" or an http:// or https:// URL',
        ),
        (
            "[server]\nshm_name = 'llmkit'",
            'server.shm_name: Expected `str` that is "" or "/" followed by 1-30 characters '
            "from A-Z a-z 0-9 _ . -",
        ),
        (
            "[[providers]]\nname = 'x'\nheaders = { 'X Y' = 'a' }",
            "providers[0].headers: key: Expected `str` that is an HTTP header name",
        ),
        (
            "[[providers]]\nname = 'x'\nheaders = { X = \"a\\nb\" }",
            "providers[0].headers: value: Expected `str` that is a header value without line "
            "breaks",
        ),
        (
            "[[providers]]\nname = 'x'\nheaders = { X = 1 }",
            "providers[0].headers: value: Expected `str`, got `int`",
        ),
    ],
)
def test_error_names_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: {expected}"


def test_bad_key_name_at_its_index(tmp_path: Path) -> None:
    keys = "".join(f"[[keys]]\nname = '{n}'\nkey_env = 'K{i}'\n" for i, n in enumerate("ab"))
    path = write(tmp_path, keys + "[[keys]]\nname = 'team a'\nkey_env = 'K2'\n")
    assert config_error(path) == (
        f"{path}: keys[2].name: Expected `str` that is 1-64 characters from A-Z a-z 0-9 _ . -"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            TWO_DEPLOYMENTS + TWO_DEPLOYMENTS,
            "models[1].name: duplicate model name `fast` (first used by models[0])",
        ),
        (
            "[[keys]]\nname = 'a'\nkey_env = 'A'\n[[keys]]\nname = 'b'\nkey_env = 'B'\n"
            "[[keys]]\nname = 'a'\nkey_env = 'C'\n",
            "keys[2].name: duplicate key name `a` (first used by keys[0])",
        ),
        (
            "[[keys]]\nname = 'a'\nkey_env = 'A'\n[[keys]]\nname = 'b'\nkey_env = 'A'\n",
            "keys[1].key_env: duplicate key_env `A` (first used by keys[0])",
        ),
        (
            "[[providers]]\nname = 'openai'\n[[providers]]\nname = 'openai'\n",
            "providers[1].name: duplicate provider name `openai` (first used by providers[0])",
        ),
    ],
)
def test_duplicate_names(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: {expected}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert config_error(path) == f"{path}: cannot read config file: No such file or directory"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8080\n[router\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "llmkit.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    assert config_error(path).startswith(f"{path}: invalid TOML: ")


# --- secrets --------------------------------------------------------------------------


def test_secret_pasted_as_env_name_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "[[keys]]\nname = 'a'\nkey_env = 'sk-live-0123456789'\n")
    message = config_error(path)
    assert message.startswith(f"{path}: keys[0].key_env: Expected `str` that is an environment")
    assert "sk-live" not in message


def test_inline_api_key_points_to_env_field(tmp_path: Path) -> None:
    path = write(tmp_path, "[[providers]]\nname = 'x'\napi_key = 'sk-live-0123456789'\n")
    message = config_error(path)
    assert message.startswith(f"{path}: providers[0].api_key: unknown key (secrets are not")
    assert "`api_key_env`" in message
    assert "sk-live" not in message


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
def test_credential_headers_are_refused(tmp_path: Path, header: str) -> None:
    path = write(tmp_path, f"[[providers]]\nname = 'x'\nheaders = {{ {header} = 'Bearer sk-1' }}")
    message = config_error(path)
    assert message.startswith(f"{path}: providers[0].headers.{header}: credentials do not")
    assert "sk-1" not in message


def test_error_does_not_print_env_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_KEY_TEAM_A", "secret-value-42")
    path = write(tmp_path, "[[keys]]\nname = 'team-a'\nkey_env = 'LLMKIT_KEY_TEAM_A'\nrpm = -1\n")
    message = config_error(path)
    assert message == f"{path}: keys[0].rpm: Expected `int` >= 0, got `-1`"


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_TEST_SECRET", "s3cret")
    monkeypatch.setenv("LLMKIT_TEST_EMPTY", "")
    monkeypatch.delenv("LLMKIT_TEST_UNSET", raising=False)
    assert secret_from_env("LLMKIT_TEST_SECRET") == "s3cret"
    assert secret_from_env("LLMKIT_TEST_EMPTY") is None
    assert secret_from_env("LLMKIT_TEST_UNSET") is None
    assert secret_from_env("") is None


# --- shm names and workers ------------------------------------------------------------


def with_server(**changes: object) -> Config:
    config = default_config()
    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, **changes))


def test_shm_name_is_deterministic_and_short(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    name = shm_name_for(with_server(port=65535, uds="/tmp/x.sock"), str(path))
    assert re.fullmatch(r"/llmkit-65535-[0-9a-f]{8}", name)
    assert len(name.encode()) <= 31
    assert name == shm_name_for(with_server(port=65535, uds="/tmp/x.sock"), str(path))


def test_shm_name_is_unique_per_instance(tmp_path: Path) -> None:
    path = str(write(tmp_path, ""))
    names = {
        shm_name_for(with_server(port=8080), path),
        shm_name_for(with_server(port=8081), path),
        shm_name_for(with_server(port=8080, host="0.0.0.0"), path),
        shm_name_for(with_server(port=8080, uds="/tmp/a.sock"), path),
        shm_name_for(with_server(port=8080), str(tmp_path / "other.toml")),
        shm_name_for(with_server(port=8080), None),
    }
    assert len(names) == 6
    assert all(name.startswith("/llmkit-") for name in names)


def test_shm_name_ignores_how_the_path_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    assert shm_name_for(default_config(), "llmkit.toml") == shm_name_for(
        default_config(), str(path)
    )


def test_explicit_shm_name_wins(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[server]\nshm_name = '/mine'\n"))
    assert shm_name_for(config, None) == "/mine"


def test_resolve_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_workers(with_server(workers=3)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert resolve_workers(with_server(workers=0)) == 3


def test_resolve_workers_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert resolve_workers(default_config()) == 7
