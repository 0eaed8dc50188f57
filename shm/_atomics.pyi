"""Lock-free atomic operations on 8-byte words of a shared buffer.

Layouts (offsets in bytes from the buffer start; every cell 8-byte aligned):

- int64 word, 8 bytes: native-endian two's-complement int64.
- float64 word, 8 bytes: native-endian IEEE-754 binary64 (CAS compares bits).
- GCRA cell, 8 bytes: int64 theoretical arrival time in ns; 0 = idle bucket.
- EWMA cell, 16 bytes: word 0 = float32 mean (bits 0-31) | float32 variance
  (bits 32-63), all-zero = empty; word 1 = int64 update count.
- multiplexer table: ``slots`` slots of ``stride`` bytes from ``offset``, each four
  int64 words: tag (0 = free), owner (0 = unpublished), pid, claimed_ns (see
  ``llmkit/mux_table.py``).
"""

from typing import final

from typing_extensions import Buffer

# (words, statuses): a packed request plan, see Plan in _atomics.c and
# llmkit.metrics.pack_plan
RequestPlan = tuple[bytes, bytes]

@final
class Atomics:
    """Atomic operations on 8-byte words of one writable buffer (mmap, bytearray, ...)."""

    def __init__(self, buffer: Buffer) -> None: ...
    def __len__(self) -> int: ...
    def release(self) -> None: ...
    def load_i64(self, offset: int) -> int: ...
    def store_i64(self, offset: int, value: int) -> None: ...
    def add_i64(self, offset: int, delta: int) -> int: ...
    def add_i64_clock(self, offset: int, delta: int) -> int: ...
    def cas_i64(self, offset: int, expected: int, new: int) -> bool: ...
    def load_f64(self, offset: int) -> float: ...
    def store_f64(self, offset: int, value: float) -> None: ...
    def add_f64(self, offset: int, delta: float) -> float: ...
    def cas_f64(self, offset: int, expected: float, new: float) -> bool: ...
    def max_i64(self, offset: int, value: int) -> int: ...
    def gcra_acquire(
        self, offset: int, now_ns: int, interval_ns: int, capacity_ns: int, cost: int = 1
    ) -> int: ...
    def gcra_refund(self, offset: int, amount_ns: int) -> None: ...
    def gcra_peek(self, offset: int, now_ns: int, interval_ns: int, capacity_ns: int) -> int: ...
    def ewma_update(self, offset: int, sample: float, alpha: float) -> tuple[float, float]: ...
    def ewma_read(self, offset: int) -> tuple[float, float]: ...
    # --- observability: batched updates, every offset checked before any word changes
    def add_ones(self, *offsets: int) -> None: ...
    def add_i64s(self, *offset_delta_pairs: int) -> None: ...
    def add_f64s(self, *offset_delta_pairs: float) -> None: ...
    def observe(self, bounds: tuple[float, ...], value: float, /, *offsets: int) -> None: ...
    def record_request(
        self,
        plan: RequestPlan,
        status: int,
        value: float,
        in_delta: int,
        out_delta: int,
        cost: float,
        second: float | None,
        /,
        *ones: int,
    ) -> None: ...
    def record_finished(
        self,
        plan: RequestPlan,
        status: int,
        started_ns: int,
        first_ns: int,
        in_delta: int,
        out_delta: int,
        cached: int,
        /,
    ) -> None: ...
    # --- multiplexer ---
    # A tag is an int, or a key's bytes (hashed in C: their ``mux_tag``).
    def mux_acquire(
        self,
        offset: int,
        stride: int,
        slots: int,
        probes: int,
        tag: int | Buffer,
        owner: int,
        pid: int,
    ) -> int | tuple[int, int, int]: ...
    def mux_release(self, offset: int, tag: int | Buffer, owner: int) -> bool: ...
    # ``mux_acquire`` for a leader (everything but the tag bound once): a claim also
    # adds 1 at ``counter``; ``mux_unlead`` releases by slot index.
    def mux_lead(
        self,
        offset: int,
        stride: int,
        slots: int,
        probes: int,
        owner: int,
        pid: int,
        counter: int,
        tag: int | Buffer,
    ) -> int | tuple[int, int, int]: ...
    def mux_unlead(
        self, offset: int, stride: int, owner: int, index: int, tag: int | Buffer
    ) -> bool: ...
    def mux_tag(self, key: Buffer, /) -> int: ...
