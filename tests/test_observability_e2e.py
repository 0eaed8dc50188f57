"""Observability across real worker processes: exact counts from either worker, counts
that survive a killed worker, and no secret or prompt in metrics, spans or logs."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import Server, StartServer
from tests.test_observability import chat, labels, scrape, target

pytestmark = pytest.mark.multiprocess

SECRET = "sk-planted-secret-5d1e9b"
PROMPT = "PLANTED-PROMPT-e2e-41c7"
AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT = "/v1/chat/completions"

MIXED = """
[[keys]]
name = "team-a"
key_env = "OBS_E2E_KEY"
[[models]]
name = "ok"
[[models.deployments]]
provider = "demo"
model = "x"
input_cost_per_mtok = 3.0
output_cost_per_mtok = 5.0
[[models]]
name = "limited"
[[models.deployments]]
provider = "demo"
model = "y"
rpm = 4
[[models]]
name = "broken"
[[models.deployments]]
provider = "demo"
model = "status-503"
[breaker]
consecutive_failures = 100000
min_requests = 100000
"""


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBS_E2E_KEY", SECRET)


async def _send(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=AUTH) as client:
        gate = asyncio.Semaphore(16)

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await client.post(url + CHAT, json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def mixed_bodies(n: int) -> list[dict[str, Any]]:
    models = ["ok", "ok", "limited", "broken", "ok"]
    return [chat(models[i % len(models)], PROMPT, stream=i % 3 == 0) for i in range(n)]


def scrape_both_workers(server: Server) -> list[dict[Any, float]]:
    """/metrics until two different workers answered (their request-id prefixes differ)."""
    by_worker: dict[str, dict[Any, float]] = {}
    deadline = time.monotonic() + 20
    while len(by_worker) < 2 and time.monotonic() < deadline:
        with httpx.Client(timeout=10) as client:  # a new connection each time
            response = client.get(server.url + "/metrics")
        by_worker[response.headers["x-request-id"][:8]] = strip_scrapes(scrape(response.text))
    assert len(by_worker) == 2, "one worker answered every scrape"
    return list(by_worker.values())


def strip_scrapes(samples: dict[Any, float]) -> dict[Any, float]:
    """Leave out what the scrapes themselves change (the metrics route, gauges)."""
    return {
        key: value for key, value in samples.items()
        if "metrics" not in dict(key[1]).values()
        and not key[0].startswith(
            ("llmkit_worker_in_flight", "llmkit_worker_connections", "llmkit_workers")
        )
        and not key[0].endswith("_created")
    }  # fmt: skip


def expected_counts(responses: list[httpx.Response], bodies: list[dict[str, Any]]) -> Counter[Any]:
    """What the test sent, from its own side of the sockets."""
    counts: Counter[Any] = Counter()
    for body, response in zip(bodies, responses, strict=True):
        model, status = body["model"], response.status_code
        status_class = "2xx" if status < 400 else "4xx" if status < 500 else "5xx"
        key = (
            *target(model, f"{model}#0", "demo"),
            ("route", "chat"),
            ("status_class", status_class),
        )
        counts["llmkit_requests_total", key] += 1
        if status == 200 and model == "ok":
            usage = usage_of(response, body)
            tokens = target("ok", "ok#0", "demo")
            counts["tokens_in", tokens] += usage["prompt_tokens"]
            counts["tokens_out", tokens] += usage["completion_tokens"]
        if status == 429:
            counts["refusals"] += 1
        if model == "broken":
            counts["errors"] += 1
    return counts


def usage_of(response: httpx.Response, body: dict[str, Any]) -> dict[str, int]:
    if not body.get("stream"):
        return dict(response.json()["usage"])
    # The demo stream's answer has the same length as the whole answer's.
    return {"prompt_tokens": max(1, len(PROMPT) // 4), "completion_tokens": 16}


def check_counts(samples: dict[Any, float], expected: Counter[Any], n: int) -> None:
    for key, value in expected.items():
        if isinstance(key, tuple) and key[0] == "llmkit_requests_total":
            assert samples[key] == value, key
    requests = {k: v for k, v in samples.items() if k[0] == "llmkit_requests_total"}
    assert sum(requests.values()) == n
    ok = target("ok", "ok#0", "demo")
    assert (
        samples["llmkit_tokens_total", labels(**dict(ok), direction="input")]
        == expected["tokens_in", ok]
    )
    assert (
        samples["llmkit_tokens_total", labels(**dict(ok), direction="output")]
        == expected["tokens_out", ok]
    )
    refusals = labels(level="deployment", dimension="rpm")
    assert samples["llmkit_rate_limit_refusals_total", refusals] == expected["refusals"]
    broken = target("broken", "broken#0", "demo", kind="server_error")
    assert samples["llmkit_upstream_errors_total", broken] == expected["errors"]
    assert samples["llmkit_key_requests_total", labels(key="team-a")] == n
    assert samples["llmkit_http_requests_total", labels(route="chat", status="200")] == sum(
        v for k, v in expected.items()
        if isinstance(k, tuple) and k[0] == "llmkit_requests_total"
        and dict(k[1])["status_class"] == "2xx"
    )  # fmt: skip


def test_counters_from_either_worker_equal_what_was_sent(start_server: StartServer) -> None:
    server = start_server(MIXED, workers=2)
    bodies = mixed_bodies(150)
    responses = asyncio.run(_send(server.url, bodies))
    statuses = Counter(r.status_code for r in responses)
    assert statuses[200] and statuses[429] and statuses[503], statuses
    expected = expected_counts(responses, bodies)
    first, second = scrape_both_workers(server)
    assert first == second
    check_counts(first, expected, len(bodies))


def test_a_killed_worker_loses_no_count_and_resets_no_series(start_server: StartServer) -> None:
    server = start_server(MIXED, workers=2)
    bodies = mixed_bodies(60)
    responses = asyncio.run(_send(server.url, bodies))
    before = scrape_both_workers(server)[0]
    pids = server.wait_workers(2)
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    server.wait_workers(2, exclude={victim}, timeout=30)
    more = mixed_bodies(30)
    responses += asyncio.run(_send(server.url, more))
    after = scrape_both_workers(server)[0]
    assert after[("llmkit_worker_restarts_total", ())] == 1
    for key, value in before.items():
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after[key] >= value, key  # nothing reset
    check_counts(after, expected_counts(responses, bodies + more), len(bodies) + len(more))
    # Exactly one sample per series: the replacement added no duplicate series.
    with httpx.Client(timeout=10) as client:
        lines = [ln for ln in client.get(server.url + "/metrics").text.splitlines()
                 if ln and not ln.startswith("#")]  # fmt: skip
    names = [ln.rsplit(" ", 1)[0] for ln in lines]
    assert len(names) == len(set(names))


class _Collector(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        length = int(self.headers.get("Content-Length", 0))
        self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp() -> Iterator[tuple[str, list[bytes]]]:
    """A local OTLP/HTTP endpoint that keeps every export request's raw body."""
    bodies: list[bytes] = []
    handler = type("Collector", (_Collector,), {"bodies": bodies})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces", bodies
    httpd.shutdown()
    httpd.server_close()


def test_no_secret_or_prompt_in_metrics_spans_or_logs(
    start_server: StartServer, otlp: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    endpoint, exported = otlp
    log_path = tmp_path / "access.log"
    config = MIXED + (
        f'[observability]\ntrace_sample_rate = 1.0\notlp_endpoint = "{endpoint}"\n'
        f'access_log = true\naccess_log_path = "{log_path}"\n'
    )
    server = start_server(config, workers=2)
    bodies = mixed_bodies(20)
    asyncio.run(_send(server.url, bodies))
    with httpx.Client(timeout=10) as client:
        metrics = client.get(server.url + "/metrics").text
        # An upstream error body and a malformed request are echoed nowhere either.
        client.post(server.url + CHAT, content=b'{"model": "ok", "messages": "' + PROMPT.encode())
    assert server.stop() == 0  # workers flush their spans on the way out
    spans = [s for body in exported for s in _spans(body)]
    assert len([s for s in spans if s.kind == 2]) == 21  # one SERVER span per chat request
    raw_spans = b"".join(exported)
    log = log_path.read_text()
    assert len(log.splitlines()) >= 21
    places = {"metrics": metrics.encode(), "spans": raw_spans, "access log": log.encode(),
              "server log": server.log().encode()}  # fmt: skip
    for where, text in places.items():
        assert SECRET.encode() not in text, where
        assert PROMPT.encode() not in text, where
    assert '"key":"team-a"' in log


def _spans(body: bytes) -> list[Any]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_socket_requests_are_traced_and_logged_like_http(
    start_server: StartServer, otlp: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    """Over the Unix socket: one SERVER span per model request (its HTTP equivalent's
    path), an attempt span under it, an access-log line per request with an id of its
    own (frame ids repeat across connections), and no prompt anywhere."""
    import json

    from llmkit import Client

    endpoint, exported = otlp
    log_path = tmp_path / "access.log"
    server = start_server(
        f'[observability]\ntrace_sample_rate = 1.0\notlp_endpoint = "{endpoint}"\n'
        f'access_log = true\naccess_log_path = "{log_path}"\n',
        workers=1,
    )
    messages = [{"role": "user", "content": PROMPT}]
    for _ in range(2):  # two connections: frame ids 1, 2 ... on each
        with Client(server.uds) as c:
            c.chat.completions.create(model="demo/fast", messages=messages, max_tokens=4)
            for _ in c.chat.completions.create(
                model="demo/fast", messages=messages, max_tokens=4, stream=True
            ):
                pass
            c.embeddings.create(model="demo/embed", input=PROMPT)
            c.models.list()
    assert server.stop() == 0  # workers flush their spans on the way out
    spans = [s for body in exported for s in _spans(body)]
    roots = [s for s in spans if s.kind == 2]
    paths = Counter(
        kv.value.string_value for s in roots for kv in s.attributes if kv.key == "url.path"
    )
    assert paths == {"/v1/chat/completions": 4, "/v1/embeddings": 2}
    for root in roots:  # each has its attempt: a CLIENT child in its trace
        children = [s for s in spans if s.trace_id == root.trace_id and s.kind == 3]
        assert [c.parent_span_id for c in children] == [root.span_id]
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert Counter(line["path"] for line in lines) == {
        "/v1/chat/completions": 4,
        "/v1/embeddings": 2,
        "/v1/models": 2,
    }
    assert len({line["request_id"] for line in lines}) == 8
    assert all(line["status"] == 200 for line in lines)
    assert PROMPT.encode() not in b"".join(exported)
    assert PROMPT not in log_path.read_text()
