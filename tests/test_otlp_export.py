"""OTLP/HTTP export to a collector that wants credentials and TLS: the headers and the
private CA come from OpenTelemetry's own environment variables, both export paths
(the loop's aiohttp POST and the synchronous one at exit) use them, an unknown CA is
refused, and the credential is never written to the log."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llmkit.otlp import OtlpHttpExporter, env_cafile, env_headers
from tests.conftest import StartServer

CREDENTIAL = "Bearer otlp-secret-73a1c9"


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class TlsCollector:
    """An OTLP/HTTP collector on 127.0.0.1 behind TLS, its certificate from ``ca``."""

    def __init__(self, ca: trustme.CA) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        handler = type("Collector", (_Collector,), {"received": self.received})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}/v1/traces"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[tuple[trustme.CA, Path]]:
    authority = trustme.CA()
    pem = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    yield authority, pem


@pytest.fixture
def collector(ca: tuple[trustme.CA, Path]) -> Iterator[TlsCollector]:
    running = TlsCollector(ca[0])
    yield running
    running.close()


def test_headers_and_certificate_come_from_the_otel_variables() -> None:
    traces = "Authorization=Bearer%20t0k,x-team = b%2Cc ,,"
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-a=1", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": traces}
    assert env_headers(env) == {"authorization": "Bearer t0k", "x-team": "b,c"}
    assert env_headers({"OTEL_EXPORTER_OTLP_HEADERS": "x-a=1"}) == {"x-a": "1"}
    assert env_headers({}) == {}
    assert env_cafile({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/a.pem"}) == "/a.pem"
    assert env_cafile({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/a.pem",
                       "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/b.pem"}) == "/b.pem"  # fmt: skip
    assert env_cafile({}) is None


def test_a_malformed_pair_is_skipped_without_echoing_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "llmkit.otlp"):
        headers = env_headers({"OTEL_EXPORTER_OTLP_HEADERS": "secret-without-equals,x-b=2"})
    assert headers == {"x-b": "2"}
    assert "pair 1" in caplog.text and "secret-without-equals" not in caplog.text


def test_both_export_paths_send_the_headers_over_verified_tls(
    collector: TlsCollector, ca: tuple[trustme.CA, Path]
) -> None:
    exporter = OtlpHttpExporter(
        collector.url, "svc", headers={"authorization": CREDENTIAL}, cafile=str(ca[1])
    )

    async def on_the_loop() -> None:
        await exporter.send([])
        await exporter.aclose()

    asyncio.run(on_the_loop())
    exporter.export([])
    exporter.shutdown()
    assert len(collector.received) == 2
    for headers, body in collector.received:
        assert headers["authorization"] == CREDENTIAL
        assert headers["content-type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        assert request.resource_spans[0].resource.attributes[0].value.string_value == "svc"


def test_an_unknown_certificate_authority_is_refused(
    collector: TlsCollector, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = OtlpHttpExporter(collector.url, "svc", headers={"authorization": CREDENTIAL})

    async def on_the_loop() -> None:
        await exporter.send([])
        await exporter.aclose()

    with caplog.at_level(logging.WARNING, "llmkit.otlp"):
        asyncio.run(on_the_loop())
        exporter.export([])
    exporter.shutdown()
    assert collector.received == []
    assert caplog.text.count("OTLP export failed") == 2
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "certificate" in caplog.text
    assert CREDENTIAL not in caplog.text


def test_the_server_exports_through_the_otel_variables(
    start_server: StartServer,
    collector: TlsCollector,
    ca: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer%20otlp-secret-73a1c9"
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(ca[1]))
    server = start_server(
        f'[observability]\ntrace_sample_rate = 1.0\notlp_endpoint = "{collector.url}"\n',
        workers=1,
    )
    body = {"model": "demo/fast", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200
    assert server.stop() == 0  # the worker flushes its spans on the way out
    assert collector.received
    spans = 0
    for headers, raw in collector.received:
        assert headers["authorization"] == CREDENTIAL
        request = ExportTraceServiceRequest()
        request.ParseFromString(raw)
        spans += sum(s.kind == 2 for rs in request.resource_spans for ss in rs.scope_spans
                     for s in ss.spans)  # fmt: skip
    assert spans == 3
    assert "otlp-secret" not in server.log()
