"""The benchmark harness's batching appender and windowed throughput loop, with a fake
system in place of a server."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from benchmarks.core import PROFILES, BatchingAppender, throughput


class FakeSystem:
    """Records every batch it is given; each takes ``delay`` seconds to acknowledge."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[bytes]] = []
        self.delay = delay
        self.fail = fail

    async def publish(self, items: list[bytes]) -> None:
        self.batches.append(items)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("WAIT 1: only 0 replicas acknowledged")


def test_items_handed_over_together_go_out_in_batches_of_at_most_max_items() -> None:
    fake = FakeSystem()

    async def main() -> None:
        append = BatchingAppender(fake.publish, 100)
        await asyncio.gather(*(append(bytes([i % 256])) for i in range(250)))

    asyncio.run(main())
    assert [len(b) for b in fake.batches] == [100, 100, 50]
    assert [item for b in fake.batches for item in b] == [bytes([i % 256]) for i in range(250)]


def test_an_item_awaited_alone_goes_out_alone() -> None:
    fake = FakeSystem()

    async def main() -> None:
        append = BatchingAppender(fake.publish, 100)
        for i in range(3):
            await append(bytes([i]))

    asyncio.run(main())
    assert fake.batches == [[b"\x00"], [b"\x01"], [b"\x02"]]


def test_an_item_is_acknowledged_only_when_its_batch_is() -> None:
    fake = FakeSystem(delay=0.05)

    async def main() -> None:
        append = BatchingAppender(fake.publish, 2)
        first, second, third = append(b"a"), append(b"b"), append(b"c")
        await asyncio.sleep(0.01)
        assert not (first.done() or second.done() or third.done())
        await asyncio.gather(first, second, third)

    asyncio.run(main())
    assert fake.batches == [[b"a", b"b"], [b"c"]]


def test_a_failed_batch_fails_each_of_its_items() -> None:
    fake = FakeSystem(fail=True)

    async def main() -> list[object]:
        append = BatchingAppender(fake.publish, 100)
        return await asyncio.gather(*(append(b"x") for _ in range(3)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert len(fake.batches) == 1
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def test_max_items_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BatchingAppender(FakeSystem().publish, 0)


def test_windowed_throughput_counts_every_item_once_at_its_batch_latency() -> None:
    fake = FakeSystem(delay=0.01)
    cfg = dataclasses.replace(PROFILES["quick"], throughput_s=30.0, throughput_max_items=1_000)

    async def main() -> dict[str, Any]:
        appenders = [BatchingAppender(fake.publish, 100) for _ in range(2)]
        return await throughput(list(appenders), cfg, 16, window=100)

    figures = asyncio.run(main())
    sizes = [len(b) for b in fake.batches]
    # Warm-up: 5 appends one at a time per producer; then 500 items each in rounds of 100.
    assert sizes == [1] * 10 + [100] * 10
    assert figures["items"] == 1_000 and figures["window"] == 100
    # Every item waited for its batch's acknowledgement (10 ms), none much longer.
    assert 10.0 <= figures["p50_ms"] < 100.0
