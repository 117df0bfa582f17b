"""Pre-vote: a node asks whether it could win an election before it stands in one.

pysyncobj has a node stand as soon as its election deadline passes: it raises its term and
asks for votes. A node that stood where no one could hear it (cut off from its peers, or
restarted before its leader reached it) came back with a higher term, and the leader that
saw that term stepped down: a live cluster held an election, and its clients a failover,
for nothing. With pre-vote (Raft thesis, section 9.6) a node whose deadline passed first
asks its peers whether they would vote for it in the next term. A peer says yes only if
it has not heard from a leader within the lease (the shortest election timeout) and the
asker's log is at least as up to date as its own. Asking changes nothing on either side;
the node stands, as pysyncobj does, only once a majority (itself included) said yes.

The requests and answers are pysyncobj peer messages of two types of their own. Nodes of
earlier versions ignore them: a node of this version stands only with the answers of a
majority of this version, so a cluster is upgraded with a majority of old nodes first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ANSWER", "REQUEST", "RETRY_SECONDS", "Rounds", "answer", "grants", "request"]

REQUEST = "raftchan_pre_vote"
ANSWER = "raftchan_pre_vote_answer"

#: How long a round waits for answers before the node asks again. Short beside the
#: election timeout: a failover waits for a round to be won.
RETRY_SECONDS = 0.05


def request(term: int, last_log_index: int, last_log_term: int) -> dict[str, Any]:
    """The message asking for a pre-vote for ``term`` (the asker's current term + 1)."""
    return {
        "type": REQUEST,
        "term": term,
        "last_log_index": last_log_index,
        "last_log_term": last_log_term,
    }


def grants(
    message: Any, current_term: int, last_log_index: int, last_log_term: int, in_lease: bool
) -> bool | None:
    """Whether a node answers the pre-vote request ``message`` with yes; None when the
    message is not a well-formed request (it is then not answered at all).

    Yes only for a term above ``current_term``, from a node whose log is at least as up to
    date (Raft's voting rule), and while this node is not ``in_lease``: it neither leads
    nor heard from its leader within the shortest election timeout.
    """
    fields = [message.get(k) for k in ("term", "last_log_index", "last_log_term")]
    if not all(type(f) is int for f in fields):
        return None
    term, index, log_term = fields
    up_to_date = (log_term, index) >= (last_log_term, last_log_index)
    return term > current_term and up_to_date and not in_lease


def answer(term: int, granted: bool, current_term: int) -> dict[str, Any]:
    """The answer to a request for ``term``; it carries the answering node's own term, so
    that an asker whose term is behind can catch up."""
    return {"type": ANSWER, "term": term, "granted": granted, "current_term": current_term}


class Rounds:
    """The pre-vote rounds of one node: which term it asks for, who said yes, when to ask
    again. Used from pysyncobj's thread only."""

    def __init__(self) -> None:
        self.term: int | None = None
        self._granted: set[str] = set()
        self._retry_at = 0.0
        self._won = False

    def won(self, term: int) -> bool:
        """Whether the round for ``term`` has a majority."""
        return self._won and self.term == term

    def due(self, term: int, now: float) -> bool:
        """Whether to ask (again) for ``term``: no round for it yet, or its time is up."""
        return self.term != term or now >= self._retry_at

    def start(self, term: int, now: float) -> None:
        """Start a round for ``term``, to be asked again at :attr:`retry_at`."""
        self.term = term
        self._granted = set()
        self._won = False
        self._retry_at = now + RETRY_SECONDS

    @property
    def retry_at(self) -> float:
        """When to ask again if the round is not won."""
        return self._retry_at

    def count(self, message: Any, node_id: str, voters: int) -> bool:
        """Count one answer; True when it is the one that gives the round its majority of
        ``voters`` (the asker's own yes included)."""
        if self.term is None or message.get("term") != self.term or self._won:
            return False
        if message.get("granted") is not True:
            return False
        self._granted.add(node_id)
        self._won = 1 + len(self._granted) > voters / 2
        return self._won

    def clear(self) -> None:
        """Forget the round (the node stood, or heard from a leader: on every message
        from the leader, so with no round under way it does nothing)."""
        if self.term is None:
            return
        self.term = None
        self._granted = set()
        self._won = False
