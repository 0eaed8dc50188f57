"""The Redis side of cluster mode: two Lua scripts and the client that runs them.

One sync is one round trip (``sync``): a script that, atomically on the Redis server,
marks this host alive, leases from and gives back to every cluster-wide bucket, and
reads the shared health hash. Publishing a local breaker opening is a second, rare
script (``publish``) that also announces the news on a pub/sub channel, which every
host listens to (``listen``), so a breaker opening reaches the others at once rather
than at their next sync; the hash is what a host that was not listening catches up
from. Both scripts read the clock with Redis ``TIME``, so hosts' clocks never
have to agree; deadlines cross the wire as "milliseconds from now".

Buckets are token buckets with capacity = the per-minute limit and a refill of
``limit / 60 s`` (the same burst and rate as the local GCRA buckets), stored as a hash
``{t: tokens (float), ts: µs of the last change}``. A missing key is a full bucket; a
bucket that refills completely expires, so an idle cluster keeps nothing in Redis.
Time is kept in µs because Lua numbers are doubles: ns since the epoch would not be
exact, µs (about 1.7e15) are.

Keys (one hash tag per cluster, so one Redis Cluster slot): ``<prefix>:hosts`` (zset
host id -> last sync µs), ``<prefix>:health`` (hash ``open:<deployment>`` /
``cool:<deployment>`` -> deadline in ms since the epoch), ``<prefix>:limit:<entity>:
<requests|tokens>`` (a bucket); channel ``<prefix>:news`` (JSON field -> ms left).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SYNC_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local host_ttl_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - host_ttl_ms * 1000))
redis.call('PEXPIRE', KEYS[1], host_ttl_ms)
local out = {redis.call('ZCARD', KEYS[1])}
for i = 3, #KEYS do
  local a = 4 + (i - 3) * 3
  local limit = tonumber(ARGV[a])
  local want = tonumber(ARGV[a + 1])
  local give = tonumber(ARGV[a + 2])
  local rate = limit / 60000000
  local tokens = limit
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  if state[1] then
    tokens = math.min(limit, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  tokens = math.min(limit, tokens + give)
  local grant = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - grant
  if grant > 0 or give > 0 then
    if tokens < limit then
      redis.call('HSET', KEYS[i], 't', string.format('%.6f', tokens),
                 'ts', string.format('%.0f', now))
      redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rate / 1000) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  local wait = 0
  if tokens < 1 then wait = math.ceil((1 - tokens) / rate) end
  out[#out + 1] = grant
  out[#out + 1] = math.floor(tokens)
  out[#out + 1] = wait
  out[#out + 1] = math.ceil((limit - tokens) / rate)
end
if ARGV[3] == '1' then
  local now_ms = math.floor(now / 1000)
  local health = redis.call('HGETALL', KEYS[2])
  for j = 1, #health, 2 do
    local left = tonumber(health[j + 1]) - now_ms
    if left > 0 then
      out[#out + 1] = health[j]
      out[#out + 1] = left
    else
      redis.call('HDEL', KEYS[2], health[j])
    end
  end
end
return out
"""

PUBLISH_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local longest = 0
for i = 3, #ARGV, 2 do
  local left = tonumber(ARGV[i + 1])
  local deadline = now_ms + left
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if deadline > old then
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.0f', deadline))
  end
  longest = math.max(longest, left)
end
if redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """One bucket's answer: units granted, units still free, µs until one unit is free
    (0 = some are), µs until the bucket is full."""

    granted: int
    free: int
    wait_us: int
    full_us: int


@dataclass(frozen=True, slots=True)
class SyncReply:
    hosts: int
    leases: list[Lease]
    health: dict[str, int]  # "open:<deployment>" / "cool:<deployment>" -> ms left


@dataclass(frozen=True, slots=True)
class BucketRequest:
    """What one sync asks of one bucket."""

    key: str
    limit: int
    want: int
    give: int


class RedisLink:
    """The sync task's connection: one client, both scripts, a deadline on every call.

    Calls raise ``redis.RedisError`` or ``TimeoutError`` on any failure; the client
    reconnects by itself on the next call. No retries here: the sync task decides.
    """

    def __init__(self, url: str, password: str | None, timeout_s: float, prefix: str) -> None:
        self._timeout_s = timeout_s
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._sync = self._client.register_script(SYNC_SCRIPT)
        self._publish = self._client.register_script(PUBLISH_SCRIPT)
        self._hosts_key = f"{prefix}:hosts"
        self._health_key = f"{prefix}:health"
        self._channel = f"{prefix}:news"
        self._news = msgspec.json.Decoder(dict[str, int])

    async def sync(
        self,
        host: str,
        host_ttl_ms: int,
        buckets: Sequence[BucketRequest],
        read_health: bool,
    ) -> SyncReply:
        """One round trip: heartbeat, every bucket's lease and return, the health hash."""
        keys = [self._hosts_key, self._health_key, *(b.key for b in buckets)]
        args: list[str | int] = [host, host_ttl_ms, 1 if read_health else 0]
        for b in buckets:
            args += (b.limit, b.want, b.give)
        reply = await self._call(self._sync(keys=keys, args=args))
        return _parse_sync(reply, len(buckets))

    async def publish(self, entries: Mapping[str, int]) -> None:
        """Raise the shared deadlines of ``entries`` (field -> ms from now)."""
        args: list[str | int | bytes] = [self._channel, msgspec.json.encode(dict(entries))]
        for field, left_ms in entries.items():
            args += (field, left_ms)
        await self._call(self._publish(keys=[self._health_key], args=args))

    async def listen(self) -> AsyncIterator[dict[str, int]]:
        """Other hosts' news as it is published; raises when the connection fails."""
        pubsub = self._client.pubsub()
        try:
            await self._call(pubsub.subscribe(self._channel))
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield self._news.decode(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, call: Any) -> Any:
        return await asyncio.wait_for(call, self._timeout_s)


def _parse_sync(reply: list[Any], buckets: int) -> SyncReply:
    leases = [Lease(*(int(v) for v in reply[1 + 4 * i : 5 + 4 * i])) for i in range(buckets)]
    rest = reply[1 + 4 * buckets :]
    health = {
        (field.decode() if isinstance(field, bytes) else str(field)): int(left)
        for field, left in zip(rest[::2], rest[1::2], strict=True)
    }
    return SyncReply(int(reply[0]), leases, health)
