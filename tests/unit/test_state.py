"""Tests of the channel state machine (raftchan.state).

The scenario tests pin down one rule of the replicated state each; the Hypothesis tests
check the whole machine against a small reference model, check that a snapshot restores a
state that goes on exactly like the original (every node must agree), and that ``apply``
never raises, whatever bytes the log hands it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from raftchan.errors import ERROR_CODES
from raftchan.packing import packb_in_pieces
from raftchan.state import SESSION_RANGES, ChannelState, Result, encode_command

LIMITS = (10_000, 10_000)  # what a new ChannelState starts with
A = b"A" * 16
B = b"B" * 16
C = b"C" * 16


def run(state: ChannelState, *ops: list[Any], limits: tuple[int, int] = LIMITS) -> list[Result]:
    """Apply ``ops`` as one command, as the leader's group commit would."""
    return state.apply(encode_command(list(ops), *limits))


def run1(state: ChannelState, op: list[Any], limits: tuple[int, int] = LIMITS) -> Result:
    [result] = run(state, op, limits=limits)
    return result


def stored(state: ChannelState) -> dict[str, Any]:
    """The snapshot content apart from the position (which every command advances)."""
    content = msgpack.unpackb(state.to_bytes(), raw=False)
    del content["position"]
    return content


def channels_of(state: ChannelState) -> dict[str, Any]:
    return stored(state)["channels"]


def items(state: ChannelState, name: str) -> list[bytes]:
    result = state.read(name, None, None, 1_000_000)
    assert result["ok"], result
    return result["items"]


def opened(*names: str, maxlen: int | None = None) -> ChannelState:
    state = ChannelState()
    for name in names:
        assert run1(state, ["open", name, maxlen])["ok"]
    return state


def append(state: ChannelState, name: str, session: bytes, seq: int, *values: bytes) -> Result:
    return run1(state, ["append", name, session, seq, list(values)])


# -- open -------------------------------------------------------------------------------


def test_open_creates_an_empty_channel_with_its_maxlen() -> None:
    state = ChannelState()
    result = run1(state, ["open", "jobs", 3])
    assert result == {
        "ok": True,
        "channel": "jobs",
        "first": 0,
        "next": 0,
        "stopped": False,
        "maxlen": 3,
        "position": 1,
    }
    assert state.info("jobs")["maxlen"] == 3
    assert items(state, "jobs") == []


def test_open_of_an_existing_channel_sets_maxlen_and_keeps_its_items() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"1", b"2", b"3", b"4")
    result = run1(state, ["open", "jobs", 2])
    assert result["ok"] and result["maxlen"] == 2
    assert (result["first"], result["next"]) == (2, 4)
    assert items(state, "jobs") == [b"3", b"4"]
    # Opening without a bound (a reader, say) keeps the channel's bound.
    reopened = run1(state, ["open", "jobs", None])
    assert (reopened["maxlen"], reopened["first"]) == (2, 2)
    append(state, "jobs", A, 5, b"5")
    assert items(state, "jobs") == [b"4", b"5"]
    # A larger bound widens it; what was trimmed stays gone.
    assert run1(state, ["open", "jobs", 10])["first"] == 3


def test_open_does_not_restart_a_stopped_channel() -> None:
    state = opened("jobs")
    run1(state, ["stop", "jobs"])
    assert run1(state, ["open", "jobs", None])["stopped"] is True


# -- append and exactly-once ------------------------------------------------------------


def test_append_returns_consecutive_indexes() -> None:
    state = opened("jobs")
    assert append(state, "jobs", A, 1, b"x", b"y") == {
        "ok": True,
        "indexes": [0, 1],
        "duplicate": False,
    }
    assert append(state, "jobs", A, 3, b"z")["indexes"] == [2]
    assert items(state, "jobs") == [b"x", b"y", b"z"]
    assert state.info("jobs")["next"] == 3


def test_two_sessions_interleave_in_commit_order() -> None:
    state = opened("jobs")
    assert append(state, "jobs", A, 1, b"a1")["indexes"] == [0]
    assert append(state, "jobs", B, 1, b"b1", b"b2")["indexes"] == [1, 2]
    assert append(state, "jobs", A, 2, b"a2")["indexes"] == [3]
    assert append(state, "jobs", B, 3, b"b3")["indexes"] == [4]
    assert items(state, "jobs") == [b"a1", b"b1", b"b2", b"a2", b"b3"]


def test_one_command_applies_its_ops_in_order() -> None:
    state = opened("jobs")
    results = run(
        state,
        ["append", "jobs", A, 1, [b"a"]],
        ["append", "jobs", B, 1, [b"b"]],
        ["stop", "jobs"],
        ["append", "jobs", A, 2, [b"late"]],
    )
    assert [r.get("indexes") for r in results[:2]] == [[0], [1]]
    assert results[2]["ok"] and results[3]["code"] == "channel_stopped"


def test_a_repeat_stores_nothing_and_answers_the_first_indexes() -> None:
    state = opened("jobs")
    append(state, "jobs", B, 1, b"other")
    first = append(state, "jobs", A, 1, b"x", b"y")
    before = channels_of(state)
    again = append(state, "jobs", A, 1, b"x", b"y")
    assert again == {"ok": True, "indexes": first["indexes"], "duplicate": True}
    assert channels_of(state) == before
    # A repeat of part of the range answers the part's indexes.
    assert append(state, "jobs", A, 2, b"y")["indexes"] == [2]


def test_a_retry_overlapping_the_applied_range_appends_only_the_new_tail() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x", b"y")
    append(state, "jobs", B, 1, b"b")
    result = append(state, "jobs", A, 1, b"x", b"y", b"z", b"w")
    assert result == {"ok": True, "indexes": [0, 1, 3, 4], "duplicate": False}
    assert items(state, "jobs") == [b"x", b"y", b"b", b"z", b"w"]
    assert state.sessions[A].last_seq == 4


def test_a_sequence_gap_is_refused_as_commit_unknown_and_changes_nothing() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    before = stored(state)
    result = append(state, "jobs", A, 3, b"z")
    assert result["ok"] is False
    assert result["code"] == "commit_unknown"
    assert result["details"] == {"expected": 2}
    assert stored(state) == before
    # The missing append still fits in afterwards.
    assert append(state, "jobs", A, 2, b"y")["indexes"] == [1]


@pytest.mark.parametrize("seq", [2, 7])
def test_an_unknown_session_must_start_at_seq_1(seq: int) -> None:
    state = opened("jobs")
    before = stored(state)
    result = append(state, "jobs", A, seq, b"x")
    assert result["code"] == "commit_unknown"
    assert result["details"] == {"session_expired": True}
    assert stored(state) == before


def test_a_retry_of_a_forgotten_range_is_unknown_never_a_guessed_success() -> None:
    state = opened("jobs")
    for seq in range(1, SESSION_RANGES + 2):
        append(state, "jobs", A, seq, b"%d" % seq)
    before = items(state, "jobs")
    refused = append(state, "jobs", A, 1, b"1")
    assert refused["ok"] is False and refused["code"] == "commit_unknown"
    assert refused["details"] == {"session_expired": True}
    assert append(state, "jobs", A, 2, b"2")["indexes"] == [1]  # still remembered
    assert items(state, "jobs") == before


def test_a_forgotten_refusal_is_not_reported_as_stored() -> None:
    state = opened("jobs")
    run1(state, ["stop", "jobs"])
    assert append(state, "jobs", A, 1, b"x")["code"] == "channel_stopped"
    assert run1(state, ["open", "other", None])["ok"]
    for seq in range(2, SESSION_RANGES + 3):
        append(state, "other", A, seq, b"%d" % seq)
    again = append(state, "jobs", A, 1, b"x")
    assert again["ok"] is False and again["code"] == "commit_unknown"


def test_a_session_pushed_out_or_ended_cannot_start_again() -> None:
    """Its first append's retry would otherwise be applied a second time."""
    two = (10_000, 2)  # room for two sessions
    state = opened("jobs")
    for sid, data in ((A, b"a"), (B, b"b"), (C, b"c")):  # C pushes A out
        assert run1(state, ["append", "jobs", sid, 1, [data]], limits=two)["ok"]
    retry = run1(state, ["append", "jobs", A, 1, [b"a"]], limits=two)
    assert retry["code"] == "commit_unknown" and retry["details"]["session_expired"]
    assert run1(state, ["end_session", B], limits=two)["ok"]
    assert run1(state, ["append", "jobs", B, 1, [b"b"]], limits=two)["code"] == "commit_unknown"
    assert items(state, "jobs") == [b"a", b"b", b"c"]
    restored = ChannelState.from_bytes(state.to_bytes())
    retry = run1(restored, ["append", "jobs", A, 1, [b"a"]], limits=two)
    assert retry["code"] == "commit_unknown"


# -- stop, and what a refused append means for the session ------------------------------


def test_stop_refuses_later_appends_and_is_idempotent() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    first = run1(state, ["stop", "jobs"])
    assert first["ok"] and first["stopped"] is True and first["next"] == 1
    second = run1(state, ["stop", "jobs"])
    assert {k: v for k, v in second.items() if k != "position"} == {
        k: v for k, v in first.items() if k != "position"
    }
    refused = append(state, "jobs", B, 1, b"y")
    assert refused["code"] == "channel_stopped"
    assert refused["details"] == {"channel": "jobs"}
    assert items(state, "jobs") == [b"x"]
    assert state.read("jobs", 0, None, 10)["stopped"] is True


def test_stop_of_a_missing_channel_is_channel_not_found() -> None:
    assert run1(ChannelState(), ["stop", "nope"])["code"] == "channel_not_found"


def test_a_refused_append_consumes_its_sequence_numbers() -> None:
    state = opened("jobs", "other")
    append(state, "jobs", A, 1, b"x")
    run1(state, ["stop", "jobs"])
    assert append(state, "jobs", A, 2, b"y", b"z")["code"] == "channel_stopped"
    # The client moves on to seq 4: that is the next expected number, not a gap.
    assert append(state, "jobs", A, 4, b"w")["code"] == "channel_stopped"
    assert append(state, "other", A, 5, b"v") == {"ok": True, "indexes": [0], "duplicate": False}
    assert state.sessions[A].last_seq == 5


def test_a_retry_of_a_refused_range_answers_the_same_refusal() -> None:
    state = opened("jobs")
    run1(state, ["stop", "jobs"])
    assert append(state, "jobs", A, 1, b"x", b"y")["code"] == "channel_stopped"
    before = channels_of(state)
    for seq, values in ((1, [b"x", b"y"]), (2, [b"y"])):
        again = run1(state, ["append", "jobs", A, seq, values])
        assert again["ok"] is False and again["code"] == "channel_stopped"
        assert again["details"] == {"channel": "jobs"}
    assert channels_of(state) == before


def test_an_append_to_a_missing_channel_stays_refused_when_retried_after_open() -> None:
    state = ChannelState()
    assert append(state, "jobs", A, 1, b"x")["code"] == "channel_not_found"
    run1(state, ["open", "jobs", None])
    # The retry must not append what was refused (the client was already told so) ...
    assert append(state, "jobs", A, 1, b"x")["code"] == "channel_not_found"
    assert items(state, "jobs") == []
    # ... and the session goes on at the next number.
    assert append(state, "jobs", A, 2, b"y")["indexes"] == [0]


def test_a_retry_extending_a_refused_range_refuses_the_new_tail_too() -> None:
    state = ChannelState()
    assert append(state, "jobs", A, 1, b"x")["code"] == "channel_not_found"
    run1(state, ["open", "jobs", None])
    assert append(state, "jobs", A, 1, b"x", b"y")["code"] == "channel_not_found"
    assert items(state, "jobs") == []
    assert state.sessions[A].last_seq == 2
    assert append(state, "jobs", A, 2, b"y")["code"] == "channel_not_found"


def test_a_retry_whose_new_tail_meets_a_stop_refuses_the_tail_only() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    run1(state, ["stop", "jobs"])
    assert append(state, "jobs", A, 1, b"x", b"y")["code"] == "channel_stopped"
    assert items(state, "jobs") == [b"x"]
    assert append(state, "jobs", A, 1, b"x")["indexes"] == [0]
    assert append(state, "jobs", A, 2, b"y")["code"] == "channel_stopped"


def test_consecutive_refusals_share_one_remembered_range() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    run1(state, ["stop", "jobs"])
    for seq in range(2, 2 + 3 * SESSION_RANGES):
        assert append(state, "jobs", A, seq, b"y")["code"] == "channel_stopped"
    # The applied range was not pushed out by the refusals: its index is still known.
    assert append(state, "jobs", A, 1, b"x")["indexes"] == [0]
    assert len(state.sessions[A].ranges) == 2


def test_a_refused_first_append_creates_the_session() -> None:
    state = ChannelState()
    assert append(state, "jobs", A, 1, b"x")["code"] == "channel_not_found"
    assert state.sessions[A].last_seq == 1


# -- maxlen and reads -------------------------------------------------------------------


def test_maxlen_keeps_the_newest_items() -> None:
    state = opened("jobs", maxlen=3)
    for seq in range(1, 6):
        assert append(state, "jobs", A, seq, b"%d" % seq)["indexes"] == [seq - 1]
    assert items(state, "jobs") == [b"3", b"4", b"5"]
    info = state.info("jobs")
    assert (info["first"], info["next"]) == (2, 5)
    # One append bigger than maxlen keeps its newest items, yet reports every index.
    assert append(state, "jobs", A, 6, b"a", b"b", b"c", b"d")["indexes"] == [5, 6, 7, 8]
    assert items(state, "jobs") == [b"b", b"c", b"d"]


def test_reading_below_the_trimmed_head_names_the_gap() -> None:
    state = opened("jobs", maxlen=2)
    append(state, "jobs", A, 1, b"0", b"1", b"2", b"3")
    result = state.read("jobs", 1, None, 10)
    assert result["ok"] is False
    assert result["code"] == "trimmed_gap"
    assert result["details"] == {"channel": "jobs", "requested": 1, "first": 2}
    assert "1..1" in result["message"] and "maxlen=2" in result["message"]
    assert state.read("jobs", 2, None, 10)["items"] == [b"2", b"3"]


def test_read_windows() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, *(b"%d" % i for i in range(6)))
    run1(state, ["stop", "jobs"])
    whole = state.read("jobs", None, None, 100)
    assert whole == {
        "ok": True,
        "channel": "jobs",
        "first": 0,
        "items": [b"0", b"1", b"2", b"3", b"4", b"5"],
        "next": 6,
        "stopped": True,
        "position": state.position,
    }
    assert state.read("jobs", 2, 4, 100)["items"] == [b"2", b"3"]
    assert state.read("jobs", 1, None, 2)["items"] == [b"1", b"2"]
    beyond = state.read("jobs", 9, None, 100)
    assert beyond["ok"] and beyond["items"] == [] and beyond["first"] == 9
    assert state.read("nope", 0, None, 1)["code"] == "channel_not_found"


def test_trimming_many_times_keeps_indexes_and_contents_right() -> None:
    state = opened("jobs", maxlen=5)
    for seq in range(1, 200):
        append(state, "jobs", A, seq, b"%d" % seq)
        expected = [b"%d" % s for s in range(max(1, seq - 4), seq + 1)]
        assert items(state, "jobs") == expected
        assert state.read("jobs", seq - 1, seq, 10)["items"] == [b"%d" % seq]


# -- delete, end_session, nodes ---------------------------------------------------------


def test_delete_removes_the_channel_and_its_items() -> None:
    state = opened("jobs", "keep")
    append(state, "jobs", A, 1, b"x")
    assert run1(state, ["delete", "jobs"]) == {"ok": True}
    assert "jobs" not in state.channels and "keep" in state.channels
    assert state.read("jobs", None, None, 10)["code"] == "channel_not_found"
    assert run1(state, ["delete", "jobs"])["code"] == "channel_not_found"
    assert append(state, "jobs", A, 2, b"y")["code"] == "channel_not_found"
    # A channel of the same name starts over from index 0.
    assert run1(state, ["open", "jobs", None])["next"] == 0


def test_end_session_forgets_the_session() -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    append(state, "jobs", B, 1, b"y")
    assert run1(state, ["end_session", A]) == {"ok": True}
    assert list(state.sessions) == [B]
    # A late retry of the ended session cannot be told apart from a new append: refused.
    assert append(state, "jobs", A, 2, b"z")["details"] == {"session_expired": True}
    # Ending an unknown session is harmless.
    assert run1(state, ["end_session", C]) == {"ok": True}


def test_node_records_map_raft_addresses_to_client_addresses() -> None:
    state = ChannelState()
    assert run1(state, ["node", "n1", "10.0.0.1:7001", "10.0.0.1:7101"]) == {"ok": True}
    run1(state, ["node", "n2", "10.0.0.2:7001", "10.0.0.2:7101"])
    run1(state, ["node", "n1", "10.0.0.1:7001", "10.0.0.1:7201"])
    assert {a: n.client_address for a, n in state.nodes.items()} == {
        "10.0.0.1:7001": "10.0.0.1:7201",
        "10.0.0.2:7001": "10.0.0.2:7101",
    }
    assert run1(state, ["node", "n3", "", "x"])["code"] == "invalid_request"


# -- limits carried in the command ------------------------------------------------------


def test_max_channels_refuses_a_new_channel_and_keeps_the_existing_ones() -> None:
    state = ChannelState()
    assert run1(state, ["open", "a", None], limits=(2, 10))["ok"]
    assert run1(state, ["open", "b", None], limits=(2, 10))["ok"]
    refused = run1(state, ["open", "c", None], limits=(2, 10))
    assert refused["code"] == "limit_exceeded"
    assert refused["details"] == {"limit": "max_channels", "size": 3}
    assert "max_channels=2" in refused["message"]
    assert sorted(state.channels) == ["a", "b"]
    # Reopening an existing channel is not a new channel.
    assert run1(state, ["open", "a", 5], limits=(2, 10))["ok"]
    # The limit is whatever the command carries: a later, larger one lets it in.
    assert run1(state, ["open", "c", None], limits=(3, 10))["ok"]


def test_max_sessions_forgets_the_least_recently_used_session() -> None:
    limits = (10, 2)
    state = opened("jobs")
    run1(state, ["append", "jobs", A, 1, [b"a"]], limits)
    run1(state, ["append", "jobs", B, 1, [b"b"]], limits)
    # A retry counts as a use: A is now more recent than B.
    assert run1(state, ["append", "jobs", A, 1, [b"a"]], limits)["duplicate"] is True
    run1(state, ["append", "jobs", C, 1, [b"c"]], limits)
    assert list(state.sessions) == [A, C]
    late = run1(state, ["append", "jobs", B, 2, [b"b2"]], limits)
    assert late["details"] == {"session_expired": True}
    assert run1(state, ["append", "jobs", A, 2, [b"a2"]], limits)["indexes"] == [3]


def test_eviction_is_the_same_on_every_node() -> None:
    commands = [
        encode_command([["open", "jobs", None]], 10, 3),
        *(
            encode_command([["append", "jobs", bytes([i]) * 16, 1, [b"x"]]], 10, 3)
            for i in range(6)
        ),
        # A retry of session 3 makes it the most recent; the smaller limit then keeps two.
        encode_command([["append", "jobs", bytes([3]) * 16, 1, [b"x"]]], 10, 2),
    ]
    nodes = [ChannelState(), ChannelState()]
    for node in nodes:
        for command in commands:
            node.apply(command)
    assert nodes[0].to_bytes() == nodes[1].to_bytes()
    assert list(nodes[0].sessions) == [bytes([5]) * 16, bytes([3]) * 16]


@pytest.mark.parametrize("lim", [None, [1], [0, 5], [5, -1], [True, 5], [5, 2.0], "5,5"])
def test_unusable_limits_in_a_command_keep_the_previous_ones(lim: Any) -> None:
    state = ChannelState()
    run(state, ["open", "a", None], limits=(1, 1))
    command = msgpack.packb({"v": 1, "lim": lim, "ops": [["open", "b", None]]})
    [result] = state.apply(command)
    assert result["code"] == "limit_exceeded"


# -- commands that are not what they should be -------------------------------------------


def test_an_empty_command_is_a_read_barrier() -> None:
    state = opened("jobs")
    before = stored(state)
    assert run(state) == []
    assert state.position == 2
    assert stored(state) == before


@pytest.mark.parametrize(
    "command",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 2, "ops": []}),
        msgpack.packb({"ops": []}),
        msgpack.packb({"v": 1, "ops": "open"}),
        msgpack.packb({"v": 1}),
        msgpack.packb({1: 2}),
        b"\x91" * 100_000,
        b"\x91" * 100_000 + b"\xc0",
    ],
)
def test_a_malformed_command_is_one_invalid_request_and_changes_nothing(command: bytes) -> None:
    state = opened("jobs")
    before = stored(state)
    [result] = state.apply(command)
    assert result["ok"] is False and result["code"] == "invalid_request"
    assert stored(state) == before


@pytest.mark.parametrize(
    "op",
    [
        [],
        "open",
        [1, "jobs"],
        ["nope", "jobs"],
        ["open"],
        ["open", "jobs"],
        ["open", "jobs", None, 1],
        ["open", "", None],
        ["open", "x", 0],
        ["open", "x", -1],
        ["open", "x", True],
        ["open", "x", 1.5],
        ["append", "jobs", A, 1],
        ["append", "jobs", "A" * 16, 1, [b"x"]],
        ["append", "jobs", A, 0, [b"x"]],
        ["append", "jobs", A, True, [b"x"]],
        ["append", "jobs", A, 1, []],
        ["append", "jobs", A, 1, [b"x", "y"]],
        ["append", "jobs", A, 1, b"x"],
        ["append", 7, A, 1, [b"x"]],
        ["stop", None],
        ["delete", ["jobs"]],
        ["end_session", "A"],
        ["node", "n", "r"],
        ["node", "n", "r", 5],
    ],
)
def test_a_malformed_op_is_invalid_request_and_changes_nothing(op: Any) -> None:
    state = opened("jobs")
    append(state, "jobs", A, 1, b"x")
    before = stored(state)
    result = run1(state, op)
    assert result["ok"] is False and result["code"] == "invalid_request"
    assert stored(state) == before


def test_a_malformed_op_does_not_spoil_the_ops_beside_it() -> None:
    state = opened("jobs")
    results = run(
        state,
        ["append", "jobs", A, 1, [b"x"]],
        ["append", "jobs", A, "2", [b"y"]],
        ["append", "jobs", A, 2, [b"y"]],
    )
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[2]["indexes"] == [1]


# -- snapshots --------------------------------------------------------------------------


def test_a_snapshot_restores_every_part_of_the_state() -> None:
    state = opened("jobs", maxlen=3)
    for seq in range(1, 10):
        append(state, "jobs", A, seq, b"%d" % seq)
    run1(state, ["open", "gone", None])
    run1(state, ["stop", "gone"])
    append(state, "gone", B, 1, b"refused")
    run1(state, ["node", "n1", "r1", "c1"])
    run(state, limits=(7, 8))
    copy = ChannelState.from_bytes(state.to_bytes())
    assert copy.to_bytes() == state.to_bytes()
    assert copy.position == state.position
    assert list(copy.sessions) == [A, B]
    assert items(copy, "jobs") == [b"7", b"8", b"9"]
    assert copy.info("gone")["stopped"] is True
    assert append(copy, "gone", B, 1, b"refused")["code"] == "channel_stopped"
    assert append(copy, "jobs", A, 9, b"9")["indexes"] == [8]
    assert copy.nodes["r1"].client_address == "c1"


def test_a_snapshot_with_four_field_ranges_still_loads() -> None:
    old = msgpack.packb(
        {
            "v": 1,
            "position": 3,
            "limits": [10, 10],
            "channels": {"jobs": [None, False, 0, [b"x"]]},
            "sessions": [[A, 1, [[1, 1, "jobs", 0]]]],
            "nodes": [],
        }
    )
    state = ChannelState.from_bytes(old)
    assert append(state, "jobs", A, 1, b"x")["indexes"] == [0]
    assert append(state, "jobs", A, 2, b"y")["indexes"] == [1]


@pytest.mark.parametrize("data", [msgpack.packb([1]), msgpack.packb({"v": 99})])
def test_from_bytes_refuses_what_is_not_a_snapshot(data: bytes) -> None:
    with pytest.raises(ValueError):
        ChannelState.from_bytes(data)


# ---------------------------------------------------------------------------------------
# Property: the state machine against a reference model


MODEL_CHANNELS = ("a", "b")
MODEL_SESSIONS = (A, B)


@dataclass
class ModelChannel:
    maxlen: int | None
    items: list[bytes] = field(default_factory=list)  # every item ever appended, by index
    first: int = 0
    stopped: bool = False

    def trim(self) -> None:
        if self.maxlen is not None:
            self.first = max(self.first, len(self.items) - self.maxlen)


@dataclass
class ModelSession:
    last_seq: int = 0
    #: seq -> index the item got, or the refusal code.
    outcome: dict[int, int | str] = field(default_factory=dict)
    #: every decided request as (channel, seq, items), for retries.
    requests: list[tuple[str, int, list[bytes]]] = field(default_factory=list)


class ChannelsAgainstModel(RuleBasedStateMachine):
    """Random opens, appends, retries, gaps, stops, deletes and session ends."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ChannelState()
        self.channels: dict[str, ModelChannel] = {}
        self.sessions: dict[bytes, ModelSession] = {}
        self.forgotten: set[bytes] = set()  # ended sessions: their ids stay refused
        self.counter = 0

    def apply(self, op: list[Any]) -> Result:
        return run1(self.state, op)

    def fresh(self, n: int) -> list[bytes]:
        self.counter += n
        return [b"item-%d" % i for i in range(self.counter - n, self.counter)]

    def expect_append(self, sid: bytes, name: str, seq: int, values: list[bytes]) -> Result:
        """What the state must answer to this in-order append, updating the model."""
        if sid in self.forgotten:
            return {"ok": False, "code": "commit_unknown"}
        session = self.sessions.setdefault(sid, ModelSession())
        end = seq + len(values) - 1
        assert seq <= session.last_seq + 1
        decided = [session.outcome[s] for s in range(seq, min(end, session.last_seq) + 1)]
        refusals = [o for o in decided if isinstance(o, str)]
        if end <= session.last_seq:
            if refusals:
                return {"ok": False, "code": refusals[0]}
            return {"ok": True, "indexes": decided, "duplicate": True}
        channel = self.channels.get(name)
        code = refusals[0] if refusals else None
        if code is None and channel is None:
            code = "channel_not_found"
        elif code is None and channel is not None and channel.stopped:
            code = "channel_stopped"
        tail = range(session.last_seq + 1, end + 1)
        session.last_seq = end
        session.requests.append((name, seq, values))
        if code is not None:
            for s in tail:
                session.outcome[s] = code
            return {"ok": False, "code": code}
        assert channel is not None
        new = values[len(decided) :]
        for s, value in zip(tail, new, strict=True):
            session.outcome[s] = len(channel.items)
            channel.items.append(value)
        channel.trim()
        return {"ok": True, "indexes": [session.outcome[s] for s in range(seq, end + 1)]}

    def check(self, result: Result, expected: Result) -> None:
        assert result["ok"] is expected["ok"], (result, expected)
        if expected["ok"]:
            assert result["indexes"] == expected["indexes"]
            assert result["duplicate"] is expected.get("duplicate", False)
        else:
            assert result["code"] == expected["code"], (result, expected)

    @initialize(maxlens=st.tuples(*(st.sampled_from([None, 2, 3, 5]) for _ in MODEL_CHANNELS)))
    def open_all(self, maxlens: tuple[int | None, ...]) -> None:
        # Start with open channels: otherwise most generated runs never append anything.
        for name, maxlen in zip(MODEL_CHANNELS, maxlens, strict=True):
            self.open(name, maxlen)

    @rule(name=st.sampled_from(MODEL_CHANNELS), maxlen=st.sampled_from([None, 1, 2, 3, 5]))
    def open(self, name: str, maxlen: int | None) -> None:
        result = self.apply(["open", name, maxlen])
        channel = self.channels.setdefault(name, ModelChannel(maxlen))
        if maxlen is not None:  # opening without a bound keeps the channel's own
            channel.maxlen = maxlen
        channel.trim()
        assert result["ok"] and result["first"] == channel.first

    @rule(
        name=st.sampled_from(MODEL_CHANNELS),
        sid=st.sampled_from(MODEL_SESSIONS),
        n=st.integers(1, 3),
    )
    def append_next(self, name: str, sid: bytes, n: int) -> None:
        seq = self.sessions[sid].last_seq + 1 if sid in self.sessions else 1
        values = self.fresh(n)
        result = self.apply(["append", name, sid, seq, values])
        self.check(result, self.expect_append(sid, name, seq, values))

    @rule(sid=st.sampled_from(MODEL_SESSIONS), data=st.data())
    def retry(self, sid: bytes, data: st.DataObject) -> None:
        session = self.sessions.get(sid)
        if session is None or not session.requests:
            return
        name, seq, values = data.draw(st.sampled_from(session.requests))
        before = channels_of(self.state)
        result = self.apply(["append", name, sid, seq, values])
        self.check(result, self.expect_append(sid, name, seq, values))
        assert channels_of(self.state) == before

    @rule(sid=st.sampled_from(MODEL_SESSIONS), n=st.integers(1, 2))
    def retry_last_with_more(self, sid: bytes, n: int) -> None:
        session = self.sessions.get(sid)
        if session is None or not session.requests:
            return
        name, seq, values = session.requests[-1]
        values = values + self.fresh(n)
        result = self.apply(["append", name, sid, seq, values])
        self.check(result, self.expect_append(sid, name, seq, values))

    @rule(sid=st.sampled_from(MODEL_SESSIONS), name=st.sampled_from(MODEL_CHANNELS))
    def gap(self, sid: bytes, name: str) -> None:
        session = self.sessions.get(sid)
        before = stored(self.state)
        seq = (session.last_seq if session else 0) + 2
        result = self.apply(["append", name, sid, seq, self.fresh(1)])
        assert result["code"] == "commit_unknown"
        if session is None:
            assert result["details"] == {"session_expired": True}
        else:
            assert result["details"] == {"expected": session.last_seq + 1}
        assert stored(self.state) == before

    @rule(name=st.sampled_from(MODEL_CHANNELS))
    def stop(self, name: str) -> None:
        result = self.apply(["stop", name])
        if name in self.channels:
            self.channels[name].stopped = True
            assert result["ok"] and result["stopped"] is True
        else:
            assert result["code"] == "channel_not_found"

    @rule(name=st.sampled_from(MODEL_CHANNELS))
    def delete(self, name: str) -> None:
        result = self.apply(["delete", name])
        assert result["ok"] is (self.channels.pop(name, None) is not None)

    @rule(sid=st.sampled_from(MODEL_SESSIONS))
    def end_session(self, sid: bytes) -> None:
        assert self.apply(["end_session", sid]) == {"ok": True}
        if self.sessions.pop(sid, None) is not None:
            self.forgotten.add(sid)

    @invariant()
    def channels_match(self) -> None:
        assert sorted(self.state.channels) == sorted(self.channels)
        for name, channel in self.channels.items():
            info = self.state.info(name)
            assert info["first"] == channel.first
            assert info["next"] == len(channel.items)
            assert info["stopped"] is channel.stopped
            assert info["maxlen"] == channel.maxlen
            assert items(self.state, name) == channel.items[channel.first :]
            if channel.first > 0:
                gap = self.state.read(name, channel.first - 1, None, 10)
                assert gap["code"] == "trimmed_gap"
                assert gap["details"]["first"] == channel.first

    @invariant()
    def sessions_match(self) -> None:
        assert sorted(self.state.sessions) == sorted(self.sessions)
        for sid, session in self.sessions.items():
            assert self.state.sessions[sid].last_seq == session.last_seq


TestChannelsAgainstModel = ChannelsAgainstModel.TestCase
TestChannelsAgainstModel.settings = settings(
    derandomize=True, deadline=None, database=None, max_examples=150, stateful_step_count=40
)


# ---------------------------------------------------------------------------------------
# Property: a restored snapshot goes on exactly like the original

names = st.sampled_from(["a", "b", "c"])
sessions = st.sampled_from([A, B, C])
future_keys = st.sampled_from([b"k1", b"k2", b"k3", b"k4"])
ops = st.one_of(
    st.tuples(st.just("open"), names, st.sampled_from([None, 1, 2, 4])),
    st.tuples(
        st.just("append"),
        names,
        sessions,
        st.integers(1, 8),
        st.lists(st.binary(max_size=3), min_size=1, max_size=3),
    ),
    st.integers(1, 3).flatmap(
        lambda n: st.tuples(
            st.just("append"),
            names,
            sessions,
            st.integers(1, 8),
            st.lists(st.binary(max_size=3), min_size=n, max_size=n),
            st.lists(st.lists(future_keys, max_size=2), min_size=n, max_size=n),
        )
    ),
    st.tuples(st.just("lost"), names, st.lists(future_keys, max_size=2)),
    st.tuples(st.just("stop"), names),
    st.tuples(st.just("delete"), names),
    st.tuples(st.just("end_session"), sessions),
    st.tuples(st.just("node"), st.sampled_from(["n1", "n2"]), names, names),
).map(list)
commands = st.lists(
    st.builds(
        encode_command,
        st.lists(ops, max_size=5),
        st.integers(1, 4),
        st.integers(1, 3),
    ),
    max_size=16,
)


@settings(derandomize=True, deadline=None, database=None, max_examples=200)
@given(before=commands, after=commands)
def test_a_restored_snapshot_goes_on_like_the_original(
    before: list[bytes], after: list[bytes]
) -> None:
    original = ChannelState()
    for command in before:
        original.apply(command)
    restored = ChannelState.from_bytes(original.to_bytes())
    assert restored.to_bytes() == original.to_bytes()
    for command in after:
        assert restored.apply(command) == original.apply(command)
        assert restored.to_bytes() == original.to_bytes()
    for name in ("a", "b", "c"):
        assert restored.read(name, None, None, 100) == original.read(name, None, None, 100)


@settings(derandomize=True, deadline=None, database=None, max_examples=300)
@given(history=commands)
def test_key_references_always_match_the_retained_items(history: list[bytes]) -> None:
    """Reference counts equal a recount from the retained items; a key is reported
    released exactly when its channel stops referencing it."""
    state = ChannelState()
    for command in history:
        before = {name: set(c.refs) for name, c in state.channels.items()}
        results = state.apply(command)
        ops = msgpack.unpackb(command, raw=False)["ops"]
        released: dict[str, set[bytes]] = {}
        for op, result in zip(ops, results, strict=True):
            if result.get("released"):
                released.setdefault(op[1], set()).update(result["released"])
        for channel in state.channels.values():
            recount: dict[bytes, int] = {}
            for index, keys in channel.keys.items():
                assert channel.first <= index < channel.next
                for key in keys:
                    recount[key] = recount.get(key, 0) + 1
            assert channel.refs == recount
            assert channel.lost <= set(channel.refs)
        for name, had in before.items():
            now = set(state.channels[name].refs) if name in state.channels else set()
            # Keys may be released and referenced again within one command.
            assert had - now <= released.get(name, set())


# ---------------------------------------------------------------------------------------
# Property: apply never raises, and a malformed op changes nothing

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)
op_like = st.one_of(
    msgpack_values,
    st.tuples(
        st.sampled_from(["open", "append", "stop", "delete", "end_session", "node"]),
        st.lists(msgpack_values | names | sessions, max_size=5),
    ).map(lambda t: [t[0], *t[1]]),
)


def seeded() -> ChannelState:
    state = opened("a", maxlen=2)
    append(state, "a", A, 1, b"1", b"2", b"3")
    run1(state, ["open", "b", None])
    run1(state, ["stop", "b"])
    append(state, "b", B, 1, b"x")
    run1(state, ["node", "n1", "r1", "c1"])
    return state


def assert_well_formed(results: Any) -> None:
    assert isinstance(results, list)
    for result in results:
        assert isinstance(result, dict) and result["ok"] in (True, False)
        if not result["ok"]:
            assert result["code"] in ERROR_CODES
            assert isinstance(result["message"], str)
            assert isinstance(result["details"], dict)


@settings(derandomize=True, deadline=None, database=None, max_examples=300)
@given(data=st.binary(max_size=64))
def test_apply_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    state = seeded()
    before = stored(state)
    results = state.apply(data)
    assert_well_formed(results)
    if len(results) == 1 and results[0].get("code") == "invalid_request":
        assert stored(state) == before


@settings(derandomize=True, deadline=None, database=None, max_examples=200)
@given(value=msgpack_values)
def test_apply_never_raises_on_arbitrary_msgpack(value: Any) -> None:
    state = seeded()
    before = stored(state)
    results = state.apply(msgpack.packb(value))
    assert_well_formed(results)
    if len(results) == 1 and results[0].get("code") == "invalid_request":
        after = stored(state)
        # A map that happens to carry usable limits may set them; nothing else changes.
        before.pop("limits")
        after.pop("limits")
        assert after == before


@settings(derandomize=True, deadline=None, database=None, max_examples=250)
@given(op_list=st.lists(op_like, min_size=1, max_size=3))
def test_a_malformed_op_changes_nothing(op_list: list[Any]) -> None:
    state = seeded()
    for op in op_list:
        before = stored(state)
        results = state.apply(encode_command([op], *LIMITS))
        assert_well_formed(results)
        assert len(results) == 1
        if results[0].get("code") == "invalid_request":
            assert stored(state) == before


# -- Dask future keys ------------------------------------------------------------------------


def append_keys(
    state: ChannelState, name: str, session: bytes, seq: int, *items: tuple[bytes, list[bytes]]
) -> Result:
    return run1(state, ["append", name, session, seq, [i for i, _ in items], [k for _, k in items]])


def test_trimming_reports_keys_no_retained_item_references() -> None:
    state = opened("f", maxlen=2)
    result = append_keys(state, "f", A, 1, (b"1", [b"k1"]), (b"2", [b"k2", b"k1"]), (b"3", []))
    assert result["indexes"] == [0, 1, 2]
    assert "released" not in result  # k1 is still held by item 1
    result = append_keys(state, "f", A, 4, (b"4", [b"k3"]))
    assert sorted(result["released"]) == [b"k1", b"k2"]
    assert state.pinned_keys() == {"f": [b"k3"]}
    assert state.unreferenced("f", [b"k1", b"k3"]) == [b"k1"]


def test_a_repeat_append_does_not_count_its_keys_twice() -> None:
    state = opened("f", maxlen=1)
    append_keys(state, "f", A, 1, (b"1", [b"k1"]))
    assert append_keys(state, "f", A, 1, (b"1", [b"k1"]))["duplicate"] is True
    assert append_keys(state, "f", A, 2, (b"2", []))["released"] == [b"k1"]
    assert state.pinned_keys() == {"f": []}


def test_shrinking_maxlen_and_delete_release_keys() -> None:
    state = opened("f", "g")
    append_keys(state, "f", A, 1, (b"1", [b"k1"]), (b"2", [b"k2"]))
    append_keys(state, "g", A, 3, (b"3", [b"k1"]))
    assert run1(state, ["open", "f", 1])["released"] == [b"k1"]
    assert run1(state, ["delete", "f"])["released"] == [b"k2"]
    # The same key in another channel is that channel's own reference.
    assert state.pinned_keys() == {"g": [b"k1"]}
    assert state.unreferenced("f", [b"k1"]) == [b"k1"]


def test_lost_keys_are_kept_but_no_longer_pinned() -> None:
    state = opened("f", maxlen=2)
    append_keys(state, "f", A, 1, (b"1", [b"k1"]), (b"2", [b"k2"]))
    assert run1(state, ["lost", "f", [b"k1", b"unknown"]]) == {"ok": True, "marked": 1}
    assert state.pinned_keys() == {"f": [b"k2"]}
    assert run1(state, ["lost", "nope", [b"k1"]])["code"] == "channel_not_found"
    assert run1(state, ["lost", "f", ["text"]])["code"] == "invalid_request"
    append_keys(state, "f", A, 3, (b"3", []))
    assert state.channels["f"].lost == set()  # forgotten with the last reference


@pytest.mark.parametrize(
    "keys", [[[b"k"]], [[b"k"], [1]], "k", [[b"k"], None]], ids=["short", "int", "str", "none"]
)
def test_malformed_keys_refuse_the_append_and_change_nothing(keys: Any) -> None:
    state = opened("f")
    before = stored(state)
    result = run1(state, ["append", "f", A, 1, [b"1", b"2"], keys])
    assert result["code"] == "invalid_request"
    assert stored(state) == before


def test_snapshot_version_2_keeps_keys_and_lost_marks() -> None:
    state = opened("f", maxlen=3)
    append_keys(state, "f", A, 1, (b"1", [b"k1"]), (b"2", []), (b"3", [b"k2", b"k1"]))
    append_keys(state, "f", A, 4, (b"4", [b"k3"]))
    run1(state, ["lost", "f", [b"k3"]])
    data = state.to_bytes()
    assert msgpack.unpackb(data, raw=False)["v"] == 2
    copy = ChannelState.from_bytes(data)
    assert copy.to_bytes() == data
    assert copy.channels["f"].refs == {b"k1": 1, b"k2": 1, b"k3": 1}
    assert copy.pinned_keys() == {"f": [b"k2", b"k1"]}
    assert append_keys(copy, "f", A, 5, (b"5", []), (b"6", []))["released"] == [b"k2", b"k1"]


def test_a_version_1_snapshot_loads_without_keys() -> None:
    old = msgpack.packb(
        {
            "v": 1,
            "position": 1,
            "limits": [10, 10],
            "channels": {"jobs": [2, False, 0, [b"x"]]},
            "sessions": [],
            "nodes": [],
        }
    )
    state = ChannelState.from_bytes(old)
    assert state.pinned_keys() == {"jobs": []}
    assert append_keys(state, "jobs", A, 1, (b"y", [b"k"]))["indexes"] == [1]
    assert state.pinned_keys() == {"jobs": [b"k"]}


def test_snapshot_fields_taken_earlier_encode_the_state_as_it_was_then() -> None:
    # The fields are encoded on the snapshot writer's thread while entries go on being
    # applied: nothing applied after they were taken may show in them.
    state = opened("f", "g", maxlen=3)
    append_keys(state, "f", A, 1, (b"1", [b"k1"]), (b"2", []), (b"3", [b"k2"]))
    append(state, "g", B, 1, b"a", b"b")
    run1(state, ["lost", "f", [b"k2"]])
    expected = state.to_bytes()
    fields = state.snapshot_fields()
    append_keys(state, "f", A, 4, (b"4", [b"k3"]), (b"5", []))  # trims 1 and 2
    append(state, "g", C, 1, b"c")
    run1(state, ["lost", "f", [b"k3"]])
    run1(state, ["stop", "g"])
    assert state.to_bytes() != expected
    assert b"".join(packb_in_pieces(fields, piece_bytes=8)) == expected
    assert msgpack.packb(fields, use_bin_type=True) == expected
