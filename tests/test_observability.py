"""Metrics, the collector, error kinds and the access log, in one process.

``in_process`` serves the real ``HttpSurface`` over a real segment and a real socket in
the test's event loop, so each test can look at shm, the exporter and the log directly.
The multi-process acceptance tests are in ``test_observability_e2e.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from llmkit import state as state_module
from llmkit.accesslog import AccessLog
from llmkit.collector import MetricSource, ShmCollector
from llmkit.config import Config, load_config
from llmkit.gateway import Gateway
from llmkit.metrics import ERRORS, Series
from llmkit.observability import ERROR_KINDS, Observability
from llmkit.providers.registry import provider_names
from llmkit.state import SharedState, build_layout
from llmkit.tracing import build_tracing, format_traceparent, parse_traceparent
from shm import Atomics, Counter, LayoutBuilder
from shm.layout import Layout
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock
from workers.http import HttpSurface

_names = itertools.count()
CHAT = "/v1/chat/completions"


def config_of(tmp_path: Path, toml: str) -> Config:
    path = tmp_path / f"c{next(_names)}.toml"
    path.write_text(toml)
    return load_config(path)


@dataclass
class Local:
    url: str
    state: SharedState
    observability: Observability
    gateway: Gateway

    async def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient(timeout=10) as client:
            return scrape((await client.get(f"{self.url}/metrics")).text)


@contextlib.asynccontextmanager
async def in_process(
    config: Config,
    exporter: Any = None,
    access: AccessLog | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Local]:
    """The HTTP surface of one worker (slot 0) on a fresh segment and a free port."""
    state = SharedState.create(f"/llmkit-obs-{os.getpid()}-{next(_names)}", config)
    gateway = Gateway(config, control=state.control(config, 0))
    tracing = build_tracing(config.observability, exporter, rng)
    observability = Observability(config, state.metrics, tracing, access)
    surface = HttpSurface(gateway, state.metrics, state.metrics.workers[0], observability)
    runner = web.ServerRunner(surface.server())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Local(f"http://127.0.0.1:{port}", state, observability, gateway)
    finally:
        await runner.cleanup()
        await gateway.close()
        await observability.aclose()
        state.segment.unlink()
        state.close()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def target(model: str, deployment: str, provider: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return labels(model=model, deployment=deployment, provider=provider, **extra)


def chat(model: str, content: str = "hey", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# -- series and layout ----------------------------------------------------------------

TWO_ALIASES = """
[[keys]]
name = "team-a"
key_env = "OBS_TEST_KEY_A"
[[models]]
name = "fast"
[[models.deployments]]
provider = "demo"
model = "a"
[[models.deployments]]
provider = "openai"
model = "gpt-4o-mini"
[[models]]
name = "slow"
[[models.deployments]]
provider = "demo"
model = "b"
"""


def test_series_are_numbered_from_the_config(tmp_path: Path) -> None:
    config = config_of(tmp_path, TWO_ALIASES)
    series = Series.of(config)
    assert series.targets[:3] == (
        ("fast", "fast#0", "demo"), ("fast", "fast#1", "openai"), ("slow", "slow#0", "demo"),
    )  # fmt: skip
    providers = provider_names(config)
    assert len(series.targets) == 3 + len(providers) + 1
    assert series.targets[-1] == ("none", "none", "none")
    # A direct provider/model request maps to its provider's series, never to its model.
    assert series.target_of("openai/gpt-4.1-whatever", "openai") == series.providers["openai"]
    assert series.targets[series.providers["openai"]] == ("openai/*", "openai/*", "openai")
    assert series.target_of("slow#0", "demo") == 2
    assert series.keys == ("team-a", "master", "none")
    assert series.key_of(None) == series.key_of("unknown") == 2


def test_layout_is_fixed_by_the_config(tmp_path: Path) -> None:
    config = config_of(tmp_path, TWO_ALIASES)
    assert build_layout(config).digest == build_layout(config).digest
    more = config_of(tmp_path, TWO_ALIASES + '[[keys]]\nname = "b"\nkey_env = "OBS_B"\n')
    assert build_layout(more).digest != build_layout(config).digest


def test_a_metric_source_declared_elsewhere_is_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def declare(builder: LayoutBuilder, config: Config) -> None:
        builder.add("test.leaders", Counter.KIND, 2, Counter.SIZE)

    def collect(atomics: Atomics, layout: Layout, config: Config) -> list[CounterMetricFamily]:
        family = CounterMetricFamily("llmkit_test_leaders", "Test.", labels=("n",))
        region = layout["test.leaders"]
        for i in range(region.count):
            family.add_metric((str(i),), atomics.load_i64(region.offset_of(i)))
        return [family]

    source = MetricSource("test", declare, collect)
    monkeypatch.setattr(state_module, "METRIC_SOURCES", (source,))
    config = config_of(tmp_path, "")
    state = SharedState.create(f"/llmkit-obs-{os.getpid()}-{next(_names)}", config)
    try:
        region = state.layout["test.leaders"]
        state.segment.atomics.add_i64(region.offset_of(1), 7)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ShmCollector(state.metrics, (source,)))
        samples = scrape(generate_latest(registry).decode())
        assert samples["llmkit_test_leaders_total", labels(n="1")] == 7
        assert samples["llmkit_test_leaders_total", labels(n="0")] == 0
    finally:
        state.segment.unlink()
        state.close()


# -- error kinds from real upstream failures -----------------------------------------


@pytest.fixture
def mock() -> Any:
    with OpenAIMock(key=None) as upstream:
        yield upstream


def _mock_alias(url: str, timeout_s: float = 5.0) -> str:
    return (
        f'[[providers]]\nname = "local"\nbase_url = "{url}/v1"\ntimeout_s = {timeout_s}\n\n'
        '[[models]]\nname = "m"\n[[models.deployments]]\nprovider = "local"\nmodel = "x"\n'
        "[breaker]\nconsecutive_failures = 1000\nmin_requests = 1000\n"
        "[router]\nbackoff_base_s = 0.0\n"
    )


@pytest.mark.parametrize(
    ("fault", "stream", "kind"),
    [
        (Fault("status", status=500), False, "server_error"),
        (Fault("status", status=502), False, "server_error"),
        (Fault("status", status=400), False, "client_error"),
        (Fault("status", status=429, retry_after=0.01), False, "rate_limited"),
        (Fault("timeout", seconds=3), False, "timeout"),
        (Fault("malformed"), False, "protocol"),
        (Fault("reset", after_chunks=1), True, "reset"),
    ],
)
async def test_upstream_failures_are_counted_by_kind(
    tmp_path: Path, mock: OpenAIMock, fault: Fault, stream: bool, kind: str
) -> None:
    config = config_of(tmp_path, _mock_alias(mock.url, timeout_s=0.5))
    mock.faults.append(fault)
    async with in_process(config) as local, httpx.AsyncClient(timeout=10) as client:
        await client.post(local.url + CHAT, json=chat("m", stream=stream))
        samples = await local.counters()
    errors = {
        dict(key).get("kind"): value
        for (name, key), value in samples.items()
        if name == "llmkit_upstream_errors_total"
    }
    assert errors == {kind: 1.0}


async def test_connection_refused_is_a_connect_error(tmp_path: Path) -> None:
    with OpenAIMock(key=None) as closed:
        url = closed.url  # the port is free again once the mock stops
    config = config_of(tmp_path, _mock_alias(url))
    async with in_process(config) as local, httpx.AsyncClient(timeout=10) as client:
        response = await client.post(local.url + CHAT, json=chat("m"))
        assert response.status_code == 503
        series = local.state.metrics.series.deployments["m#0"]
        connect = ERRORS + 8 * ERROR_KINDS.index("connect")
        assert local.state.metrics.target_word(series, connect) == 1


# -- requests, tokens, cost -------------------------------------------------------------

PRICED = """
[[keys]]
name = "team-a"
key_env = "OBS_TEST_KEY_A"
[[models]]
name = "m"
[[models.deployments]]
provider = "demo"
model = "status-503"
[[models.deployments]]
provider = "demo"
model = "ok"
input_cost_per_mtok = 1000.0
output_cost_per_mtok = 2000.0
[router]
profile = "cost"
backoff_base_s = 0.0
[breaker]
consecutive_failures = 1000
min_requests = 1000
"""


BAD = ("m", "m#0", "demo")


async def test_fallback_tokens_cost_and_key_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBS_TEST_KEY_A", "sk-obs-unit-secret")
    config = config_of(tmp_path, PRICED)
    auth = {"Authorization": "Bearer sk-obs-unit-secret"}
    async with in_process(config) as local, httpx.AsyncClient(timeout=10, headers=auth) as client:
        answers = [await client.post(local.url + CHAT, json=chat("m")) for _ in range(4)]
        samples = await local.counters()
    assert {r.status_code for r in answers} == {200}
    usage = [r.json()["usage"] for r in answers]
    tokens_in = sum(u["prompt_tokens"] for u in usage)
    tokens_out = sum(u["completion_tokens"] for u in usage)
    ok = target("m", "m#1", "demo")
    bad = target(*BAD)
    assert samples["llmkit_requests_total", (*ok, ("route", "chat"), ("status_class", "2xx"))]
    served = sum(
        v for (n, k), v in samples.items()
        if n == "llmkit_requests_total" and dict(k)["status_class"] == "2xx"
    )  # fmt: skip
    assert served == 4
    assert samples["llmkit_tokens_total", labels(**dict(ok), direction="input")] == tokens_in
    assert samples["llmkit_tokens_total", labels(**dict(ok), direction="output")] == tokens_out
    cost = (tokens_in * 1000 + tokens_out * 2000) / 1e6
    assert samples["llmkit_cost_usd_total", ok] == pytest.approx(cost)
    assert samples["llmkit_key_requests_total", labels(key="team-a")] == 4
    assert samples["llmkit_key_cost_usd_total", labels(key="team-a")] == pytest.approx(cost)
    # Every request whose first try went to the failing deployment fell back once.
    fallbacks = samples.get(("llmkit_fallbacks_total", bad), 0)
    errors = samples.get(("llmkit_upstream_errors_total", target(*BAD, kind="server_error")), 0)
    attempts = samples["llmkit_upstream_attempts_total", ok]
    assert fallbacks == errors == samples.get(("llmkit_upstream_attempts_total", bad), 0)
    assert fallbacks >= 1  # the cost profile tries the unpriced, failing deployment first
    assert attempts == 4
    # The secret never shows; the key's name does.
    text = httpx.Response(200, text=str(samples)).text
    assert "sk-obs-unit-secret" not in text


async def test_rate_limit_refusals_are_counted_by_level_and_dimension(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        '[limits]\nrpm = 3\n[[models]]\nname = "m"\n[[models.deployments]]\n'
        'provider = "demo"\nmodel = "x"\nmax_concurrency = 0\n',
    )
    async with in_process(config) as local, httpx.AsyncClient(timeout=10) as client:
        statuses = [(await client.post(local.url + CHAT, json=chat("m"))).status_code
                    for _ in range(5)]  # fmt: skip
        samples = await local.counters()
    assert statuses.count(429) == 2
    assert samples["llmkit_rate_limit_refusals_total", labels(level="global", dimension="rpm")] == 2
    m = target("m", "m#0", "demo")
    assert samples["llmkit_requests_total", (*m, ("route", "chat"), ("status_class", "4xx"))] == 2


async def test_metrics_off_counts_nothing(tmp_path: Path) -> None:
    config = config_of(tmp_path, "[observability]\nmetrics = false\n")
    async with in_process(config) as local, httpx.AsyncClient(timeout=10) as client:
        assert local.observability.begin(0, "POST", CHAT, "r", None) is None
        assert (await client.post(local.url + CHAT, json=chat("demo/x"))).status_code == 200
        samples = await local.counters()
    assert not [k for k in samples if k[0].startswith(("llmkit_requests", "llmkit_http_requests"))]


async def test_openmetrics_is_negotiated(tmp_path: Path) -> None:
    async with in_process(config_of(tmp_path, "")) as local:
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(local.url + "/metrics", headers=accept)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


# -- access log -------------------------------------------------------------------------


async def test_access_log_lines_carry_the_request_never_the_secret_or_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBS_TEST_KEY_A", "sk-obs-log-secret")
    config = config_of(tmp_path, PRICED)
    log_path = tmp_path / "access.log"
    access = AccessLog(str(log_path))
    auth = {"Authorization": "Bearer sk-obs-log-secret", "x-request-id": "req-42"}
    async with (
        in_process(config, access=access) as local,
        httpx.AsyncClient(timeout=10, headers=auth) as client,
    ):
        await client.post(local.url + CHAT, json=chat("m", "PLANTED-PROMPT-7f3a"))
        await client.post(local.url + CHAT, json=chat("nope"))
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["request_id"] == "req-42" and first["status"] == 200
    assert first["model"] == "m" and first["deployment"] == "m#1" and first["provider"] == "demo"
    assert first["key"] == "team-a" and first["tokens_out"] > 0 and first["cost_usd"] > 0
    assert lines[1]["status"] == 404
    raw = log_path.read_text()
    assert "sk-obs-log-secret" not in raw and "PLANTED-PROMPT-7f3a" not in raw


async def test_prompts_are_logged_only_when_enabled(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    access = AccessLog(str(log_path), log_prompts=True)
    async with in_process(config_of(tmp_path, ""), access=access) as local:
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(local.url + CHAT, json=chat("demo/x", "PLANTED-PROMPT-9c1d"))
    assert json.loads(log_path.read_text())["messages"][0]["content"] == "PLANTED-PROMPT-9c1d"


def test_the_access_log_is_off_by_default(tmp_path: Path) -> None:
    config = config_of(tmp_path, "")
    assert not config.observability.access_log
    assert Observability.build(config, None).access is None


# -- traceparent and the optional SDK ---------------------------------------------------


def test_traceparent_parsing() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(good) == (
        0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True,
    )  # fmt: skip
    assert parse_traceparent(good[:-2] + "00")[2] is False  # type: ignore[index]
    assert format_traceparent(*parse_traceparent(good)) == good  # type: ignore[misc]
    assert parse_traceparent("01" + good[2:] + "-future") is not None
    for bad in (
        "", "garbage", good + "-x", "ff" + good[2:], good.replace("4bf9", "zzzz"),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    ):  # fmt: skip
        assert parse_traceparent(bad) is None, bad


TRACING_OFF = """
import sys
from llmkit.config import Config, ObservabilityConfig
from llmkit.observability import Observability
from llmkit.tracing import build_tracing
logged = ObservabilityConfig(access_log=True, access_log_path="/dev/null")
obs = Observability.build(Config(observability=logged), None)
rec = obs.begin(0, "POST", "/v1/chat/completions", "r", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
assert rec is not None and not rec.sampled and not obs.tracing.enabled
rec.finish(200)
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported the SDK"
sys.modules["opentelemetry"] = None  # the extra is not installed: OTLP export needs none
traced = build_tracing(ObservabilityConfig(otlp_endpoint="http://127.0.0.1:1/v1/traces"))
assert traced.enabled
traced.shutdown()
print("ok")
"""


def test_tracing_off_never_imports_the_sdk() -> None:
    out = subprocess.run([sys.executable, "-c", TRACING_OFF], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    import re

    dashboard = Path(__file__).parent.parent / "llmkit/examples/grafana-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(llmkit_[a-z_]+)\b", e)}
    used.discard("llmkit_multiplexer_")  # a regex over the multiplexer's own source
    config = config_of(tmp_path, TWO_ALIASES)
    state = SharedState.create(f"/llmkit-obs-{os.getpid()}-{next(_names)}", config)
    try:
        collector = ShmCollector(state.metrics)
        exposed = set()
        for family in collector.collect():
            suffixes = ("", "_total", "_bucket", "_count", "_sum")
            exposed |= {family.name + s for s in suffixes}
    finally:
        state.segment.unlink()
        state.close()
    assert used and used <= exposed, used - exposed
