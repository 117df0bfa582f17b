"""The client's retry, redirect and re-send logic.

Two parts. First the pure pieces (backoff math, address rotation, how queued appends
become requests and what each answer does to them). Then protocol-level tests of the
client's retry logic: a small fake node below speaks the real wire protocol
(``raftchan.protocol``) and answers from a real ``ChannelState``, and can be told to
misbehave (redirect, drop the connection, stay silent, leave an outcome unknown). The
fake node is not a cluster and these tests say nothing about one; the integration tests
run real nodes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import pytest

import raftchan
from raftchan import protocol
from raftchan.client import (
    _MAX_KEPT_REFUSALS,
    AsyncChannel,
    AsyncClient,
    Backoff,
    RetryPolicy,
    _AddressBook,
    _Outbox,
)
from raftchan.codec import Encoded
from raftchan.config import ADDRESS_ENV, ConfigError
from raftchan.errors import (
    ChannelStopped,
    Closed,
    CommitUnknown,
    FutureLost,
    LimitExceeded,
    NoLeader,
    NotLeader,
    RaftchanError,
    Timeout,
    TrimmedGap,
    error_from_wire,
)
from raftchan.limits import Limits
from raftchan.state import ChannelState, encode_command

# ---------------------------------------------------------------------------------------
# Retry policy and backoff


def test_delays_grow_by_the_multiplier_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.1, multiplier=2.0, max_delay=1.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay=1.0, multiplier=1.0, max_delay=1.0, jitter=0.25)
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(2000)]
    assert min(delays) >= 0.75 and max(delays) <= 1.25
    assert max(delays) - min(delays) > 0.4  # it does spread


def test_a_long_outage_does_not_overflow() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert policy.delay(10_000) == policy.max_delay


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": -1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"timeout": 0.0},
        {"attempt_timeout": -2.0},
        {"connect_timeout": 0.0},
        {"probe_after": -1.0},
        {"probe_timeout": 0.0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_backoff_steps_and_resets() -> None:
    backoff = Backoff(RetryPolicy(initial_delay=0.1, jitter=0.0, max_delay=10.0))
    assert [backoff.next_delay() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.4])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_client_timeout_overrides_the_policy_deadline() -> None:
    client = AsyncClient("127.0.0.1:1", timeout=3.0, retry=RetryPolicy(initial_delay=0.5))
    assert client.retry.timeout == 3.0 and client.retry.initial_delay == 0.5
    assert AsyncClient("127.0.0.1:1").retry.timeout == 30.0


# ---------------------------------------------------------------------------------------
# Addresses


def test_addresses_from_string_list_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AsyncClient("a:1, b:2,c:3").addresses == ["a:1", "b:2", "c:3"]
    assert AsyncClient(["a:1", "b:2"]).addresses == ["a:1", "b:2"]
    assert AsyncClient(("a:1",)).addresses == ["a:1"]
    monkeypatch.setenv(ADDRESS_ENV, "e:1,f:2")
    assert AsyncClient().addresses == ["e:1", "f:2"]
    assert raftchan.Client().addresses == ["e:1", "f:2"]


def test_malformed_address_is_refused() -> None:
    with pytest.raises(ConfigError):
        AsyncClient("no-port")


def test_rotation_visits_every_address_from_its_start() -> None:
    book = _AddressBook(["a", "b", "c"], start=1)
    first = [book.next() for _ in range(3)]
    assert first == ["b", "c", "a"]
    assert [book.next() for _ in range(3)] == first


def test_a_leader_hint_is_dialled_next_once() -> None:
    book = _AddressBook(["a", "b", "c"], start=2)
    before = book.next()
    book.hint("elsewhere:7")
    assert book.next() == "elsewhere:7"
    after = book.next()
    assert after != before  # rotation continues where it was


def test_a_node_just_left_is_not_dialled_next_unless_hinted() -> None:
    book = _AddressBook(["a", "b", "c"])
    book.step_past("a")  # "a" was next: its connection just closed or went quiet
    assert book.next() == "b"
    book.step_past("b")  # not next any more: nothing to skip
    assert [book.next() for _ in range(3)] == ["c", "a", "b"]
    book.step_past("c")
    book.hint("c")  # named by a node as the leader: dialled all the same
    assert book.next() == "c"


# ---------------------------------------------------------------------------------------
# The outbox: batching, answers, re-sends


def _sessions() -> Callable[[], bytes]:
    counter = iter(range(1, 1000))
    return lambda: bytes([next(counter)]) * protocol.SESSION_ID_BYTES


def _outbox(*runs: tuple[str, int]) -> _Outbox:
    outbox = _Outbox(_sessions())
    for channel, count in runs:
        outbox.add(channel, [f"{channel}{i}".encode() for i in range(count)])
    return outbox


def test_sequence_numbers_run_across_channels() -> None:
    outbox = _outbox(("a", 2), ("b", 1), ("a", 1))
    batches = [outbox.next_batch(100, 10_000) for _ in range(3)]
    assert [(b.channel, b.seq, len(b.items)) for b in batches if b] == [
        ("a", 1, 2),
        ("b", 3, 1),
        ("a", 4, 1),
    ]
    assert outbox.next_batch(100, 10_000) is None


def test_batches_respect_item_and_byte_budgets() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"x" * 10] * 7)
    assert [len(b.items) for b in iter(lambda: outbox.next_batch(3, 10_000), None)] == [3, 3, 1]
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"x" * 10] * 7)
    # each item costs 10 bytes + 5 of msgpack header; the channel name counts once
    sizes = [len(b.items) for b in iter(lambda: outbox.next_batch(100, 1 + 15 * 3), None)]
    assert sizes == [3, 3, 1]


def test_an_item_bigger_than_the_byte_budget_still_goes_alone() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"x" * 100, b"y"])
    batch = outbox.next_batch(100, 50)
    assert batch is not None and batch.payload == [b"x" * 100]


def test_flush_point_advances_only_over_contiguous_answers() -> None:
    outbox = _outbox(("a", 1), ("b", 1), ("c", 1))
    first, second, third = (outbox.next_batch(10, 1000) for _ in range(3))
    assert first and second and third
    outbox.acknowledge(second)
    assert outbox.done_through() == 0
    outbox.acknowledge(first)
    assert outbox.done_through() == 2
    outbox.refuse(third, ChannelStopped("stopped"))
    assert outbox.done_through() == 3 and outbox.pending == 0


def test_refusals_are_reported_once_first_one_first() -> None:
    outbox = _outbox(("a", 1), ("b", 1), ("c", 1))
    first, second, third = (outbox.next_batch(10, 1000) for _ in range(3))
    assert first and second and third
    outbox.refuse(second, LimitExceeded("second"))
    outbox.refuse(first, ChannelStopped("first"))
    outbox.refuse(first, ChannelStopped("a repeat answer records nothing"))
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, ChannelStopped) and str(error) == "first"
    assert outbox.take_error(outbox.last_ticket) is None


def test_take_error_leaves_later_errors_for_a_later_flush() -> None:
    outbox = _outbox(("a", 1))
    early = outbox.next_batch(10, 1000)
    flush_point = outbox.last_ticket
    outbox.add("b", [b"late"])
    late = outbox.next_batch(10, 1000)
    assert early and late
    outbox.refuse(late, LimitExceeded("late"))
    assert outbox.take_error(flush_point) is None
    assert isinstance(outbox.take_error(outbox.last_ticket), LimitExceeded)


# Makers of appends: the outbox holds them weakly and compares them by identity.
ALICE = threading.Thread(name="alice")
BOB = threading.Thread(name="bob")


def test_a_refusal_reaches_its_maker_even_after_another_callers_flush_took_it() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("a", [b"alice's"], ALICE)
    batch = outbox.next_batch(10, 1000)
    assert batch
    outbox.refuse(batch, ChannelStopped("stopped"))
    # Bob's flush covers Alice's append: it raises once; Alice's own flush raises too.
    assert isinstance(outbox.take_error(outbox.last_ticket, BOB), ChannelStopped)
    assert outbox.take_error(outbox.last_ticket, BOB) is None
    assert isinstance(outbox.take_error(outbox.last_ticket, ALICE), ChannelStopped)
    assert outbox.take_error(outbox.last_ticket, ALICE) is None
    assert outbox.take_error(outbox.last_ticket, BOB) is None


def test_a_batch_of_two_makers_refused_is_raised_to_each() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("a", [b"1"], ALICE)
    outbox.add("a", [b"2"], BOB)
    batch = outbox.next_batch(10, 1000)
    assert batch and len(batch.items) == 2
    outbox.refuse(batch, ChannelStopped("stopped"))
    assert isinstance(outbox.take_error(outbox.last_ticket, ALICE), ChannelStopped)
    assert isinstance(outbox.take_error(outbox.last_ticket, BOB), ChannelStopped)
    assert outbox.take_error(outbox.last_ticket, ALICE) is None
    assert outbox.take_error(outbox.last_ticket, BOB) is None


def test_a_flush_raises_its_callers_own_refusal_before_anothers() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("x", [b"alice's"], ALICE)
    outbox.add("y", [b"bob's"], BOB)
    first, second = outbox.next_batch(10, 1000), outbox.next_batch(10, 1000)
    assert first and second
    outbox.refuse(first, ChannelStopped("x stopped"))
    outbox.refuse(second, ChannelStopped("y stopped"))
    assert str(outbox.take_error(outbox.last_ticket, BOB)) == "y stopped"
    # Bob's flush covered Alice's refusal too (one error per flush); Alice still hears.
    assert outbox.take_error(outbox.last_ticket, BOB) is None
    assert str(outbox.take_error(outbox.last_ticket, ALICE)) == "x stopped"
    assert outbox.take_error(outbox.last_ticket, ALICE) is None
    assert outbox.take_error(outbox.last_ticket, BOB) is None


def test_a_refusal_whose_maker_is_gone_is_dropped_once_someone_was_told() -> None:
    outbox = _Outbox(_sessions())
    gone = threading.Thread(name="gone")
    outbox.add("x", [b"x"], gone)
    batch = outbox.next_batch(10, 1000)
    assert batch
    outbox.refuse(batch, ChannelStopped("stopped"))
    del gone, batch
    gc.collect()
    assert isinstance(outbox.take_error(outbox.last_ticket, BOB), ChannelStopped)
    assert outbox._errors == []


def test_an_item_too_large_for_the_node_is_refused_before_it_goes_out_leaving_no_hole() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"a", b"b", b"too big", b"c"])
    batch = outbox.next_batch(100, 10_000, max_item_bytes=4)
    # The node would refuse the whole request; the state numbers a request's items from
    # its first, so the items after it move down one number instead of leaving a hole.
    assert batch and batch.payload == [b"a", b"b", b"c"]
    assert [item.seq for item in batch.items] == [1, 2, 3]
    outbox.add("c", [b"d"])
    later = outbox.next_batch(100, 10_000, max_item_bytes=4)
    assert later and [item.seq for item in later.items] == [4]
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, LimitExceeded) and error.details["size"] == len(b"too big")


def test_an_item_sent_before_is_left_to_the_nodes_verdict() -> None:
    # Sent under this session already (to a node allowing it): its number may be known
    # to the state, so only the node may refuse it, with its request.
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"a", b"too big"])
    first = outbox.next_batch(100, 10_000)
    assert first and len(first.items) == 2
    outbox.rewind()
    again = outbox.next_batch(100, 10_000, max_item_bytes=4)
    assert again and again.payload == [b"a", b"too big"]
    node_says = LimitExceeded("item 1 too big", limit="max_item_bytes", item=1, max_item_bytes=4)
    outbox.refuse(again, node_says)
    # The first request may have stored both (its answer was lost): not a refusal.
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, CommitUnknown) and error.details["refusal"] == "limit_exceeded"


def test_a_node_refusing_a_request_for_one_item_says_how_many_appends_went() -> None:
    # A node whose bound is lower than the one the request was built for.
    outbox = _Outbox(_sessions())
    outbox.add("c", [b"a", b"too big", b"b"])
    batch = outbox.next_batch(100, 10_000, max_item_bytes=100)
    assert batch and len(batch.items) == 3
    node_says = LimitExceeded("item 1 too big", limit="max_item_bytes", item=1, max_item_bytes=4)
    outbox.refuse(batch, node_says)
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, LimitExceeded) and error.details["refused"] == 3
    assert "nor the 2 other append(s)" in str(error)


def test_refusing_the_last_queued_items_leaves_nothing_to_send() -> None:
    outbox = _Outbox(_sessions())
    outbox.add("a", [b"too big"])
    outbox.add("b", [b"too big too"])
    assert outbox.next_batch(100, 10_000, max_item_bytes=4) is None
    assert outbox.pending == 0 and outbox.done_through() == outbox.last_ticket


def test_lost_futures_are_charged_to_the_items_that_held_them() -> None:
    outbox = _Outbox(_sessions())
    plain = outbox.add("a", [Encoded(b"data")], ALICE)
    outbox.watched.add(plain)  # a put of plain data, batched with another's future
    outbox.add("a", [Encoded(b"future", keys=(b"k",))], BOB)
    batch = outbox.next_batch(10, 1000)
    assert batch and len(batch.items) == 2
    outbox.acknowledge(batch, [0, 1], lost=[b"k"])
    assert plain not in outbox.refused  # the put returns its index, no FutureLost
    assert isinstance(outbox.take_error(outbox.last_ticket, BOB), FutureLost)


def test_a_refused_resend_of_requests_sent_apart_is_an_unknown_outcome() -> None:
    # x1 and x2 were stored (answer lost), the channel was stopped, x3 refused (answer
    # lost): the re-send joins them in one request, which the state refuses as a whole.
    state = ChannelState()
    state.apply(encode_command([["open", "a", None]], 100, 100))
    outbox = _Outbox(_sessions())
    outbox.add("a", [b"x1", b"x2"])
    first = outbox.next_batch(100, 10_000)
    assert first
    apply = [["append", "a", first.session, first.seq, first.payload]]
    assert state.apply(encode_command(apply, 100, 100))[0]["ok"]
    state.apply(encode_command([["stop", "a"]], 100, 100))
    outbox.add("a", [b"x3"])
    assert outbox.next_batch(100, 10_000)
    outbox.rewind()
    again = outbox.next_batch(100, 10_000)
    assert again and again.payload == [b"x1", b"x2", b"x3"]
    apply = [["append", "a", again.session, again.seq, again.payload]]
    answer = state.apply(encode_command(apply, 100, 100))[0]
    assert answer["code"] == "channel_stopped"
    outbox.refuse(again, ChannelStopped("stopped"))
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, CommitUnknown), error  # not "refused": x1 and x2 are stored


def test_a_watched_items_refusal_goes_to_its_put_alone() -> None:
    outbox = _Outbox(_sessions())
    ticket = outbox.add("a", [b"put"], ALICE)
    outbox.watched.add(ticket)
    batch = outbox.next_batch(10, 1000)
    assert batch
    outbox.refuse(batch, ChannelStopped("stopped"))
    assert isinstance(outbox.refused.pop(ticket), ChannelStopped)
    assert outbox.take_error(outbox.last_ticket, ALICE) is None


def test_refusals_told_to_others_are_not_kept_without_bound() -> None:
    outbox = _Outbox(_sessions())
    for _ in range(3 * _MAX_KEPT_REFUSALS):
        outbox.add("a", [b"x"], ALICE)  # Alice never flushes
        batch = outbox.next_batch(10, 1000)
        assert batch
        outbox.refuse(batch, ChannelStopped("stopped"))
        outbox.take_error(outbox.last_ticket, BOB)
    assert len(outbox._errors) <= _MAX_KEPT_REFUSALS + 1


def test_rewind_resends_everything_unanswered_in_order_with_original_seqs() -> None:
    outbox = _outbox(("a", 3), ("b", 2))
    sent = [outbox.next_batch(2, 1000) for _ in range(3)]
    assert [(b.channel, b.seq, len(b.items)) for b in sent if b] == [
        ("a", 1, 2),
        ("a", 3, 1),
        ("b", 4, 2),
    ]
    assert sent[1] is not None
    outbox.acknowledge(sent[1])  # the middle one got through
    outbox.rewind()
    again = list(iter(lambda: outbox.next_batch(10, 1000), None))
    assert [(b.channel, [i.seq for i in b.items]) for b in again] == [("a", [1, 2]), ("b", [4, 5])]
    assert all(b.epoch == 1 and b.session == sent[0].session for b in again)  # type: ignore[union-attr]


def test_answers_arriving_after_a_rewind_are_not_sent_again() -> None:
    outbox = _outbox(("a", 2))
    batch = outbox.next_batch(1, 1000)
    assert batch is not None
    outbox.rewind()
    outbox.acknowledge(batch)  # the old attempt's answer comes in late
    again = list(iter(lambda: outbox.next_batch(10, 1000), None))
    assert [[i.seq for i in b.items] for b in again] == [[2]]


def test_a_gap_for_a_queued_item_means_resend_not_new_session() -> None:
    outbox = _outbox(("a", 2))
    first, second = outbox.next_batch(1, 1000), outbox.next_batch(1, 1000)
    assert first and second
    assert outbox.gap(second, expected=1) is False
    assert outbox.session == first.session


def test_a_gap_for_an_unconsumed_refusal_moves_on_in_a_new_session() -> None:
    outbox = _outbox(("a", 1), ("b", 1), ("c", 2))
    refused, applied, waiting = (outbox.next_batch(10, 1000) for _ in range(3))
    assert refused and applied and waiting
    outbox.refuse(refused, LimitExceeded("refused before reaching the state"))
    old_session = outbox.session
    # The state says it still waits for seq 1, which this client will never send again.
    assert outbox.gap(waiting, expected=1) is True
    assert outbox.session != old_session
    # Nothing below the expected seq was pending, so everything still queued is renumbered.
    again = list(iter(lambda: outbox.next_batch(10, 1000), None))
    assert [(b.channel, [i.seq for i in b.items]) for b in again] == [("b", [1]), ("c", [2, 3])]
    assert all(b.session == outbox.session for b in again)
    outbox.add("d", [b"next"])
    nxt = outbox.next_batch(10, 1000)
    assert nxt is not None and nxt.seq == 4


def test_after_a_gap_items_below_the_expected_seq_count_as_stored() -> None:
    outbox = _outbox(("a", 1), ("b", 1), ("c", 1))
    stored, refused, waiting = (outbox.next_batch(10, 1000) for _ in range(3))
    assert stored and refused and waiting
    outbox.refuse(refused, LimitExceeded("refused"))
    assert outbox.gap(waiting, expected=2) is True  # so seq 1 was applied
    assert [i.channel for i in outbox._pending.values()] == ["c"]
    assert outbox.done_through() == 2


def test_answers_from_an_old_session_do_not_touch_renumbered_items() -> None:
    outbox = _outbox(("a", 1), ("b", 1))
    refused, old = outbox.next_batch(10, 1000), outbox.next_batch(10, 1000)
    assert refused and old
    outbox.refuse(refused, LimitExceeded("x"))
    assert outbox.gap(old, expected=1)
    outbox.refuse(old, ChannelStopped("late answer from the old session"))
    assert outbox.gap(old, expected=1) is False
    assert outbox.pending == 1 and outbox.take_error(outbox.last_ticket) is not None
    assert outbox.take_error(outbox.last_ticket) is None


def test_session_expiry_fails_what_was_sent_and_renumbers_the_rest() -> None:
    outbox = _outbox(("a", 2))
    sent = outbox.next_batch(1, 1000)
    assert sent is not None
    outbox.add("b", [b"never sent"])
    old_session = outbox.session
    expired = CommitUnknown("session unknown", session_expired=True)
    outbox.expire(sent, expired)
    assert outbox.session != old_session and outbox.session_used is False
    again = list(iter(lambda: outbox.next_batch(10, 1000), None))
    # a1 was not sent yet either, so it survives the expiry with b's item
    assert [(b.channel, [i.seq for i in b.items]) for b in again] == [("a", [1]), ("b", [2])]
    error = outbox.take_error(outbox.last_ticket)
    assert isinstance(error, CommitUnknown) and error.details == expired.details


def test_expiry_after_an_unconsumed_first_request_loses_nothing() -> None:
    # seq 1 was refused by the node itself, so the state never created the session and
    # answers "session unknown" to seq 2: nothing of the session can have been applied.
    outbox = _outbox(("a", 1), ("b", 2))
    first, second = outbox.next_batch(10, 1000), outbox.next_batch(10, 1000)
    assert first and second
    outbox.refuse(first, LimitExceeded("too big for this node"))
    outbox.expire(second, CommitUnknown("session unknown", session_expired=True))
    again = list(iter(lambda: outbox.next_batch(10, 1000), None))
    assert [(b.channel, [i.seq for i in b.items]) for b in again] == [("b", [1, 2])]
    assert isinstance(outbox.take_error(outbox.last_ticket), LimitExceeded)


def test_expiry_after_a_state_refusal_of_the_first_request_is_a_real_expiry() -> None:
    outbox = _outbox(("a", 1), ("b", 1))
    first, second = outbox.next_batch(10, 1000), outbox.next_batch(10, 1000)
    assert first and second
    outbox.refuse(first, ChannelStopped("the state refused it: the session exists"))
    outbox.expire(second, CommitUnknown("session unknown", session_expired=True))
    assert outbox.pending == 0


# ---------------------------------------------------------------------------------------
# Protocol-level tests of the client's retry logic, against a fake node


_LEADER_ONLY = ("open", "append", "info", "read", "stop", "delete", "end_session")

FAST = RetryPolicy(
    initial_delay=0.005, max_delay=0.05, jitter=0.0, timeout=5.0, attempt_timeout=1.0
)


class FakeNode:
    """Speaks the real protocol and answers from a ChannelState it may share with others.

    ``append_faults`` are consumed one per append request:
    ``"drop_before"`` closes the connection without applying, ``"drop_after"`` applies
    then closes without answering, ``"unknown_after"`` applies then answers
    ``commit_unknown``, ``"silent"`` neither applies nor answers, ``"refuse"`` answers
    ``limit_exceeded`` at the request level (the state never sees it), ``"hold"`` keeps
    the request unanswered until :meth:`release_held`. ``muted``: the
    node reads every request and answers none, pings and polls included, closing
    nothing (its host lost power or was cut off the network).
    """

    def __init__(self, name: str, state: ChannelState, *, leader: bool = True) -> None:
        self.name = name
        self.state = state
        self.leader = leader
        self.hint: str | None = None
        self.no_leader_answers = 0
        self.append_faults: list[str] = []
        self.muted = False
        #: Limits announced in the hello (None: none, as nodes of early versions).
        self.limits: Limits | None = None
        #: Seconds to wait after each read of at most 64 KiB (a slow link), and the
        #: receive buffer to give accepted sockets (bytes; None: the system's).
        self.read_pause = 0.0
        self.receive_buffer: int | None = None
        #: True: after its next read the node reads nothing more until this is cleared
        #: (a stopped process whose kernel buffers fill up).
        self.stalled = False
        self._held: list[tuple[protocol.Request, asyncio.StreamWriter]] = []
        self.max_read_items = 10_000
        self.before: Callable[[protocol.Request], None] | None = None
        self.requests: list[protocol.Request] = []
        self.connections = 0
        self.address = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        if self.receive_buffer is not None:  # accepted sockets inherit it
            for listening in self._server.sockets:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        self.stalled = False
        self.drop_connections()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def release_held(self) -> None:
        """Answer the requests held so far, on the connections they came on."""
        held, self._held = self._held, []
        for request, writer in held:
            if not writer.is_closing():
                self._answer(request, writer)

    def appends(self) -> list[protocol.Append]:
        return [r for r in self.requests if isinstance(r, protocol.Append)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        decoder = protocol.FrameDecoder()
        greeted = False
        try:
            while data := await reader.read(2**16):
                if self.read_pause:
                    await asyncio.sleep(self.read_pause)
                while self.stalled:
                    await asyncio.sleep(0.01)
                decoder.feed(data)
                for message in decoder.messages():
                    if not greeted:
                        protocol.check_hello(message)
                        hello = protocol.hello_response(self.name, self.limits)
                        writer.write(protocol.encode_frame(hello))
                        greeted = True
                        continue
                    request = protocol.parse_request(message)
                    self.requests.append(request)
                    if self.muted:
                        continue
                    if isinstance(request, protocol.Poll):
                        asyncio.create_task(self._answer_poll(request, writer))
                    else:
                        self._answer(request, writer)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, request: protocol.Request, writer: asyncio.StreamWriter) -> None:
        if self.before is not None:
            self.before(request)
        fault = ""
        if isinstance(request, protocol.Append) and self.append_faults:
            fault = self.append_faults.pop(0)
        if fault == "hold":
            self._held.append((request, writer))
            return
        if fault in ("drop_before", "silent"):
            if fault == "drop_before":
                writer.close()
            return
        try:
            if fault == "refuse":
                raise LimitExceeded("refused by the request's own checks", limit="test")
            response = protocol.ok_response(request.id, **self._execute(request))
        except RaftchanError as exc:
            response = protocol.error_response(request.id, exc)
        if fault == "drop_after":
            writer.close()
            return
        if fault == "unknown_after":
            response = protocol.error_response(request.id, CommitUnknown("leader changed"))
        writer.write(protocol.encode_frame(response))

    def _execute(self, request: protocol.Request) -> dict[str, Any]:
        if isinstance(request, protocol.Ping):
            return {}
        if isinstance(request, protocol.Status):
            return {"name": self.name, "role": "leader" if self.leader else "follower"}
        if request.TYPE in _LEADER_ONLY:
            if self.no_leader_answers:
                self.no_leader_answers -= 1
                raise NoLeader("election in progress")
            if not self.leader:
                raise NotLeader(leader=self.hint)
        if isinstance(request, protocol.Info):
            return self._read(request.channel, None, None) | {"maxlen": None}
        if isinstance(request, protocol.Read):
            return self._read(request.channel, request.start, request.end)
        op: list[Any]
        if isinstance(request, protocol.Open):
            op = ["open", request.channel, request.maxlen]
        elif isinstance(request, protocol.Append):
            op = ["append", request.channel, request.session, request.seq, request.items]
        elif isinstance(request, protocol.Stop):
            op = ["stop", request.channel]
        elif isinstance(request, protocol.Delete):
            op = ["delete", request.channel]
        elif isinstance(request, protocol.EndSession):
            op = ["end_session", request.session]
        else:
            raise AssertionError(request)
        return self.apply(op)

    def apply(self, op: list[Any]) -> dict[str, Any]:
        (result,) = self.state.apply(encode_command([op], 10_000, 10_000))
        if not result["ok"]:
            raise error_from_wire(result["code"], result["message"], result["details"])
        return {k: v for k, v in result.items() if k != "ok"}

    def _read(self, channel: str, start: int | None, end: int | None) -> dict[str, Any]:
        result = self.state.read(channel, start, end, self.max_read_items)
        if not result["ok"]:
            raise error_from_wire(result["code"], result["message"], result["details"])
        return {k: v for k, v in result.items() if k != "ok"}

    async def _answer_poll(self, request: protocol.Poll, writer: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + request.wait
        while True:
            channel = self.state.channels.get(request.channel)
            news = channel is None or channel.next > request.start or channel.stopped
            if news or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        try:
            response = protocol.ok_response(
                request.id, **self._read(request.channel, request.start, None)
            )
        except RaftchanError as exc:
            response = protocol.error_response(request.id, exc)
        if not writer.is_closing():
            writer.write(protocol.encode_frame(response))


_live_nodes: list[FakeNode] = []


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 30.0) -> None:
    async def with_cleanup() -> None:
        try:
            await asyncio.wait_for(scenario(), timeout)
        finally:
            while _live_nodes:
                await _live_nodes.pop().close()

    asyncio.run(with_cleanup())


async def _node(
    name: str, state: ChannelState, *, leader: bool = True, **settings: Any
) -> FakeNode:
    """A fake node with ``settings`` (attributes) applied before it starts listening."""
    node = FakeNode(name, state, leader=leader)
    for attribute, value in settings.items():
        setattr(node, attribute, value)
    _live_nodes.append(node)
    return await node.start()


async def _nodes(*leaders: bool) -> list[FakeNode]:
    """Started fake nodes sharing one state, leading or not as ``leaders`` says."""
    state = ChannelState()
    return [await _node(f"n{i}", state, leader=lead) for i, lead in enumerate(leaders)]


def _stored(node: FakeNode, channel: str) -> list[Any]:
    return [raftchan.codec.decode_item(data) for data in node.state.channels[channel].items]


def test_follows_the_leader_hint() -> None:
    async def scenario() -> None:
        follower, leader = await _nodes(False, True)
        follower.hint = leader.address
        async with AsyncClient(follower.address, retry=FAST) as client:
            chan = await client.channel("c")
            chan.append(1)
            await chan.flush()
            assert await chan.read() == [1]
        assert [r.TYPE for r in follower.requests] == ["open"]
        assert [r.TYPE for r in leader.requests][:3] == ["open", "append", "read"]

    run(scenario)


def test_appends_follow_a_leader_change() -> None:
    async def scenario() -> None:
        old, new = await _nodes(True, False)
        async with AsyncClient(old.address, retry=FAST) as client:
            chan = await client.channel("c")
            chan.append("before")
            await chan.flush()
            old.leader, old.hint, new.leader = False, new.address, True
            chan.extend(["after", "change"])
            await chan.flush()
            assert _stored(new, "c") == ["before", "after", "change"]
            assert [a.seq for a in new.appends()] == [2]
            assert [a.seq for a in old.appends()] == [1, 2]  # the refused try, same seq

    run(scenario)


def test_no_leader_is_retried_with_backoff() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        node.no_leader_answers = 3
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            chan.append(1)
            await chan.flush()
        assert _stored(node, "c") == [1]
        assert node.connections >= 4  # a node without a leader is left for the next one

    run(scenario)


def test_no_leader_past_the_deadline_raises_no_leader_when_nothing_was_sent() -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1:1", retry=FAST) as client:
            with pytest.raises(NoLeader):
                await client.channel("c", timeout=0.3)

    run(scenario)


@pytest.mark.parametrize("fault", ["drop_before", "drop_after", "unknown_after"])
def test_unknown_outcomes_are_resent_with_their_original_seqs(fault: str) -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST, max_in_flight=1) as client:
            chan = await client.channel("c")
            node.append_faults = [fault]
            chan.extend(["a", "b"])
            await chan.flush()
            assert await chan.read() == ["a", "b"]  # exactly once
        sends = [(a.seq, len(a.items)) for a in node.appends()]
        assert sends == [(1, 2), (1, 2)]

    run(scenario)


def test_resend_covers_every_unanswered_item_in_sequence_order() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST, max_in_flight=8) as client:
            left, right = await client.channel("l"), await client.channel("r")
            await client.flush()
            node.append_faults = ["ok", "drop_after"]
            for i in range(5):
                left.append(f"l{i}")
                right.append(f"r{i}")
            await client.flush()
            assert await left.read() == [f"l{i}" for i in range(5)]
            assert await right.read() == [f"r{i}" for i in range(5)]
        seqs = [a.seq for a in node.appends()]
        # Each attempt sends in increasing order; the re-send restarts at the lowest
        # unanswered seq (2: seq 1 was answered), never skipping one.
        restart = next(i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1])
        assert seqs[:restart] == sorted(seqs[:restart]) and seqs[restart] == 2
        assert seqs[restart:] == list(range(2, 11))

    run(scenario)


def test_a_silent_node_makes_flush_time_out_and_the_items_stay_queued() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            node.append_faults = ["silent"]
            chan.append("x")
            with pytest.raises(Timeout):
                await chan.flush(timeout=0.2)
            # The attempt timeout drops the silent connection and the item is re-sent.
            await chan.flush(timeout=5.0)
            assert await chan.read() == ["x"]

    run(scenario)


#: Pings after 0.2 s of quiet, answered within 0.3 s; the attempt timeout is far away.
PROBING = RetryPolicy(
    initial_delay=0.005,
    max_delay=0.05,
    jitter=0.0,
    timeout=5.0,
    attempt_timeout=60.0,
    probe_after=0.2,
    probe_timeout=0.3,
)


def test_a_node_gone_quiet_is_left_once_its_ping_goes_unanswered() -> None:
    # A leader cut off the network answers nothing and closes nothing. Only the ping can
    # tell: the flush's own deadline (5 s) comes long before the attempt timeout (60 s).
    async def scenario() -> None:
        old, new = await _nodes(True, False)
        async with AsyncClient([old.address, new.address], retry=PROBING) as client:
            chan = await client.channel("c")
            chan.append("before")
            await chan.flush()
            old.muted = True
            old.leader, new.leader = False, True
            chan.append("after")
            await chan.flush(timeout=5.0)
            assert _stored(new, "c") == ["before", "after"]
        pings = [r for r in old.requests if isinstance(r, protocol.Ping)]
        assert len(pings) == 1

    run(scenario)


def test_a_hung_node_is_left_although_its_host_keeps_taking_new_appends() -> None:
    # A leader whose process hangs (stopped, deadlocked, stalled on its disk) while its
    # host runs on: the host's kernel acknowledges every byte the client sends, the
    # process answers nothing. Appends that keep coming after the ping (more producers,
    # or a producer going on after a flush timed out) are taken by that kernel too, and
    # prove nothing: only bytes already on their way when the ping went out do. (Room
    # for 100 requests in flight, so that a new one goes out every 0.1 s all along.)
    async def scenario() -> None:
        old, new = await _nodes(True, False)
        addresses = [old.address, new.address]
        async with AsyncClient(addresses, retry=PROBING, max_in_flight=100) as client:
            chan = await client.channel("c")
            chan.append(-1)
            await chan.flush()
            old.muted = True
            old.leader, new.leader = False, True

            async def keep_appending() -> None:
                for k in range(100):  # 10 a second, for at most 10 s
                    chan.append(k)
                    await asyncio.sleep(0.1)

            appending = asyncio.ensure_future(keep_appending())
            try:
                chan.append("after")
                # Well before the attempt timeout (60 s): the pings left the old leader.
                await chan.flush(timeout=5.0)
            finally:
                appending.cancel()
            assert _stored(new, "c")[:2] == [-1, "after"]
            assert old.connections == 1

    run(scenario)


def test_a_node_holding_a_request_is_pinged_and_kept() -> None:
    # A live node that holds an append (an election, a slow commit) answers the pings
    # meanwhile: the client keeps its connection and gets the answer when it comes.
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=PROBING) as client:
            chan = await client.channel("c")
            node.append_faults = ["hold"]
            chan.append("held")
            flush = asyncio.ensure_future(chan.flush(timeout=5.0))
            await asyncio.sleep(1.0)
            assert not flush.done()
            pings = [r for r in node.requests if isinstance(r, protocol.Ping)]
            assert len(pings) >= 3  # one per 0.2 s of quiet, each answered
            assert node.connections == 1
            node.release_held()
            await flush
            assert node.connections == 1
            assert await chan.read() == ["held"]

    run(scenario)


def test_a_refusal_that_comes_after_its_put_gave_up_reaches_the_next_flush() -> None:
    # The put's item is refused while an earlier append is still held: the put times
    # out waiting for that one, and its refusal must not vanish with it.
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            node.append_faults = ["hold", "refuse"]
            chan.append("held")
            await asyncio.sleep(0.05)  # sent alone
            with pytest.raises(Timeout):
                await chan.put("refused", timeout=0.3)
            node.release_held()
            with pytest.raises(LimitExceeded):
                await chan.flush(timeout=5.0)
            await chan.flush(timeout=5.0)  # raised once
            assert await chan.read() == ["held"]

    run(scenario)


def test_a_task_hears_of_its_refusal_after_another_tasks_flush_raised_it() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            made = asyncio.Event()

            async def maker() -> None:
                node.append_faults = ["refuse"]
                chan.append("refused")
                made.set()
                await asyncio.sleep(0.3)  # the other flush comes first
                with pytest.raises(LimitExceeded):
                    await chan.flush(timeout=5.0)
                await chan.flush(timeout=5.0)  # once

            task = asyncio.ensure_future(maker())
            await made.wait()
            with pytest.raises(LimitExceeded):  # covers the maker's append: raised once
                await chan.flush(timeout=5.0)
            await task

    run(scenario)


def test_a_put_of_an_item_too_large_for_the_node_ends_at_once() -> None:
    # Queued before the client knew the node's bound: refused as the request is built,
    # while the append after it goes out (and is held); the put must not wait for that.
    async def scenario() -> None:
        node = await _node("n0", ChannelState(), limits=Limits(max_item_bytes=1000))
        node.apply(["open", "a", None])
        node.append_faults = ["hold"]
        # The held request is not given up on within the put's timeout.
        patient = replace(FAST, attempt_timeout=30.0, timeout=30.0)
        client = AsyncClient(node.address, retry=patient, max_in_flight=1)
        try:
            chan = AsyncChannel(client, "a")  # no connection yet
            put = asyncio.ensure_future(chan.put("x" * 5000, timeout=3.0))
            await asyncio.sleep(0)
            chan.append("later")
            with pytest.raises(LimitExceeded):
                await put
        finally:
            node.release_held()
            await client.close(1.0)

    run(scenario)


def test_no_ping_goes_to_a_node_that_reads_no_more_of_the_connection() -> None:
    # A node holding max_pending_requests requests of a connection reads no more of it
    # until it answers one (it announces that bound): a ping would wait unread, and the
    # client would leave a live node. At the bound the client does not ping.
    async def scenario() -> None:
        node = await _node("n0", ChannelState(), limits=Limits(max_pending_requests=2))
        async with AsyncClient(node.address, retry=PROBING) as client:
            chan = await client.channel("c")
            node.append_faults = ["hold", "hold"]
            for item in ("a", "b"):  # two append requests, both held
                chan.append(item)
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            assert len(node.appends()) == 2
            assert not [r for r in node.requests if isinstance(r, protocol.Ping)]
            node.release_held()
            await chan.flush(timeout=5.0)
            assert node.connections == 1
            assert await chan.read() == ["a", "b"]

    run(scenario)


def test_a_large_upload_still_moving_on_a_slow_link_keeps_its_connection() -> None:
    # The node takes 64 KiB every 50 ms through a small receive buffer: a 2.7 MB batch
    # takes about two seconds to arrive, and the ping queued behind it is answered only
    # then. The client's bytes the node's host keeps taking show it is there.
    async def scenario() -> None:
        node = await _node("slow", ChannelState(), read_pause=0.05, receive_buffer=64 * 1024)
        async with AsyncClient(node.address, retry=PROBING) as client:
            chan = await client.channel("c")
            chan.extend([os.urandom(900_000) for _ in range(3)])
            await chan.flush(timeout=20.0)
            assert node.connections == 1
            assert len(node.appends()) == 1
            assert len(await chan.read()) == 3

    run(scenario)


def test_a_node_that_stops_reading_mid_upload_is_left_and_the_batch_goes_elsewhere() -> None:
    # The leader stops (its process hangs) while 21.6 MB of batches are on their way: its
    # buffers fill, the client's bytes stop moving and the ping is never read. The client
    # must leave it although its own bytes still wait to go out, and a plain close would
    # wait for them: the batches must reach the new leader, long before the attempt
    # timeout.
    async def scenario() -> None:
        state = ChannelState()
        old = await _node("old", state, receive_buffer=64 * 1024)
        new = await _node("new", state, leader=False)
        async with AsyncClient([old.address, new.address], retry=PROBING) as client:
            chan = await client.channel("c")
            old.stalled = True
            old.leader, new.leader = False, True
            # More than the kernel's buffers of both ends hold: some stays in asyncio's.
            chan.extend([os.urandom(900_000) for _ in range(24)])
            await chan.flush(timeout=10.0)
            assert len(_stored(new, "c")) == 24

    run(scenario)


def test_a_refused_append_raises_at_the_next_flush_only() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST) as client:
            chan, other = await client.channel("c"), await client.channel("o")
            node.apply(["stop", "c"])  # stopped by someone else; this client does not know
            chan.append("refused")
            other.append("fine")
            with pytest.raises(ChannelStopped):
                await client.flush()
            await client.flush()  # reported once
            with pytest.raises(ChannelStopped):
                chan.append("now known at once")
            other.append("still fine")
            await other.flush()
            assert await other.read() == ["fine", "still fine"]

    run(scenario)


@pytest.mark.parametrize("stored_before", [0, 2])
def test_an_unconsumed_refusal_does_not_wedge_later_appends(stored_before: int) -> None:
    # A request refused by the node itself leaves its seqs unconsumed in the state: the
    # next append then meets "sequence gap" (or "session unknown" if it was the session's
    # first request). The client moves on in a new session, losing and repeating nothing.
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST, max_in_flight=1) as client:
            chan = await client.channel("c")
            chan.extend(range(stored_before))
            await chan.flush()
            node.append_faults = ["refuse"]
            chan.append("refused")
            with pytest.raises(LimitExceeded):
                await chan.flush()
            chan.append("next")
            await chan.flush()
            assert await chan.read() == [*range(stored_before), "next"]
        sessions = {a.session for a in node.appends()}
        assert len(sessions) == 2

    run(scenario)


def test_an_expired_session_fails_its_unknown_appends_then_goes_on() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            chan.append("kept")
            await chan.flush()
            node.state.sessions.clear()  # as if the cluster forgot the session (LRU)
            chan.append("unknown")
            with pytest.raises(CommitUnknown) as info:
                await chan.flush()
            assert info.value.details.get("session_expired")
            chan.append("new session")
            await chan.flush()
            assert await chan.read() == ["kept", "new session"]

    run(scenario)


def test_reads_page_and_restart_when_trimming_overtakes_them() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        node.max_read_items = 2
        async with AsyncClient(node.address, retry=FAST) as client:
            chan = await client.channel("c")
            chan.extend(range(7))
            await chan.flush()
            assert list(await chan.data()) == list(range(7))
            assert await chan.read(start=2, end=6) == [2, 3, 4, 5]
            assert await chan.len() == 7

            reads = 0

            def trim_during_second_read(request: protocol.Request) -> None:
                nonlocal reads
                if isinstance(request, protocol.Read):
                    reads += 1
                    if reads == 2:
                        node.apply(["open", "c", 3])

            node.before = trim_during_second_read
            assert await chan.read() == [4, 5, 6]

    run(scenario)


def test_iteration_resumes_after_a_reconnect_without_repeats_or_gaps() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST, poll_wait=0.2) as client:
            chan = await client.channel("c")
            chan.extend(range(3))
            await chan.flush()
            seen: list[Any] = []
            async for item in chan:
                seen.append(item)
                if item == 2:
                    node.drop_connections()
                    node.apply(["append", "c", b"w" * 16, 1, [raftchan.codec.encode_item(3)]])
                if item == 3:
                    node.apply(["stop", "c"])
            assert seen == [0, 1, 2, 3]
            assert node.connections >= 2

    run(scenario)


def test_iteration_raises_trimmed_gap_rather_than_skip() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        async with AsyncClient(node.address, retry=FAST, poll_wait=0.2) as client:
            chan = await client.channel("c", maxlen=2)
            chan.extend(range(5))
            await chan.flush()
            with pytest.raises(TrimmedGap):
                async for _ in chan.iterate(start=0):
                    pass

    run(scenario)


def test_status_asks_every_node_and_reports_the_unreachable() -> None:
    async def scenario() -> None:
        leader, follower = await _nodes(True, False)
        await follower.close()
        async with AsyncClient([leader.address, follower.address], retry=FAST) as client:
            statuses = await client.status(timeout=1.0)
        assert statuses[0] == {"client_address": leader.address, "name": "n0", "role": "leader"}
        assert statuses[1]["client_address"] == follower.address
        assert statuses[1]["role"] == "unreachable" and statuses[1]["error"]

    run(scenario)


def test_close_ends_the_session_and_later_calls_raise_closed() -> None:
    async def scenario() -> None:
        (node,) = await _nodes(True)
        client = AsyncClient(node.address, retry=FAST)
        chan = await client.channel("c")
        chan.append(1)
        await client.close()
        assert _stored(node, "c") == [1]  # close flushed
        assert node.requests[-1].TYPE == "end_session"
        with pytest.raises(Closed):
            chan.append(2)
        with pytest.raises(Closed):
            await chan.flush()
        with pytest.raises(Closed):
            await client.channel("d")
        await client.close()  # twice is fine

    run(scenario)


# ---------------------------------------------------------------------------------------
# The blocking facade, against the same fake node on a loop in another thread


class _FakeNodeThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        (self.node,) = self.call(lambda: _nodes(True))

    def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        async def wrapped() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(10)

    def close(self) -> None:
        _live_nodes.remove(self.node)
        self.call(self.node.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(name="fake")
def fake_fixture() -> Any:
    fake = _FakeNodeThread()
    yield fake
    fake.close()


def test_sync_client_end_to_end_against_the_fake_node(fake: _FakeNodeThread) -> None:
    with raftchan.Client(fake.node.address, retry=FAST, poll_wait=0.3) as client:
        chan = client.channel("jobs", maxlen=None)
        chan.append({"x": 123})
        chan.extend([1, "two", [3]])
        with pytest.raises(raftchan.ItemNotEncodable):
            chan.append({1, 2})  # raises in the caller's thread
        chan.flush(timeout=10)
        assert list(chan.data) == [{"x": 123}, 1, "two", [3]]
        assert len(chan) == 4

        seen: list[Any] = []
        reader = threading.Thread(target=lambda: seen.extend(chan))
        reader.start()
        time.sleep(0.5)  # the reader is now blocked in a poll
        chan.append("last")
        chan.stop()
        reader.join(timeout=3)
        assert not reader.is_alive()
        assert seen == [{"x": 123}, 1, "two", [3], "last"]
        with pytest.raises(ChannelStopped):
            chan.append("too late")
        assert client.status()[0]["role"] == "leader"
    with pytest.raises(Closed):
        chan.append(1)
    with pytest.raises(Closed):
        len(chan)


def test_sync_appends_from_many_threads_all_arrive_once(fake: _FakeNodeThread) -> None:
    with raftchan.Client(fake.node.address, retry=FAST) as client:
        chan = client.channel("c")

        def producer(n: int) -> None:
            for i in range(200):
                chan.append([n, i])

        threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client.flush()
        items = chan.read()
        assert sorted(map(tuple, items)) == [(n, i) for n in range(4) for i in range(200)]
        for n in range(4):  # each producer's own order is kept
            assert [i for m, i in items if m == n] == list(range(200))


def test_sync_iteration_can_be_abandoned_and_client_closed(fake: _FakeNodeThread) -> None:
    client = raftchan.Client(fake.node.address, retry=FAST, poll_wait=0.2)
    chan = client.channel("c")
    chan.extend(range(10))
    iterator = chan.iterate()
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    iterator.close()
    client.close()
    assert client.closed
