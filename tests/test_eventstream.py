"""The event-stream decoder against AWS's framing test vectors, botocore's parser and the
mock's encoder, fed in every way the network can split it."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from botocore.eventstream import EventStreamBuffer

from llmkit.errors import BadUpstreamResponseError
from llmkit.providers.eventstream import EventMessage, EventStreamDecoder, HeaderValue
from tests.mocks.bedrock import encode_message, event_frame, exception_frame

# Encoded messages from AWS's event-stream test vectors (aws-c-event-stream; botocore's
# unit tests carry the same bytes), with what they decode to.
VECTORS: list[tuple[bytes, dict[str, HeaderValue], bytes]] = [
    (b"\x00\x00\x00\x10\x00\x00\x00\x00\x05\xc2H\xeb}\x98\xc8\xff", {}, b""),
    (b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ{'foo':'bar'}\xc3e96", {}, b"{'foo':'bar'}"),
    (b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96\x0ccontent-type\x07\x00\x10"
     b"application/json{'foo':'bar'}\x8d\x9c\x08\xb1",
     {"content-type": "application/json"}, b"{'foo':'bar'}"),
    (b"\x00\x00\x00\x62\x00\x00\x00\x52\x03\xb5\xcb\x9c"
     b"\x010\x00\x011\x01\x012\x02\x02\x013\x03\x00\x03"
     b"\x014\x04\x00\x00\x00\x04\x015\x05\x00\x00\x00\x00\x00\x00\x00\x05"
     b"\x016\x06\x00\x05bytes\x017\x07\x00\x04utf8"
     b"\x018\x08\x00\x00\x00\x00\x00\x00\x00\x08\x019\x090123456789abcdef"
     b"\x63\x35\x36\x71",
     {"0": True, "1": False, "2": 2, "3": 3, "4": 4, "5": 5, "6": b"bytes", "7": "utf8",
      "8": 8, "9": b"0123456789abcdef"}, b""),
    (b"\x00\x00\x00\x52\x00\x00\x00\x42\xbf\x23\x63\x7e"
     b"\x0d:message-type\x07\x00\x05error\x0b:error-code\x07\x00\x04code"
     b"\x0e:error-message\x07\x00\x07message\x6b\x6c\xea\x3d",
     {":message-type": "error", ":error-code": "code", ":error-message": "message"}, b""),
]  # fmt: skip
NEGATIVE = {
    "payload changed (message CRC)": b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ"
    b"{'foo':'bar'\x8d\xc3e96",
    "length changed (prelude CRC)": b"\x01\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ"
    b"{'foo':'bar'}\xc3e96",
    "header name changed (message CRC)": b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96"
    b"\x0ccontent+type\x07\x00\x10application/json{'foo':'bar'}\x8d\x9c\x08\xb1",
    "header repeated": b"\x00\x00\x00\x24\x00\x00\x00\x14\x4b\xb9\x82\xd0"
    b"\x04test\x04asdf\x04test\x04asdf\xf3\xf4\x75\x63",
}


def decode_in_pieces(data: bytes, sizes: list[int]) -> tuple[list[EventMessage], int]:
    decoder = EventStreamDecoder()
    messages: list[EventMessage] = []
    offset = 0
    for size in sizes:
        messages += decoder.feed(data[offset : offset + size])
        offset += size
    messages += decoder.feed(data[offset:])
    return messages, decoder.buffered


@pytest.mark.parametrize(("encoded", "headers", "payload"), VECTORS)
def test_aws_vectors_decode_whole_and_byte_by_byte(
    encoded: bytes, headers: dict[str, HeaderValue], payload: bytes
) -> None:
    whole, left = decode_in_pieces(encoded, [])
    assert whole == [EventMessage(headers, payload)] and left == 0
    single_bytes, left = decode_in_pieces(encoded, [1] * len(encoded))
    assert single_bytes == whole and left == 0


def test_vectors_back_to_back_in_one_piece() -> None:
    messages = list(EventStreamDecoder().feed(b"".join(v[0] for v in VECTORS)))
    assert messages == [EventMessage(headers, payload) for _, headers, payload in VECTORS]


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_corrupt_messages_are_refused(name: str) -> None:
    with pytest.raises(BadUpstreamResponseError):
        list(EventStreamDecoder().feed(NEGATIVE[name]))


def test_corrupt_prelude_is_refused_before_the_body_arrives() -> None:
    # The prelude alone proves the length is garbage; waiting for 16 MB would hang.
    with pytest.raises(BadUpstreamResponseError, match="prelude CRC"):
        list(EventStreamDecoder().feed(NEGATIVE["length changed (prelude CRC)"][:12]))


def test_oversized_message_is_refused_from_its_prelude() -> None:
    frame = event_frame("contentBlockDelta", {"delta": {"text": "x" * 200}})
    with pytest.raises(BadUpstreamResponseError, match="length"):
        list(EventStreamDecoder(max_message_bytes=100).feed(frame[:12]))


def frame_with_raw_headers(header_bytes: bytes, payload: bytes = b"") -> bytes:
    """A message with correct CRCs around whatever header bytes a test needs."""
    prelude = struct.pack(">II", 16 + len(header_bytes) + len(payload), len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def test_frame_helper_matches_the_mock_encoder() -> None:
    header = b"\x01k\x07\x00\x01v"
    assert frame_with_raw_headers(header, b"{}") == encode_message({"k": "v"}, b"{}")


@pytest.mark.parametrize(
    ("header", "error"),
    [(b"\x01k\x2a", "type 42"), (b"\x01k\x07\x00\x09short", "truncated"),
     (b"\x01k\x04\x00\x00", "truncated")],
)  # fmt: skip
def test_bad_headers_are_refused(header: bytes, error: str) -> None:
    with pytest.raises(BadUpstreamResponseError, match=error):
        list(EventStreamDecoder().feed(frame_with_raw_headers(header)))


def test_mock_frames_parse_identically_in_botocore_and_here() -> None:
    """The mock's encoder speaks AWS's framing (botocore agrees) and so does the decoder."""
    frames = [
        event_frame("messageStart", {"role": "assistant", "p": "abc"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "h\u00e9"}}),
        exception_frame("throttlingException", "slow down"),
    ]
    stream = b"".join(frames)
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    theirs = [(dict(m.headers), m.payload) for m in buffer]
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
        ours, left = decode_in_pieces(stream, sizes)
        assert [(m.headers, m.payload) for m in ours] == theirs and left == 0
    assert theirs[2][0][":exception-type"] == "throttlingException"


def test_good_messages_before_a_corrupt_one_still_arrive() -> None:
    stream = event_frame("messageStart", {"role": "assistant"}) + NEGATIVE["header repeated"]
    received: list[EventMessage] = []
    with pytest.raises(BadUpstreamResponseError, match="repeated"):
        received.extend(EventStreamDecoder().feed(stream))
    assert [m.header(":event-type") for m in received] == ["messageStart"]


def test_a_cut_message_stays_buffered() -> None:
    frame = event_frame("messageStop", {"stopReason": "end_turn"})
    decoder = EventStreamDecoder()
    assert list(decoder.feed(frame[:-1])) == [] and decoder.buffered == len(frame) - 1
    assert [m.header(":event-type") for m in decoder.feed(frame[-1:])] == ["messageStop"]
    assert decoder.buffered == 0


def test_header_accessor_only_returns_strings() -> None:
    message = EventMessage({"s": "text", "n": 5}, b"")
    assert (message.header("s"), message.header("n"), message.header("absent")) == ("text", "", "")
