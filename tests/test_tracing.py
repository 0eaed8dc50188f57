"""Sampled tracing through the real HTTP surface, with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import math
import random
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmkit.gateway import Gateway
from llmkit.observability import Observability
from llmkit.providers.base import Call, Target
from llmkit.tracing import build_tracing, format_traceparent, parse_traceparent
from tests.mocks.base import Fault
from tests.mocks.openai import OpenAIMock
from tests.test_observability import CHAT, chat, config_of, in_process


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def mock() -> Any:
    with OpenAIMock(key=None) as upstream:
        yield upstream


def tracing_config(rate: float) -> str:
    # An endpoint nobody listens on: the test's exporter replaces the OTLP one.
    return (
        f"[observability]\ntrace_sample_rate = {rate}\n"
        'otlp_endpoint = "http://127.0.0.1:9/v1/traces"\n'
    )


def fallback_alias(url: str) -> str:
    return (
        f'[[providers]]\nname = "local"\nbase_url = "{url}/v1"\n\n'
        '[[models]]\nname = "m"\n'
        '[[models.deployments]]\nprovider = "local"\nmodel = "upstream-x"\n'
        "input_cost_per_mtok = 0.01\n"
        '[[models.deployments]]\nprovider = "demo"\nmodel = "y"\ninput_cost_per_mtok = 100.0\n'
        '[router]\nprofile = "cost"\nbackoff_base_s = 0.0\n'
    )


def traced_demo(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> tuple[Observability, Call, list[Target]]:
    """Observability sampling every request into ``exporter``, and a chat call to alias
    ``m`` (one demo deployment) with its targets: hooks driven by hand."""
    config = config_of(tmp_path, '[[models]]\nname = "m"\n[[models.deployments]]\n'
                       'provider = "demo"\nmodel = "x"\n' + tracing_config(1.0))  # fmt: skip
    observability = Observability(config, None, build_tracing(config.observability, exporter))
    gateway = Gateway(config)
    call = gateway.decode_chat(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    return observability, call, gateway.resolve("m")


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


async def test_a_request_that_fell_back_has_a_gateway_span_and_two_attempt_spans(
    tmp_path: Path, mock: OpenAIMock, exporter: InMemorySpanExporter
) -> None:
    config = config_of(tmp_path, fallback_alias(mock.url) + tracing_config(1.0))
    mock.faults.append(Fault("status", status=500))
    async with in_process(config, exporter) as local, httpx.AsyncClient(timeout=10) as client:
        response = await client.post(local.url + CHAT, json=chat("m", "PLANTED-PROMPT-span"))
    assert response.status_code == 200
    usage = response.json()["usage"]
    spans = exporter.get_finished_spans()
    named = by_name(spans)
    (root,) = named["chat m"]
    assert root.kind == SpanKind.SERVER and root.parent is None
    attrs = root.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "m"
    assert attrs["gen_ai.provider.name"] == "demo"
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)  # type: ignore[arg-type]
    assert attrs["http.response.status_code"] == 200
    attempts = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(attempts) == 2
    first, second = sorted(attempts, key=lambda s: s.start_time or 0)
    assert first.name == "chat upstream-x" and second.name == "chat y"
    for span in (first, second):
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    assert (first.attributes or {})["gen_ai.provider.name"] == "local"
    assert (first.attributes or {})["error.type"] == "server_error"
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes or {})["llmkit.attempt"] == 2
    assert second.status.status_code != StatusCode.ERROR
    assert len(named["llmkit.router"]) == len(named["llmkit.limiter"]) == 1
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    ids = [s.context.span_id for s in spans]  # router and limiter ids derive from the root's
    assert len(set(ids)) == len(ids) == 5 and 0 not in ids
    # The upstream saw the first attempt span as its parent.
    sent = parse_traceparent(mock.requests[0].headers["traceparent"])
    assert sent == (first.context.trace_id, first.context.span_id, True)
    # No prompt text in any span.
    assert "PLANTED-PROMPT-span" not in repr([dict(s.attributes or {}) for s in spans])


async def test_an_incoming_traceparent_is_continued_and_propagated(
    tmp_path: Path, mock: OpenAIMock, exporter: InMemorySpanExporter
) -> None:
    config = config_of(tmp_path, fallback_alias(mock.url) + tracing_config(0.01))
    trace_id, parent_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    header = {"traceparent": format_traceparent(trace_id, parent_id, sampled=True)}
    async with in_process(config, exporter) as local, httpx.AsyncClient(timeout=10) as client:
        response = await client.post(local.url + CHAT, json=chat("m"), headers=header)
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans)["chat m"]
    assert root.context.trace_id == trace_id
    assert root.parent is not None and root.parent.span_id == parent_id
    assert root.parent.is_remote
    (attempt,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    sent = parse_traceparent(mock.requests[0].headers["traceparent"])
    assert sent == (trace_id, attempt.context.span_id, True)


async def test_an_unsampled_parent_is_passed_through_and_nothing_is_recorded(
    tmp_path: Path, mock: OpenAIMock, exporter: InMemorySpanExporter
) -> None:
    config = config_of(tmp_path, fallback_alias(mock.url) + tracing_config(1.0))
    incoming = format_traceparent(random.getrandbits(128) | 1, 77, sampled=False)
    async with in_process(config, exporter) as local, httpx.AsyncClient(timeout=10) as client:
        await client.post(local.url + CHAT, json=chat("m"), headers={"traceparent": incoming})
    assert exporter.get_finished_spans() == ()
    assert mock.requests[0].headers["traceparent"] == incoming


def _binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """The central ``confidence`` interval of Binomial(n, p), from the exact pmf."""
    tail = (1 - confidence) / 2

    def log_pmf(k: int) -> float:
        log_comb = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        return log_comb + k * math.log(p) + (n - k) * math.log(1 - p)

    pmf = [math.exp(log_pmf(k)) for k in range(n + 1)]
    low, acc = 0, 0.0
    while acc + pmf[low] <= tail:
        acc += pmf[low]
        low += 1
    high, acc = n, 0.0
    while acc + pmf[high] <= tail:
        acc += pmf[high]
        high -= 1
    return low, high


async def test_head_sampling_at_a_tenth_over_10000_requests(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    config = config_of(tmp_path, '[[models]]\nname = "m"\n[[models.deployments]]\n'
                       'provider = "demo"\nmodel = "x"\n' + tracing_config(0.1))  # fmt: skip
    n = 10_000
    async with in_process(config, exporter) as local:
        observability, gateway = local.observability, local.gateway
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hey"}]}'
        for _ in range(n):
            obs = observability.begin(0, "POST", CHAT, "r", None)
            call = gateway.decode_chat(body)
            call.obs = obs
            await gateway.chat(call)
            if obs is not None:
                obs.finish(200)
    roots = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    low, high = _binomial_interval(n, 0.1, 0.999)
    assert low <= len(roots) <= high, (len(roots), low, high)
    # Every sampled request is a whole trace: root, router, limiter and one attempt.
    assert len(exporter.get_finished_spans()) == 4 * len(roots)


class _CountedRandom(random.Random):
    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_head_sampling_counts_down_geometric_gaps(tmp_path: Path, rate: float) -> None:
    """Each request is sampled with probability ``rate`` (tight interval over 200,000
    requests: a gap off by one request, at 0.1, would sample 9.1%), and only a sampled
    request draws a random number: the others count down."""
    from llmkit.observability import Observability
    from llmkit.tracing import Tracing

    rng = _CountedRandom(7)
    tracing = Tracing(rate, lambda batch: None, rng=rng)
    observability = Observability(config_of(tmp_path, ""), None, tracing)
    n = 200_000
    sampled = sum(observability.begin(0, "POST", CHAT, "r", None) is not None for _ in range(n))
    spread = 3.9 * math.sqrt(n * rate * (1 - rate))  # ~1e-4 two-sided
    assert abs(sampled - n * rate) < spread, (sampled, n * rate)
    assert rng.draws == sampled + 1  # one gap drawn at start, one after each sampled request
    flags = [observability.begin(0, "POST", CHAT, "r", None) is not None for _ in range(50_000)]
    runs = "".join("x" if f else "." for f in flags).split("x")[1:-1]
    mean_gap = sum(map(len, runs)) / len(runs)  # unsampled requests between sampled ones
    assert abs(mean_gap - (1 - rate) / rate) < 0.1 * (1 - rate) / rate + 0.05


def test_hand_written_otlp_matches_the_protobuf_schema() -> None:
    """Spans written by ``llmkit.otlp`` parse with the protobuf classes into exactly what
    the SDK's own encoder writes for the same spans, built here by hand; and the SDK
    exporter's converter turns those bytes back into the same spans."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, Status, TraceFlags

    from llmkit import otlp
    from llmkit.tracing import sdk_spans

    trace_id, root = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    attributes = {"gen_ai.request.model": "m", "llmkit.attempt": 2, "llmkit.cost_usd": 0.25,
                  "llmkit.limiter.refused": False, "order": ["a#0", "a#1"], "neg": -3,
                  "long": "x" * 300}  # fmt: skip
    # Span ids are ints written little-endian (llmkit.tracing); the SDK reads big-endian.
    sdk_root, sdk_child, sdk_other = (int.from_bytes(otlp.SPAN_ID(i), "big") for i in (root, 5, 9))
    field = trace_id.to_bytes(16, "big")
    head, tail = otlp.child_shape("chat x", otlp.CLIENT, {"llmkit.attempt": 1}, "server_error")
    child_span = [head, otlp.CHILD_HEAD(otlp.child_prefix(field, root), 5, otlp.START_TAG,
                                        1_100, otlp.END_TAG, 1_900), tail]  # fmt: skip
    root_tail = [b"", otlp.span_tail("chat m", otlp.SERVER, attributes), otlp.FLAGS[True]]
    trace = otlp.trace_spans(field, root, (77).to_bytes(8, "big"), 1_000, 2_000, root_tail,
                             child_span)  # fmt: skip
    # One trace with a remote parent (and so a longer root), one that starts its own.
    other = otlp.trace_spans(field, 9, None, 3, 4, [b"", otlp.span_tail("chat n", otlp.SERVER, {}),
                                                    otlp.FLAGS[False]], [])  # fmt: skip
    mine = ExportTraceServiceRequest()
    mine.ParseFromString(otlp.encode_request([trace, other], "svc"))

    resource, scope = Resource({"service.name": "svc"}), InstrumentationScope("llmkit")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    expected = [
        ReadableSpan("chat m", SpanContext(trace_id, sdk_root, False, sampled),
                     SpanContext(trace_id, 77, True, sampled), resource, attributes,
                     kind=SpanKind.SERVER, start_time=1_000, end_time=2_000,
                     instrumentation_scope=scope),
        ReadableSpan("chat x", SpanContext(trace_id, sdk_child, False, sampled),
                     SpanContext(trace_id, sdk_root, False, sampled), resource,
                     {"llmkit.attempt": 1, "error.type": "server_error"},
                     kind=SpanKind.CLIENT, status=Status(StatusCode.ERROR), start_time=1_100,
                     end_time=1_900, instrumentation_scope=scope),
        ReadableSpan("chat n", SpanContext(trace_id, sdk_other, False, sampled), None, resource, {},
                     kind=SpanKind.SERVER, start_time=3, end_time=4, instrumentation_scope=scope),
    ]  # fmt: skip
    sdk = encode_spans(expected)

    def spans_of(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
        (rs,) = request.resource_spans
        assert MessageToDict(rs.resource) == MessageToDict(sdk.resource_spans[0].resource)
        (ss,) = rs.scope_spans
        assert ss.scope.name == "llmkit"
        found = [MessageToDict(s) for s in ss.spans]
        for span in found:  # the SDK writes an empty Status and leaves out the sampled bit
            span["flags"] = span["flags"] & 0x300
            if not span.get("status"):
                span.pop("status", None)
        return sorted(found, key=lambda span: span["name"])  # a trace's root comes last

    assert spans_of(mine) == spans_of(sdk)
    client, server, own = mine.resource_spans[0].scope_spans[0].spans
    assert server.kind == 2 and client.kind == 3 and client.status.code == 2
    assert server.flags == 0x301 and client.flags == own.flags == 0x101  # remote parent or not
    back = ExportTraceServiceRequest()
    back.ParseFromString(encode_spans(sdk_spans(resource)([trace, other])).SerializeToString())
    assert spans_of(back) == spans_of(sdk)


async def test_encoded_span_parts_are_kept_per_shape_not_mixed_up(
    tmp_path: Path, mock: OpenAIMock, exporter: InMemorySpanExporter
) -> None:
    """Span parts cached by one request (a failed try, a fallback) are not reused for a
    request that went differently; per-request attributes are each request's own."""
    config = config_of(tmp_path, fallback_alias(mock.url) + tracing_config(1.0))
    mock.faults.append(Fault("status", status=500))
    async with in_process(config, exporter) as local, httpx.AsyncClient(timeout=10) as client:
        for request_id in ("r-fell-back", "r-first-try", "r-again"):
            response = await client.post(local.url + CHAT, json=chat("m"),
                                         headers={"x-request-id": request_id})  # fmt: skip
            assert response.status_code == 200
    spans = exporter.get_finished_spans()
    roots = {s.context.trace_id: s for s in spans if s.kind == SpanKind.SERVER}
    assert len(roots) == 3 and len(spans) == 3 * 3 + 4  # root, router, limiter; tries
    by_request = {(r.attributes or {})["llmkit.request_id"]: r for r in roots.values()}
    for request_id, tries, provider in (("r-fell-back", 2, "demo"), ("r-first-try", 1, "local"),
                                        ("r-again", 1, "local")):  # fmt: skip
        root = by_request[request_id]
        attrs = root.attributes or {}
        assert attrs["llmkit.attempts"] == tries and attrs["gen_ai.provider.name"] == provider
        attempts = [s for s in spans if s.kind == SpanKind.CLIENT
                    and s.context.trace_id == root.context.trace_id]  # fmt: skip
        assert len(attempts) == tries
        last = max(attempts, key=lambda s: s.start_time or 0)
        assert (last.attributes or {})["gen_ai.provider.name"] == provider
        assert "error.type" not in (last.attributes or {})
        assert last.status.status_code != StatusCode.ERROR
        assert all(s.parent is not None and s.parent.span_id == root.context.span_id
                   for s in spans if s.context.trace_id == root.context.trace_id
                   and s is not root)  # fmt: skip


async def test_spans_are_posted_from_the_event_loop_while_serving(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies: list[bytes] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces"
    config = config_of(tmp_path, '[[models]]\nname = "m"\n[[models.deployments]]\n'
                       'provider = "demo"\nmodel = "x"\n[observability]\n'
                       f'trace_sample_rate = 1.0\notlp_endpoint = "{endpoint}"\n')  # fmt: skip
    try:
        async with in_process(config) as local, httpx.AsyncClient(timeout=10) as client:
            for _ in range(5):
                assert (await client.post(local.url + CHAT, json=chat("m"))).status_code == 200
            deadline = asyncio.get_running_loop().time() + 20
            while len(_otlp_spans(bodies)) < 20 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            spans = _otlp_spans(bodies)  # before shutdown flushes anything
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len([s for s in spans if s.kind == 2]) == 5  # one SERVER span per request
    assert len(spans) == 20


def _otlp_spans(bodies: list[bytes]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    spans = []
    for body in list(bodies):
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    return spans


@pytest.mark.parametrize("request_id", ["r", "x" * 104, "y" * 105, "z" * 128])
def test_the_root_span_carries_each_request_id_whole(
    tmp_path: Path, exporter: InMemorySpanExporter, request_id: str
) -> None:
    """Request ids up to 104 bytes are written from a table by length, longer ones the
    long way (x-request-id is cut at 128); a failed request's root has error.type."""
    from llmkit.types import Usage

    observability, call, targets = traced_demo(tmp_path, exporter)
    obs = observability.begin(0, "POST", CHAT, request_id, None)
    assert obs is not None and obs.trace is not None
    obs.routed(call, targets, obs.mark())
    obs.attempt_started(targets[0], {})
    obs.attempt_settled(True, None)
    obs.settled(Usage(prompt_tokens=300, completion_tokens=70000, total_tokens=70300))
    obs.finish(503)
    observability.close()
    (root,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    attrs = root.attributes or {}
    assert attrs["llmkit.request_id"] == request_id
    assert attrs["gen_ai.usage.output_tokens"] == 70000 and attrs["llmkit.attempts"] == 1
    assert attrs["http.response.status_code"] == 503 and attrs["error.type"] == "503"
    assert root.status.status_code == StatusCode.ERROR


def test_the_root_span_of_a_failed_request_names_its_own_error_kind(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    """The root's status, attempts and error are cached with its shape: two requests
    alike but for why their upstream failed get each their own ``error.type``."""
    from llmkit.errors import BadUpstreamResponseError, UpstreamTimeoutError

    observability, call, targets = traced_demo(tmp_path, exporter)
    failures = [("r-timeout", UpstreamTimeoutError("slow")),
                ("r-bad", BadUpstreamResponseError("garbled"))]  # fmt: skip
    for request_id, error in failures:
        obs = observability.begin(0, "POST", CHAT, request_id, None)
        assert obs is not None
        obs.routed(call, targets, obs.mark())
        obs.attempt_started(targets[0], {})
        obs.attempt_settled(False, error)
        obs.finish(502)
    observability.close()
    roots = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    kinds = {(r.attributes or {})["llmkit.request_id"]: (r.attributes or {})["error.type"]
             for r in roots}  # fmt: skip
    assert kinds == {"r-timeout": "timeout", "r-bad": "protocol"}


async def test_batches_leave_when_full_or_after_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full batch is sent at once, a partial one after the interval; nothing queued
    beyond the bound (the trace is dropped and counted)."""
    from llmkit import tracing as tracing_module

    monkeypatch.setattr(tracing_module, "BATCH_BYTES", 1000)
    monkeypatch.setattr(tracing_module, "EXPORT_INTERVAL_S", 0.2)
    monkeypatch.setattr(tracing_module, "MAX_QUEUED_BYTES", 3000)
    sent: list[list[bytes]] = []

    async def send(batch: Any) -> None:
        sent.append(list(batch))

    tracing = tracing_module.Tracing(1.0, lambda batch: None, send=send)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        tracing.record(b"t" * 400)  # the third fills a batch
    await asyncio.sleep(0.05)
    assert [len(b) for b in sent] == [3]  # all queued bytes go when they fit one POST
    started = loop.time()
    tracing.record(b"u" * 400)
    while len(sent) < 2 and loop.time() - started < 5:
        await asyncio.sleep(0.01)
    assert sent[1] == [b"u" * 400] and loop.time() - started >= 0.15
    for _ in range(10):  # the loop does not run meanwhile: the queue fills, then drops
        tracing.record(b"v" * 400)
    assert tracing.dropped == 3
    started = loop.time()
    while len(sent) < 5 and loop.time() - started < 5:
        await asyncio.sleep(0.01)
    # Full batches at once (each as many traces as reach BATCH_BYTES), the rest later.
    assert [sum(map(len, b)) for b in sent[2:]] == [1200, 1200, 400]
    tracing.shutdown()


def test_each_child_span_keeps_its_own_ids_times_and_verdict(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    """Child spans are written together at ``finish`` from what each hook noted: a refused
    request has a router and a refused limiter span and no attempt; a request whose
    client left mid-stream has its open attempt closed as released; a fallback's first
    attempt keeps its own id (the one its ``traceparent`` carried) and times."""

    observability, call, targets = traced_demo(tmp_path, exporter)
    sent: dict[str, list[str]] = {}

    def request(request_id: str, refused: bool, tries: int, settle_last: bool) -> None:
        obs = observability.begin(0, "POST", CHAT, request_id, None)
        assert obs is not None
        obs.routed(call, targets, obs.mark())
        obs.admitted(obs.mark(), refused)
        for number in range(tries):
            headers: dict[str, str] = {}
            obs.attempt_started(targets[0], headers)
            sent.setdefault(request_id, []).append(headers["traceparent"])
            if number < tries - 1 or settle_last:
                obs.attempt_settled(number == tries - 1, None)
        obs.finish(429 if refused else 200)

    request("r-refused", True, 0, True)
    request("r-left", False, 1, False)
    request("r-fell-back", False, 2, True)
    observability.close()
    spans = exporter.get_finished_spans()
    roots = {(s.attributes or {})["llmkit.request_id"]: s for s in spans
             if s.kind == SpanKind.SERVER}  # fmt: skip

    def children(request_id: str) -> dict[str, list[ReadableSpan]]:
        root = roots[request_id]
        mine = [s for s in spans if s.context.trace_id == root.context.trace_id and s is not root]
        assert all(s.parent is not None and s.parent.span_id == root.context.span_id
                   for s in mine)  # fmt: skip
        assert len({s.context.span_id for s in [root, *mine]}) == len(mine) + 1
        for span in mine:
            assert root.start_time <= span.start_time <= span.end_time <= root.end_time  # type: ignore[operator]
        return by_name(tuple(mine))

    refused = children("r-refused")
    assert sorted(refused) == ["llmkit.limiter", "llmkit.router"]
    assert (refused["llmkit.limiter"][0].attributes or {})["llmkit.limiter.refused"] is True
    left = children("r-left")["chat x"]
    assert [(s.attributes or {})["llmkit.outcome"] for s in left] == ["released"]
    tries = sorted(children("r-fell-back")["chat x"], key=lambda s: s.start_time or 0)
    assert [(s.attributes or {})["llmkit.attempt"] for s in tries] == [1, 2]
    assert [(s.attributes or {})["llmkit.outcome"] for s in tries] == ["failed", "ok"]
    assert (tries[0].end_time or 0) <= (tries[1].start_time or 0)
    assert [format_traceparent(s.context.trace_id, s.context.span_id) for s in tries] == sent[
        "r-fell-back"
    ]
