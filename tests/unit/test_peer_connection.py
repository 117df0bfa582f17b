"""The framing of Raft peer messages: stored zlib streams any node can read."""

from __future__ import annotations

import os
import zlib

import pysyncobj.pickle
import pytest

from raftchan.peer_connection import stored_zlib


@pytest.mark.parametrize("size", [0, 1, 300, 65_535, 65_536, 200_000])
def test_a_stored_stream_is_what_zlib_decompress_reads(size: int) -> None:
    data = os.urandom(size)
    assert zlib.decompress(stored_zlib(data)) == data


def test_a_message_is_stored_not_compressed() -> None:
    # Highly compressible on purpose: a compressing framing would shrink it.
    message = {"type": "append_entries", "entries": [(b"x" * 10_000, 7, 2)]}
    data = pysyncobj.pickle.dumps(message)
    framed = stored_zlib(data)
    assert len(data) < len(framed) < len(data) + 64
    assert pysyncobj.pickle.loads(zlib.decompress(framed)) == message
