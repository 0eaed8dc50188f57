"""nginx as the cheapest honest mock upstream, and as the reverse-proxy floor.

The mock answers ``POST /v1/chat/completions`` with one fixed OpenAI completion and
``POST /stream/v1/chat/completions`` with one fixed 20-chunk SSE stream: the same bytes
for every gateway under test, at a cost close to zero.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

STREAM_CHUNKS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def completion_body() -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-4o-mini", "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                                 "refusal": None}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    }, separators=(",", ":"))  # fmt: skip


def stream_body() -> str:
    def chunk(delta: dict[str, object], finish: str | None = None) -> str:
        data = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "gpt-4o-mini", "system_fingerprint": "fp_bench",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}  # fmt: skip
        return "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": f" word{i}"}) for i in range(STREAM_CHUNKS - 2)]
    events.append(chunk({}, "stop"))
    return "".join(events) + "data: [DONE]\n\n"


class Nginx:
    """One nginx master with ``workers`` workers and the given ``server`` block body."""

    def __init__(
        self,
        workers: int,
        server_block: str,
        http_block: str = "",
        files: dict[str, str] | None = None,
    ) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="llmkit-nginx-")
        root = Path(self._dir.name)
        root.chmod(0o755)  # nginx workers run unprivileged and read the files here
        for name, content in (files or {}).items():
            (root / name).write_text(content)
        server_block = server_block.replace("{root}", str(root))
        conf = root / "nginx.conf"
        conf.write_text(f"""
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root};
    proxy_temp_path {root};
    keepalive_requests 1000000;
    {http_block}
    server {{
        listen 127.0.0.1:{self.port};
        {server_block}
    }}
}}
""")
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root)],
                                     stderr=subprocess.PIPE)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_listening(self.port, self.proc)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mock_upstream(workers: int = 1) -> Nginx:
    """nginx answering the fixed completion and the fixed stream from static files.

    nginx refuses POST to a static file with 405; ``error_page 405 =200 $uri`` is the
    standard way to serve it anyway, with no module beyond the stock build.
    """
    files = {"completion.json": completion_body(), "stream.sse": stream_body()}
    return Nginx(
        workers,
        """
        location = /v1/chat/completions {
            default_type application/json;
            alias {root}/completion.json;
            error_page 405 =200 $uri;
        }
        location = /stream/v1/chat/completions {
            default_type text/event-stream;
            alias {root}/stream.sse;
            error_page 405 =200 $uri;
        }
    """,
        files=files,
    )


def reverse_proxy(upstream_port: int, workers: int = 2) -> Nginx:
    """nginx ``proxy_pass`` to the mock, with pooled keep-alive: the floor."""
    block = """
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    """
    pool = f"upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}"
    return Nginx(workers, block, pool)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port}")
