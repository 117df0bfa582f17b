"""Append-entries rewritten so that a follower keeps the entries it already holds."""

from __future__ import annotations

from typing import Any

from raftchan.held_entries import for_follower, without_held_entries

#: A follower's log: indexes 5..9; term 2 up to 7, term 3 after (index 5 is the entry a
#: snapshot ended at, kept as pysyncobj keeps it).
LOG = [(b"c5", 5, 2), (b"c6", 6, 2), (b"c7", 7, 2), (b"c8", 8, 3), (b"c9", 9, 3)]


def message(prev: tuple[int, int], *entries: tuple[bytes, int, int]) -> dict[str, Any]:
    return {
        "type": "append_entries",
        "term": 3,
        "commit_index": 6,
        "prevLogIdx": prev[0],
        "prevLogTerm": prev[1],
        "entries": list(entries),
    }


def test_entries_sent_again_with_new_ones_keep_the_held_and_bring_the_new() -> None:
    sent = message((6, 2), (b"c7", 7, 2), (b"c8", 8, 3), (b"c9", 9, 3), (b"c10", 10, 3))
    assert without_held_entries(LOG, sent) == {
        **sent,
        "prevLogIdx": 9,
        "prevLogTerm": 3,
        "entries": [(b"c10", 10, 3)],
    }


def test_entries_all_held_leave_nothing_to_append() -> None:
    sent = message((6, 2), (b"c7", 7, 2), (b"c8", 8, 3))
    rewritten = without_held_entries(LOG, sent)
    assert rewritten["entries"] == []
    assert (rewritten["prevLogIdx"], rewritten["prevLogTerm"]) == (8, 3)
    assert rewritten["commit_index"] == 6 and rewritten["term"] == 3
    assert sent["entries"] == [(b"c7", 7, 2), (b"c8", 8, 3)]  # the original is left alone


def test_a_conflict_after_held_entries_is_left_for_the_follower_to_cut() -> None:
    sent = message((6, 2), (b"c7", 7, 2), (b"x8", 8, 4), (b"x9", 9, 4))
    assert without_held_entries(LOG, sent) == {
        **sent,
        "prevLogIdx": 7,
        "prevLogTerm": 2,
        "entries": [(b"x8", 8, 4), (b"x9", 9, 4)],
    }


def test_a_message_that_starts_with_new_or_conflicting_entries_is_unchanged() -> None:
    new = message((9, 3), (b"c10", 10, 3))
    conflicting = message((7, 2), (b"x8", 8, 4))
    assert without_held_entries(LOG, new) is new
    assert without_held_entries(LOG, conflicting) is conflicting


def test_entries_before_the_log_or_into_an_empty_log_are_unchanged() -> None:
    compacted = message((3, 1), (b"c4", 4, 1), (b"c5", 5, 2))
    assert without_held_entries(LOG, compacted) is compacted
    first = message((0, 0), (b"c1", 1, 1))
    assert without_held_entries([], first) is first
    heartbeat = message((9, 3))
    assert without_held_entries(LOG, heartbeat) is heartbeat


def test_entries_all_held_before_more_become_a_heartbeat_at_the_end_of_the_log() -> None:
    # pysyncobj would delete 9 (after the last entry sent), acknowledged and applied.
    sent = {**message((6, 2), (b"c7", 7, 2), (b"c8", 8, 3)), "commit_index": 9}
    heartbeat, answer_next = for_follower(LOG, sent)
    assert heartbeat == {
        **sent,
        "entries": [],
        "prevLogIdx": 9,
        "prevLogTerm": 3,
        "commit_index": 8,
    }
    assert answer_next == 9  # what was shown to match, not the whole log


def test_a_heartbeat_keeps_a_commit_index_below_the_last_entry_sent() -> None:
    sent = message((6, 2), (b"c7", 7, 2), (b"c8", 8, 3))
    heartbeat, _next = for_follower(LOG, sent)
    assert heartbeat["commit_index"] == 6


def test_other_messages_are_trimmed_of_held_entries_and_answered_as_pysyncobj_does() -> None:
    reaching_the_end = message((6, 2), (b"c7", 7, 2), (b"c8", 8, 3), (b"c9", 9, 3))
    with_new = message((8, 3), (b"c9", 9, 3), (b"c10", 10, 3))
    conflicting = message((7, 2), (b"x8", 8, 4))
    new = message((9, 3), (b"c10", 10, 3))
    for sent in (reaching_the_end, with_new, conflicting, new):
        assert for_follower(LOG, sent) == (without_held_entries(LOG, sent), None), sent
