"""The access log: one JSON object per finished request, through ``logging``.

Off by default (``[observability] access_log``). Fields: ``time`` (epoch seconds),
``request_id``, ``method``, ``path``, ``status``, ``duration_ms``, ``model`` (as asked),
``deployment``, ``provider``, ``key`` (the virtual key's NAME, never its secret),
``tokens_in``, ``tokens_out``, ``cost_usd``, ``attempts``, ``dedup_role`` (multiplexer
leader/follower), ``error_kind`` (of the last failed upstream attempt) and
``trace_id`` when the request was traced. ``messages`` only with ``log_prompts``.
"""

from __future__ import annotations

import logging
import sys

import msgspec

LOGGER = "llmkit.access"


class AccessLog:
    """Writes access-log records to a file (or standard error) via the ``llmkit.access``
    logger, which does not propagate: the access log never mixes with the server log."""

    def __init__(self, path: str = "", log_prompts: bool = False) -> None:
        self.log_prompts = log_prompts
        self._logger = logging.getLogger(LOGGER)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        handler: logging.Handler
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._logger.addHandler(handler)
        self._encode = msgspec.json.Encoder().encode

    def write(self, record: dict[str, object]) -> None:
        self._logger.info(self._encode(record).decode())

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()
