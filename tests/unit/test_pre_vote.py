"""Tests of the pre-vote rules and rounds (raftchan.pre_vote)."""

from __future__ import annotations

import pytest

from raftchan import pre_vote


def _ask(term: int, index: int, log_term: int) -> dict[str, object]:
    return pre_vote.request(term, index, log_term)


def test_granted_for_a_later_term_and_a_log_as_up_to_date_outside_a_lease() -> None:
    # This node: term 4, log ends at index 10 of term 3.
    assert pre_vote.grants(_ask(5, 10, 3), 4, 10, 3, in_lease=False) is True
    assert pre_vote.grants(_ask(5, 11, 3), 4, 10, 3, in_lease=False) is True
    assert pre_vote.grants(_ask(5, 2, 4), 4, 10, 3, in_lease=False) is True  # later log term


@pytest.mark.parametrize(
    ("message", "in_lease", "why"),
    [
        (_ask(5, 10, 3), True, "it hears a leader"),
        (_ask(4, 10, 3), False, "the term asked for is not later than its own"),
        (_ask(5, 9, 3), False, "the asker's log is shorter in the same term"),
        (_ask(5, 50, 2), False, "the asker's log ends in an earlier term"),
    ],
)
def test_refused(message: dict[str, object], in_lease: bool, why: str) -> None:
    assert pre_vote.grants(message, 4, 10, 3, in_lease) is False, why


@pytest.mark.parametrize(
    "message",
    [
        {"type": pre_vote.REQUEST},
        {"type": pre_vote.REQUEST, "term": "5", "last_log_index": 1, "last_log_term": 1},
        {"type": pre_vote.REQUEST, "term": 5, "last_log_index": None, "last_log_term": 1},
        {"type": pre_vote.REQUEST, "term": True, "last_log_index": 1, "last_log_term": 1},
    ],
)
def test_a_malformed_request_gets_no_answer(message: dict[str, object]) -> None:
    assert pre_vote.grants(message, 4, 10, 3, in_lease=False) is None


def test_a_round_is_won_with_a_majority_counting_the_asker() -> None:
    rounds = pre_vote.Rounds()
    assert rounds.due(5, now=0.0)
    rounds.start(5, now=0.0)
    retry_at = rounds.retry_at
    assert retry_at == pre_vote.RETRY_SECONDS
    assert not rounds.due(5, now=retry_at / 2)
    assert rounds.due(6, now=0.0)  # another term is another round
    # Five voters: the asker and two peers make three.
    assert not rounds.count(pre_vote.answer(5, True, 4), "b", voters=5)
    assert not rounds.count(pre_vote.answer(5, True, 4), "b", voters=5)  # counted once
    assert not rounds.count(pre_vote.answer(5, False, 4), "c", voters=5)
    assert not rounds.count(pre_vote.answer(4, True, 4), "d", voters=5)  # an older round
    assert not rounds.won(5)
    assert rounds.count(pre_vote.answer(5, True, 4), "e", voters=5)
    assert rounds.won(5) and not rounds.won(6)
    assert not rounds.count(pre_vote.answer(5, True, 4), "d", voters=5)  # already won
    rounds.clear()
    assert not rounds.won(5) and rounds.due(5, now=0.0)


def test_answers_before_any_round_or_to_an_earlier_round_count_for_nothing() -> None:
    rounds = pre_vote.Rounds()
    assert not rounds.count(pre_vote.answer(5, True, 4), "b", voters=3)
    rounds.start(5, now=0.0)
    assert not rounds.count(pre_vote.answer(5, True, 4), "b", voters=5)
    rounds.start(5, now=1.0)  # asked again: the yeses of the earlier round are forgotten
    assert not rounds.count(pre_vote.answer(5, True, 4), "c", voters=5)
    assert rounds.count(pre_vote.answer(5, True, 4), "d", voters=5)
