"""The exception tree of raftchan.

Every error raftchan raises derives from :class:`RaftchanError`. The families are split by
*what the caller may conclude*, not by where the error was noticed:

- :class:`NotLeader`, :class:`NoLeader`: the request was not executed; it is safe to retry
  elsewhere or later. The client library does that by itself within its deadline.
- :class:`CommitUnknown`: the request may or may not have been applied. Appends carry a
  session id and sequence number, so re-sending them is safe; anything else must be checked.
- :class:`Timeout`: the deadline passed. For appends this is an unknown outcome, like
  :class:`CommitUnknown` (and is a subclass of it).
- :class:`ProtocolError`: the peer sent bytes raftchan cannot understand; the connection is
  dropped. :class:`RequestInvalid` (a subclass): a well-formed frame asked for something
  invalid; nothing was changed and the connection stays usable.
- :class:`Closed`: you closed this client or channel yourself.
- :class:`Unauthorized`: the node refused this client's token; nothing was done. The
  client does not retry it: the same token would be refused again.
  :class:`NodeNotTrusted`: the node's TLS certificate did not verify; nothing was sent.
- :class:`ChannelStopped`, :class:`ChannelNotFound`, :class:`LimitExceeded`,
  :class:`ItemNotEncodable`, :class:`TrimmedGap`: the request was refused by the channel's
  rules; nothing stored was changed.
- :class:`MembershipError` and its subclasses: a membership change was refused; the
  cluster's membership did not change.
- :class:`ConfigError` (also a ``ValueError``): a client or node was given settings that
  cannot work (a malformed or missing address, say); nothing was sent.

Each error that travels over the wire has a stable ``code`` string (see
:data:`ERROR_CODES`), so nodes and clients of different versions agree on meaning.
"""

from __future__ import annotations

from typing import Any


class RaftchanError(Exception):
    """Root of every raftchan error."""

    code = "error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The fields an error response carries on the wire."""
        return {"code": self.code, "message": str(self), "details": self.details}


class NotLeader(RaftchanError):
    """This node is not the leader; the request was not executed.

    ``leader`` is the leader's client address when the node knows it, else ``None``.
    """

    code = "not_leader"

    def __init__(self, message: str = "", leader: str | None = None, **details: Any) -> None:
        super().__init__(message or "this node is not the leader", leader=leader, **details)
        self.leader = leader


class NoLeader(RaftchanError):
    """No node could be found that leads a quorum; nothing was executed."""

    code = "no_leader"


class CommitUnknown(RaftchanError):
    """The request may or may not have been applied (leader changed, connection lost)."""

    code = "commit_unknown"


class Timeout(CommitUnknown):
    """The operation's deadline passed before it was confirmed; its outcome is unknown."""

    code = "timeout"


class ProtocolError(RaftchanError):
    """The peer broke the wire protocol (bad frame, wrong version); the connection is closed."""

    code = "protocol_error"


class RequestInvalid(ProtocolError):
    """A well-formed request asked for something invalid (unknown type, wrong field type).

    Nothing was changed; the connection remains usable.
    """

    code = "invalid_request"


class Closed(RaftchanError):
    """The client or channel was closed by its owner; no further requests are accepted."""

    code = "closed"


class ChannelStopped(RaftchanError):
    """The channel was stopped; it accepts no more appends. Stored items stay readable."""

    code = "channel_stopped"


class ChannelNotFound(RaftchanError):
    """The channel does not exist (it was never opened, or it was deleted)."""

    code = "channel_not_found"


class LimitExceeded(RaftchanError):
    """A documented limit was broken (item, frame, channel or session count).

    ``details`` names the limit and the offending size. Nothing stored was changed.
    """

    code = "limit_exceeded"


class ItemNotEncodable(RaftchanError):
    """An item could not be encoded with msgpack (nor as a Dask future); nothing was sent."""

    code = "item_not_encodable"


class TrimmedGap(RaftchanError):
    """A reader fell behind the trimmed head of a ``maxlen`` channel.

    ``details['requested']`` is the index the reader needed and ``details['first']`` the
    oldest index still retained; the items in between are gone. Iterations raise this rather
    than skip silently.
    """

    code = "trimmed_gap"


class FutureLost(RaftchanError):
    """A Dask future in a channel is unknown to the Dask scheduler; its result is gone.

    Raised by ``Future.result()`` of a future read from a channel (``details['key']``), and
    by ``flush`` when the leader found a just-appended key unknown (``details['keys']``; the
    items are stored all the same, marked lost). Waiting will not bring the data back; the
    task must be submitted again.
    """

    code = "future_lost"


class DaskUnavailable(CommitUnknown):
    """The leader could not confirm a future's pin with its Dask scheduler in time.

    The append may already be stored; re-sending it is safe (it is de-duplicated), and the
    client does so until its deadline, after which ``flush`` raises :class:`Timeout`.
    """

    code = "dask_unavailable"


class Unauthorized(RaftchanError):
    """The node requires a token and this client gave none or a wrong one.

    Refused at the handshake, before any request: nothing was read or changed. Give the
    client a token the node's token file lists (``token=`` or ``$RAFTCHAN_TOKEN``).
    """

    code = "unauthorized"


class NodeNotTrusted(RaftchanError):
    """The node's TLS certificate did not verify against the client's trusted CAs, or
    does not name the address dialled; the client sent nothing to it."""

    code = "node_not_trusted"


class MembershipError(RaftchanError):
    """A membership change (``raftchan member add/remove``) was refused; nothing changed."""

    code = "membership_refused"


class MemberExists(MembershipError):
    """The Raft address to add is already a member of the cluster; nothing changed."""

    code = "member_exists"


class MemberNotFound(MembershipError):
    """The Raft address to remove is not a member of the cluster; nothing changed."""

    code = "member_not_found"


class MembershipChangeInProgress(MembershipError):
    """An earlier membership change is not committed yet (or a new leader has not yet
    committed an entry of its own term); nothing changed. Retry once it has settled: Raft
    changes membership safely only one node at a time."""

    code = "membership_change_in_progress"


class ConfigError(RaftchanError, ValueError):
    """A node or client was configured in a way that cannot work; the message says why.

    Raised before anything is sent (a client) or bound (a node); never sent over the wire.
    """

    code = "config_error"


ERROR_CODES: dict[str, type[RaftchanError]] = {
    cls.code: cls
    for cls in (
        RaftchanError,
        NotLeader,
        NoLeader,
        CommitUnknown,
        Timeout,
        ProtocolError,
        RequestInvalid,
        Closed,
        ChannelStopped,
        ChannelNotFound,
        LimitExceeded,
        ItemNotEncodable,
        TrimmedGap,
        FutureLost,
        DaskUnavailable,
        Unauthorized,
        NodeNotTrusted,
        MembershipError,
        MemberExists,
        MemberNotFound,
        MembershipChangeInProgress,
    )
}


def error_from_wire(code: str, message: str, details: dict[str, Any] | None) -> RaftchanError:
    """Rebuild the exception a node reported; unknown codes become a plain RaftchanError."""
    cls = ERROR_CODES.get(code, RaftchanError)
    details = dict(details or {})
    if cls is NotLeader:
        leader = details.pop("leader", None)
        return NotLeader(message, leader=leader if isinstance(leader, str) else None, **details)
    return cls(message, **details)
