"""Tests of the sans-IO wire protocol (raftchan.protocol)."""

from __future__ import annotations

import math
import struct
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftchan.errors import (
    ERROR_CODES,
    LimitExceeded,
    NotLeader,
    ProtocolError,
    RaftchanError,
    RequestInvalid,
)
from raftchan.limits import Limits
from raftchan.protocol import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    SESSION_ID_BYTES,
    Append,
    ChannelInfo,
    Delete,
    EndSession,
    Fault,
    FrameDecoder,
    Info,
    MemberAdd,
    MemberList,
    MemberRemove,
    Open,
    Ping,
    Poll,
    Read,
    ReadResult,
    Request,
    Status,
    Stop,
    check_hello,
    decode_body,
    encode_frame,
    error_response,
    hello_request,
    hello_response,
    ok_response,
    parse_request,
    response_error,
)

SID = bytes(range(SESSION_ID_BYTES))


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_all(decoder: FrameDecoder, *chunks: bytes) -> list[dict[str, Any]]:
    """Feed chunks one at a time, draining complete messages after each, as a reader does."""
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder.messages())
    return out


def over_the_wire(message: dict[str, Any]) -> dict[str, Any]:
    [decoded] = decode_all(FrameDecoder(), encode_frame(message))
    return decoded


# -- framing ----------------------------------------------------------------------------

MESSAGES: list[dict[str, Any]] = [
    {"id": 1, "type": "append", "channel": "c", "items": [b"\x01", b"\xff" * 300]},
    {"type": "hello", "version": 1},
    {},
    {"id": 2, "ok": True, "indexes": [0, None, 2**40], "text": "ünïcode"},
]
STREAM = b"".join(encode_frame(m) for m in MESSAGES)


def test_a_frame_is_a_big_endian_length_and_a_msgpack_map() -> None:
    frame = encode_frame({"a": b"b"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"a": b"b"}


def test_several_frames_in_one_feed() -> None:
    assert decode_all(FrameDecoder(), STREAM) == MESSAGES


def test_frames_split_at_every_byte_boundary_decode_identically() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        assert decode_all(decoder, STREAM[:cut], STREAM[cut:]) == MESSAGES, cut
        assert decoder.buffered == 0


def test_frames_fed_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    seen: list[int] = []
    out: list[dict[str, Any]] = []
    for position in range(len(STREAM)):
        got = decode_all(decoder, STREAM[position : position + 1])
        out.extend(got)
        if got:
            seen.append(position)
    assert out == MESSAGES
    # Each message comes out exactly when its last byte arrives.
    ends, total = [], 0
    for message in MESSAGES:
        total += len(encode_frame(message))
        ends.append(total - 1)
    assert seen == ends


def test_buffered_counts_the_incomplete_frame() -> None:
    decoder = FrameDecoder()
    frame = encode_frame({"x": 1})
    decode_all(decoder, frame + frame[:3])
    assert decoder.buffered == 3


@settings(derandomize=True, deadline=None, database=None, max_examples=200)
@given(
    messages=st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.none() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(),
            max_size=4,
        ),
        max_size=5,
    ),
    data=st.data(),
)
def test_any_split_of_any_frames_decodes_the_same_messages(
    messages: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = FrameDecoder()
    assert decode_all(decoder, *chunks) == messages
    assert decoder.buffered == 0


def test_an_oversized_frame_is_refused_as_soon_as_its_header_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    header = struct.pack(">I", 11)
    decoder.feed(header[:2])
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(header[2:])
    assert caught.value.details == {"limit": "max_frame_bytes", "size": 11}
    assert "11" in str(caught.value) and "10" in str(caught.value)


def test_a_huge_length_is_refused_without_waiting_for_a_body() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(max_frame_bytes=1 << 20).feed(b"\xff\xff\xff\xff")


def test_a_frame_at_the_limit_is_accepted() -> None:
    body = msgpack.packb({"k": b"x" * 20})
    decoder = FrameDecoder(max_frame_bytes=len(body))
    assert decode_all(decoder, frame_of(body)) == [{"k": b"x" * 20}]


def test_an_oversized_frame_behind_a_good_one_is_refused_after_the_good_one() -> None:
    good = encode_frame({"ok": True})
    decoder = FrameDecoder(max_frame_bytes=64)
    decoder.feed(good + struct.pack(">I", 65))
    messages = decoder.messages()
    assert next(messages) == {"ok": True}
    with pytest.raises(ProtocolError):
        next(messages)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        b"\x80\x80",  # two maps in one frame
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"",
    ],
)
def test_garbage_in_a_frame_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_all(FrameDecoder(), frame_of(body))
    assert type(caught.value) is ProtocolError


@pytest.mark.parametrize("value", [[1, 2], 5, "map", b"map", None, True])
def test_a_body_that_is_not_a_map_is_a_protocol_error(value: Any) -> None:
    with pytest.raises(ProtocolError, match="not a map"):
        decode_all(FrameDecoder(), frame_of(msgpack.packb(value)))


def test_decode_body_accepts_integer_keys() -> None:
    assert decode_body(msgpack.packb({1: "a"})) == {1: "a"}


# -- handshake --------------------------------------------------------------------------


def test_hello_both_ways() -> None:
    check_hello(over_the_wire(hello_request()))
    response = over_the_wire(hello_response("n1"))
    check_hello(response)
    assert response["node"] == "n1"


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, "1", None])
def test_a_hello_of_another_version_names_the_supported_one(version: Any) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_hello({"type": "hello", "version": version})
    assert caught.value.details == {"supported": PROTOCOL_VERSION}
    assert f"speaks {PROTOCOL_VERSION}" in str(caught.value)


@pytest.mark.parametrize("message", [{}, {"type": "open", "version": 1}, {"version": 1}])
def test_a_first_frame_that_is_not_a_hello_is_a_protocol_error(message: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="hello"):
        check_hello(message)


# -- requests ---------------------------------------------------------------------------

EXAMPLES: list[Request] = [
    Open(id=1, channel="jobs", maxlen=None),
    Open(id=2, channel="jobs", maxlen=100),
    Append(id=3, channel="jobs", session=SID, seq=1, items=[msgpack.packb({"x": 1}), b""]),
    Append(id=2**63, channel="j" * 256, session=SID, seq=2**40, items=[b"\x00" * 100]),
    Info(id=4, channel="jobs"),
    Read(id=5, channel="jobs", start=None, end=None),
    Read(id=6, channel="jobs", start=3, end=9),
    Poll(id=7, channel="jobs", start=2, min_position=10, wait=1.5),
    Poll(id=8, channel="jobs", start=0, min_position=0, wait=0.0),
    Stop(id=9, channel="jobs"),
    Delete(id=10, channel="jobs"),
    EndSession(id=11, session=SID),
    Status(id=0),
    Ping(id=16),
    Fault(id=12, block=["127.0.0.1:7201"]),
    MemberList(id=13),
    MemberAdd(id=14, address="127.0.0.1:7204", client_address="127.0.0.1:7104", name="n4"),
    MemberRemove(id=15, address="127.0.0.1:7201"),
]


def test_the_examples_cover_every_request_type() -> None:
    assert {type(r) for r in EXAMPLES} == set(REQUEST_TYPES.values())


@pytest.mark.parametrize("request_", EXAMPLES, ids=lambda r: f"{r.TYPE}-{r.id}")
def test_every_request_roundtrips_through_the_wire(request_: Request) -> None:
    wire = request_.to_wire()
    assert wire["type"] == request_.TYPE and wire["id"] == request_.id
    parsed = parse_request(over_the_wire(wire))
    assert parsed == request_
    assert type(parsed) is type(request_)


def test_poll_wait_is_clamped_into_range() -> None:
    limits = Limits(max_poll_wait=5.0)
    wire = Poll(id=1, channel="c", start=0, min_position=0, wait=0).to_wire()
    for sent, kept in ((-3, 0.0), (2, 2.0), (99.5, 5.0), (math.inf, 5.0)):
        parsed = parse_request({**wire, "wait": sent}, limits)
        assert isinstance(parsed, Poll) and parsed.wait == kept


def test_extra_fields_are_ignored() -> None:
    assert parse_request({"id": 1, "type": "status", "trace": "x"}) == Status(id=1)


@pytest.mark.parametrize("message", [{}, {"id": "1", "type": "status"}, {"id": True}])
def test_a_request_without_an_integer_id_is_invalid(message: dict[str, Any]) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_request(message)
    assert "id" not in caught.value.details


@pytest.mark.parametrize("kind", ["launch", "", None, 5, ["open"]])
def test_an_unknown_type_is_invalid_and_keeps_the_id(kind: Any) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_request({"id": 42, "type": kind})
    assert caught.value.details == {"id": 42}
    assert caught.value.code == "invalid_request"


ONE_PER_TYPE = list({r.TYPE: r for r in EXAMPLES}.values())
MISSING = [
    (r, f.name)
    for r in ONE_PER_TYPE
    for f in fields(r)
    if f.name != "id" and (r.TYPE, f.name) != ("append", "keys")
]


def test_append_keys_are_optional_and_checked() -> None:
    plain = Append(1, "c", b"s" * 16, 1, [b"\x01"])
    assert "keys" not in plain.to_wire()
    assert parse_request(plain.to_wire()) == plain
    with_keys = Append(2, "c", b"s" * 16, 1, [b"\x01", b"\x02"], [[b"k"], []])
    assert parse_request(with_keys.to_wire()) == with_keys
    for bad in ([[b"k"]], [[b"k"], ["text"]], [b"k", b"j"]):
        wire = {**with_keys.to_wire(), "keys": bad}
        with pytest.raises(RequestInvalid, match="keys"):
            parse_request(wire)


@pytest.mark.parametrize("request_,name", MISSING, ids=lambda x: getattr(x, "TYPE", x))
def test_a_missing_field_is_invalid(request_: Request, name: str) -> None:
    wire = request_.to_wire()
    del wire[name]
    with pytest.raises(RequestInvalid, match=name) as caught:
        parse_request(wire)
    assert caught.value.details["id"] == request_.id


def _wire(kind: str) -> dict[str, Any]:
    return next(r for r in EXAMPLES if kind == r.TYPE).to_wire()


BAD_FIELDS: list[tuple[str, str, Any]] = [
    # wrong types, bool is not an int
    ("open", "channel", 5),
    ("open", "channel", b"jobs"),
    ("open", "maxlen", "3"),
    ("open", "maxlen", True),
    ("open", "maxlen", 2.0),
    ("append", "seq", True),
    ("append", "seq", 1.0),
    ("append", "seq", None),
    ("append", "session", "x" * SESSION_ID_BYTES),
    ("append", "items", b"x"),
    ("append", "items", {"0": b"x"}),
    ("read", "start", "0"),
    ("read", "end", False),
    ("poll", "start", None),
    ("poll", "min_position", 1.5),
    ("poll", "wait", "1"),
    ("poll", "wait", True),
    ("poll", "wait", math.nan),
    ("end_session", "session", None),
    # out of range
    ("open", "maxlen", -1),
    ("open", "maxlen", 0),
    ("append", "seq", -1),
    ("append", "seq", 0),
    ("fault", "block", "127.0.0.1:7201"),
    ("fault", "block", [7201]),
    ("read", "start", -1),
    ("read", "end", -5),
    ("poll", "start", -1),
    ("poll", "min_position", -1),
    ("open", "channel", ""),
    ("open", "channel", "x" * 257),
    ("append", "session", SID[:-1]),
    ("append", "session", SID + b"\x00"),
    ("end_session", "session", b""),
    ("append", "items", []),
    ("append", "items", [b"x", "y"]),
    ("append", "items", [b"x", None]),
    ("member_add", "address", 7204),
    ("member_add", "address", ""),
    ("member_add", "client_address", "x" * 257),
    ("member_add", "name", None),
    ("member_remove", "address", b"127.0.0.1:7201"),
]


@pytest.mark.parametrize("kind,name,value", BAD_FIELDS)
def test_a_bad_field_is_invalid(kind: str, name: str, value: Any) -> None:
    wire = {**_wire(kind), name: value}
    with pytest.raises(RequestInvalid) as caught:
        parse_request(wire)
    assert caught.value.details["id"] == wire["id"]
    assert type(caught.value) is RequestInvalid


def test_too_many_items_name_the_limit() -> None:
    wire = {**_wire("append"), "items": [b"x"] * 3}
    with pytest.raises(LimitExceeded) as caught:
        parse_request(wire, Limits(max_batch_items=2))
    assert caught.value.details == {"id": wire["id"], "limit": "max_batch_items", "size": 3}
    assert "max_batch_items=2" in str(caught.value)
    assert isinstance(parse_request(wire, Limits(max_batch_items=3)), Append)


def test_an_item_over_max_item_bytes_names_the_limit() -> None:
    wire = {**_wire("append"), "items": [b"ok", b"x" * 11]}
    with pytest.raises(LimitExceeded) as caught:
        parse_request(wire, Limits(max_item_bytes=10))
    assert caught.value.details == {
        "id": wire["id"], "limit": "max_item_bytes", "size": 11, "item": 1, "max_item_bytes": 10,
    }  # fmt: skip
    assert "item 1" in str(caught.value) and "max_item_bytes=10" in str(caught.value)
    assert isinstance(parse_request(wire, Limits(max_item_bytes=11)), Append)


def test_a_long_channel_name_follows_the_configured_limit() -> None:
    wire = {**_wire("info"), "channel": "x" * 8}
    with pytest.raises(RequestInvalid, match="1 to 7"):
        parse_request(wire, Limits(max_channel_name=7))
    assert parse_request(wire, Limits(max_channel_name=8)) == Info(id=4, channel="x" * 8)


# -- responses --------------------------------------------------------------------------


def test_an_ok_response_carries_its_fields_and_no_error() -> None:
    response = over_the_wire(ok_response(5, indexes=[1, 2], duplicate=False))
    assert response == {"id": 5, "ok": True, "indexes": [1, 2], "duplicate": False}
    assert response_error(response) is None


@pytest.mark.parametrize("code,cls", sorted(ERROR_CODES.items()))
def test_every_error_code_roundtrips(code: str, cls: type[RaftchanError]) -> None:
    sent = cls("it went wrong", channel="jobs", size=3)
    response = over_the_wire(error_response(17, sent))
    assert response["id"] == 17 and response["ok"] is False
    assert response["error"]["code"] == code
    received = response_error(response)
    assert type(received) is cls
    assert received.code == code
    assert str(received) == "it went wrong"
    assert received.details == sent.details


def test_not_leader_keeps_its_leader_hint() -> None:
    for leader in ("10.0.0.2:7101", None):
        received = response_error(over_the_wire(error_response(1, NotLeader(leader=leader))))
        assert isinstance(received, NotLeader)
        assert received.leader == leader
        assert received.details == {"leader": leader}


def test_the_request_id_travels_beside_the_error_not_inside_it() -> None:
    response = error_response(9, RequestInvalid("bad", id=9))
    assert response["id"] == 9
    assert response["error"]["details"] == {}
    assert error_response(None, ProtocolError("bad frame"))["id"] is None


def test_an_unknown_code_becomes_a_plain_raftchan_error() -> None:
    error = {"code": "from_the_future", "message": "new", "details": {"a": 1}}
    received = response_error({"id": 1, "ok": False, "error": error})
    assert type(received) is RaftchanError
    assert str(received) == "new" and received.details == {"a": 1}


@pytest.mark.parametrize("error", [None, "boom", ["channel_stopped"]])
def test_a_malformed_error_response_is_a_protocol_error(error: Any) -> None:
    assert type(response_error({"id": 1, "ok": False, "error": error})) is ProtocolError


@pytest.mark.parametrize(
    "details",
    [{"message": "again", "channel": "c"}, {1: "int key", "channel": "c"}, "not a map"],
)
def test_odd_error_details_from_a_peer_still_give_the_error(details: Any) -> None:
    error = {"code": "channel_stopped", "message": "stopped", "details": details}
    received = response_error(over_the_wire({"id": 1, "ok": False, "error": error}))
    assert type(received) is ERROR_CODES["channel_stopped"]
    assert str(received) == "stopped"
    assert received.details in ({"channel": "c"}, {})


def test_channel_info_and_read_result_roundtrip() -> None:
    info = ChannelInfo(channel="c", first=2, next=9, stopped=False, maxlen=7, position=40)
    assert ChannelInfo.from_wire(over_the_wire(ok_response(1, **info.to_wire()))) == info
    result = ReadResult(channel="c", first=2, items=[b"a", b"b"], next=4, stopped=True, position=3)
    assert ReadResult.from_wire(over_the_wire(ok_response(1, **result.to_wire()))) == result
