"""Create, attach and unlink the POSIX shared-memory segment that holds one layout.

Header layout (``HEADER_SIZE`` = 128 bytes, the first two cache lines):

====== ===== =========================================================
offset bytes field
====== ===== =========================================================
0      8     magic ``b"LLMKSHM\\x01"``, written last when creating
8      4     layout version (uint32)
12     4     header size (uint32)
16     8     total size in bytes (uint64)
24     8     owner pid (int64): the supervisor that created the segment
32     8     created at, CLOCK_REALTIME ns (int64)
40     32    layout hash (sha256 of the layout, see ``shm.layout``)
72     56    reserved, zero
====== ===== =========================================================

The segment is created with mode 0600. A segment left behind by a crashed server (its
owner pid no longer alive, or a header that never got its magic) is replaced at start;
one whose owner is still alive is an error, so two servers never share counters by
accident.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import posix_ipc

from shm._atomics import Atomics
from shm.layout import HEADER_SIZE, LAYOUT_VERSION, Layout

MAGIC = b"LLMKSHM\x01"
_HEADER = struct.Struct("<8sIIQqq32s")


class SegmentError(Exception):
    """The segment could not be created or attached; the message says why."""


class Segment:
    """An open mapping of a segment: ``atomics`` for cells, ``name`` to find it again."""

    def __init__(self, name: str, mapping: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._map = mapping
        self.atomics = Atomics(mapping)

    @property
    def size(self) -> int:
        return len(self._map)

    @classmethod
    def create(cls, name: str, layout: Layout, owner_pid: int | None = None) -> Segment:
        """Create the segment for ``layout``, replacing a stale one of the same name."""
        pid = os.getpid() if owner_pid is None else owner_pid
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=layout.size)
        except posix_ipc.ExistentialError:
            _remove_if_stale(name)
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=layout.size)
        except (ValueError, OSError) as exc:
            raise SegmentError(f"cannot create shared memory {name}: {exc}") from exc
        try:
            os.fchmod(shm.fd, 0o600)
            mapping = mmap.mmap(shm.fd, layout.size)
        finally:
            shm.close_fd()
        _write_header(mapping, layout, pid)
        return cls(name, mapping, owner=True)

    @classmethod
    def attach(cls, name: str, layout: Layout) -> Segment:
        """Map an existing segment; its header must match ``layout`` exactly."""
        mapping = _map_existing(name)
        try:
            _check_header(name, mapping, layout)
        except SegmentError:
            mapping.close()
            raise
        return cls(name, mapping, owner=False)

    def owner_pid(self) -> int:
        return read_header(self._map)[4]

    def close(self) -> None:
        """Unmap. Views created over ``atomics`` must not be used afterwards."""
        self.atomics.release()
        self._map.close()

    def unlink(self) -> None:
        """Remove the name; existing mappings stay valid until closed."""
        unlink(self.name)


def unlink(name: str) -> bool:
    """Remove segment ``name``; False if it did not exist."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def read_header(mapping: mmap.mmap) -> tuple[bytes, int, int, int, int, int, bytes]:
    """Decode the header fields in table order."""
    if len(mapping) < HEADER_SIZE:
        raise SegmentError(f"segment is {len(mapping)} bytes, smaller than its header")
    return _HEADER.unpack_from(mapping, 0)


def _write_header(mapping: mmap.mmap, layout: Layout, pid: int) -> None:
    fields = (b"\0" * 8, LAYOUT_VERSION, HEADER_SIZE, layout.size, pid, time.time_ns())
    _HEADER.pack_into(mapping, 0, *fields, layout.digest)
    mapping[0:8] = MAGIC


def _map_existing(name: str) -> mmap.mmap:
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise SegmentError(
            f"shared memory {name} does not exist (is the server running?)"
        ) from None
    except posix_ipc.PermissionsError as exc:
        raise SegmentError(f"shared memory {name}: {exc}") from exc
    try:
        if shm.size < HEADER_SIZE:
            raise SegmentError(f"shared memory {name} is {shm.size} bytes: not an llmkit segment")
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()


def _check_header(name: str, mapping: mmap.mmap, layout: Layout) -> None:
    magic, version, header_size, size, _pid, _created, digest = read_header(mapping)
    if magic != MAGIC:
        raise SegmentError(f"shared memory {name} is not an llmkit segment (bad magic)")
    if version != LAYOUT_VERSION or header_size != HEADER_SIZE:
        raise SegmentError(
            f"shared memory {name} has layout version {version}, this process speaks "
            f"{LAYOUT_VERSION}: restart the server with one llmkit version"
        )
    if digest != layout.digest or size != layout.size or len(mapping) != size:
        raise SegmentError(
            f"shared memory {name} has layout hash {digest.hex()[:12]} ({size} bytes), "
            f"this process computed {layout.digest.hex()[:12]} ({layout.size} bytes): "
            "it was built from a different configuration"
        )


def _remove_if_stale(name: str) -> None:
    try:
        mapping = _map_existing(name)
    except SegmentError:
        unlink(name)
        return
    try:
        magic, _version, _header_size, _size, pid, _created, _digest = read_header(mapping)
    finally:
        mapping.close()
    if magic == MAGIC and pid != os.getpid() and _alive(pid):
        raise SegmentError(f"shared memory {name} is in use by a running server (pid {pid})")
    unlink(name)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
