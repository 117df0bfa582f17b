"""The leader's bookkeeping of snapshot turns (raftchan.snapshot_turns)."""

from __future__ import annotations

from raftchan.snapshot_turns import GRANT_TIMEOUT_S, SnapshotTurns, Wish


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def a_holds_the_turn_and_b_waits(clock: FakeClock) -> SnapshotTurns:
    turns = SnapshotTurns(clock)
    turns.heard("a", Wish.WANTS)
    turns.heard("b", Wish.WANTS)
    assert turns.has_turn("a")
    return turns


def test_one_follower_at_a_time_and_the_next_once_it_is_done() -> None:
    turns = SnapshotTurns(FakeClock())
    assert not turns.has_turn("a")  # nothing asked for
    turns.heard("a", Wish.WANTS)
    turns.heard("b", Wish.WANTS)
    assert turns.has_turn("a")
    assert not turns.has_turn("b")
    turns.heard("a", Wish.WANTS)  # an answer sent before the turn reached it
    turns.heard("a", Wish.WRITING)
    assert turns.has_turn("a")
    assert not turns.has_turn("b")
    turns.heard("a", Wish.IDLE)  # written
    assert not turns.has_turn("a")
    assert turns.has_turn("b")


def test_no_turn_while_the_leader_writes_its_own() -> None:
    turns = SnapshotTurns(FakeClock())
    turns.leader_writing = True
    turns.heard("a", Wish.WANTS)
    assert not turns.has_turn("a")
    turns.leader_writing = False
    assert turns.has_turn("a")


def test_a_holder_that_never_starts_loses_the_turn() -> None:
    clock = FakeClock()
    turns = a_holds_the_turn_and_b_waits(clock)
    clock.now += GRANT_TIMEOUT_S
    assert not turns.has_turn("b")
    clock.now += 0.1
    assert turns.has_turn("b")
    assert not turns.has_turn("a")  # it asks again; b holds the turn now


def test_a_holder_that_started_keeps_the_turn_however_long_it_writes() -> None:
    clock = FakeClock()
    turns = a_holds_the_turn_and_b_waits(clock)
    turns.heard("a", Wish.WRITING)
    clock.now += 10 * GRANT_TIMEOUT_S
    assert not turns.has_turn("b")
    assert turns.has_turn("a")


def test_a_disconnected_holder_loses_the_turn_and_a_new_term_forgets_all() -> None:
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    turns.forget("a")
    assert turns.has_turn("b")
    turns.reset()
    assert turns.holder is None
    assert not turns.has_turn("b")  # its wish is heard again from its next answer


def test_an_unknown_wish_counts_as_idle() -> None:
    # A later version may say more; this one neither grants nor keeps a turn on it.
    turns = SnapshotTurns(FakeClock())
    turns.heard("a", 7)
    assert not turns.has_turn("a")
    turns.heard("a", Wish.WANTS)
    assert turns.has_turn("a")
    turns.heard("a", 7)
    assert turns.holder is None
