"""The leader's bookkeeping of snapshot turns (raftchan.snapshot_turns)."""

from __future__ import annotations

from raftchan.snapshot_turns import GRANT_TIMEOUT_S, SnapshotTurns, Wish, follower_wish

TERM = 3


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
    assert turns.grant_for("b", TERM) is None  # a has waited longer
    assert turns.grant_for("a", TERM) is not None
    return turns


def test_one_follower_at_a_time_and_the_next_once_it_is_done() -> None:
    turns = SnapshotTurns(FakeClock())
    assert turns.grant_for("a", TERM) is None  # nothing asked for
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    grant = turns.grant_for("a", TERM)
    turns.heard("a", Wish.WANTS)  # an answer sent before the turn reached it
    turns.heard("a", Wish.WRITING)
    assert turns.grant_for("a", TERM) == grant
    assert turns.grant_for("b", TERM) is None
    turns.heard("a", Wish.IDLE)  # written
    assert turns.grant_for("a", TERM) is None
    assert turns.grant_for("b", TERM) not in (None, grant)


def test_a_turn_is_good_for_one_write_and_the_holder_goes_to_the_back() -> None:
    # Its log grew while it wrote, so it wants another at once: b goes first.
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    turns.heard("a", Wish.WRITING)
    turns.heard("a", Wish.WANTS)
    assert turns.grant_for("a", TERM) is None
    assert turns.grant_for("b", TERM) is not None
    turns.heard("b", Wish.WRITING)
    turns.heard("b", Wish.IDLE)
    assert turns.grant_for("a", TERM) is not None


def test_grants_differ_from_turn_to_turn_and_term_to_term() -> None:
    turns = SnapshotTurns(FakeClock())
    seen = set()
    for term in (1, 2):
        for _ in range(3):
            turns.heard("a", Wish.WANTS)
            grant = turns.grant_for("a", term)
            assert grant is not None
            seen.add(grant)
            turns.heard("a", Wish.WRITING)
            turns.heard("a", Wish.IDLE)
        turns.reset()
    assert len(seen) == 6


def test_no_turn_while_the_leader_writes_its_own() -> None:
    turns = SnapshotTurns(FakeClock())
    turns.leader_writing = True
    turns.heard("a", Wish.WANTS)
    assert turns.grant_for("a", TERM) is None
    turns.leader_writing = False
    assert turns.grant_for("a", TERM) is not None


def test_a_holder_that_never_starts_loses_the_turn() -> None:
    clock = FakeClock()
    turns = a_holds_the_turn_and_b_waits(clock)
    clock.now += GRANT_TIMEOUT_S
    assert turns.grant_for("b", TERM) is None
    clock.now += 0.1
    assert turns.grant_for("b", TERM) is not None
    turns.heard("a", Wish.WANTS)  # it asks again, behind b
    assert turns.grant_for("a", TERM) is None


def test_a_holder_that_started_keeps_the_turn_however_long_it_writes() -> None:
    clock = FakeClock()
    turns = a_holds_the_turn_and_b_waits(clock)
    turns.heard("a", Wish.WRITING)
    clock.now += 10 * GRANT_TIMEOUT_S
    assert turns.grant_for("b", TERM) is None
    assert turns.grant_for("a", TERM) is not None


def test_a_write_not_granted_here_holds_the_turn_until_it_ends() -> None:
    # An earlier leader's turn, or a follower whose log was twice over.
    turns = SnapshotTurns(FakeClock())
    turns.heard("b", Wish.WANTS)
    turns.heard("a", Wish.WRITING)
    assert turns.grant_for("b", TERM) is None
    turns.heard("a", Wish.IDLE)
    assert turns.grant_for("b", TERM) is not None


def test_a_disconnected_or_removed_holder_loses_the_turn() -> None:
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    turns.heard("a", Wish.WRITING)
    turns.forget("a")
    assert turns.grant_for("b", TERM) is not None
    turns.heard("b", Wish.WRITING)
    turns.keep_only({"a", "c"})  # b was removed from the cluster
    assert turns.holder is None
    turns.heard("c", Wish.WANTS)
    assert turns.grant_for("c", TERM) is not None


def test_a_new_term_forgets_all() -> None:
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    turns.reset()
    assert turns.holder is None
    assert turns.grant_for("b", TERM) is None  # its wish is heard again from its next answer


def test_an_unknown_wish_counts_as_idle() -> None:
    # A later version may say more; this one neither grants nor keeps a turn on it.
    turns = SnapshotTurns(FakeClock())
    turns.heard("a", 7)
    assert turns.grant_for("a", TERM) is None
    turns.heard("a", Wish.WANTS)
    assert turns.grant_for("a", TERM) is not None
    turns.heard("a", 7)
    assert turns.holder is None


def test_a_follower_done_with_its_turn_gives_it_back_even_when_due_again() -> None:
    turns = a_holds_the_turn_and_b_waits(FakeClock())
    # a's write began and ended between two answers: the first after it says
    assert follower_wish(writing=False, wanted=True, turn_spent=True) is Wish.IDLE
    turns.heard("a", Wish.IDLE)
    assert turns.grant_for("b", TERM) is not None  # b at once, not after GRANT_TIMEOUT_S
    # and once the turn is gone, a asks again.
    assert follower_wish(writing=False, wanted=True, turn_spent=False) is Wish.WANTS
    assert follower_wish(writing=True, wanted=True, turn_spent=True) is Wish.WRITING
    assert follower_wish(writing=False, wanted=False, turn_spent=False) is Wish.IDLE
