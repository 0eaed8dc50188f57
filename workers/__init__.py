"""Processes: the supervisor, the uvloop workers and their transports."""

import itertools
import secrets
from collections.abc import Iterator


def request_ids() -> Iterator[str]:
    """A surface's request ids: a random 32-bit prefix per surface, then a counter, so
    they are unique across workers and restarts without a syscall per request."""
    prefix = secrets.token_hex(4)
    return (f"{prefix}{n:08x}" for n in itertools.count())
