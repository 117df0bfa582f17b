"""raftchan: named, append-only, totally ordered channels kept by a Raft group.

``raftchan.Client`` is the blocking API, ``raftchan.AsyncClient`` the asyncio one; every
error raftchan raises derives from ``raftchan.RaftchanError``.
"""

from __future__ import annotations

from raftchan.client import AsyncChannel, AsyncClient, RetryPolicy
from raftchan.codec import ItemCodec
from raftchan.errors import (
    ChannelNotFound,
    ChannelStopped,
    Closed,
    CommitUnknown,
    ConfigError,
    DaskUnavailable,
    FutureLost,
    ItemNotEncodable,
    LimitExceeded,
    MemberExists,
    MemberNotFound,
    MembershipChangeInProgress,
    MembershipError,
    NodeNotTrusted,
    NoLeader,
    NotLeader,
    ProtocolError,
    RaftchanError,
    RequestInvalid,
    Timeout,
    TrimmedGap,
    Unauthorized,
)
from raftchan.sync import Channel, Client

__version__ = "0.1.0"

__all__ = [
    "AsyncChannel",
    "AsyncClient",
    "Channel",
    "ChannelNotFound",
    "ChannelStopped",
    "Client",
    "Closed",
    "CommitUnknown",
    "ConfigError",
    "DaskUnavailable",
    "FutureLost",
    "ItemCodec",
    "ItemNotEncodable",
    "LimitExceeded",
    "MemberExists",
    "MemberNotFound",
    "MembershipChangeInProgress",
    "MembershipError",
    "NodeNotTrusted",
    "NoLeader",
    "NotLeader",
    "ProtocolError",
    "RaftchanError",
    "RequestInvalid",
    "RetryPolicy",
    "Timeout",
    "TrimmedGap",
    "Unauthorized",
    "__version__",
]
