"""The writing client of the multi-host test, a program of its own so that it can run in a
network namespace of its own (``ip netns exec NS python ns_client.py ...``).

    python ns_client.py ADDRESSES CHANNEL [--batch N] [--max-seconds S] [--max-items N]

Appends numbered items (0, 1, 2, ...) to CHANNEL through ``raftchan.Client``, ``--batch``
at a time, flushing after each batch, and prints one JSON line per returned flush:
``{"acked": N}`` (items 0 .. N-1 are acknowledged). A line ``stop`` on standard input, or
its end, makes it finish: it flushes what it appended, reads the channel back through
the client (a linearizable read), prints ``{"done": N, "data": [...]}`` and exits 0.
Reaching ``--max-seconds`` or ``--max-items`` finishes it the same way. Any error prints
``{"error": "..."}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import raftchan

#: How long one flush may retry (across reconnects and leader changes) before failing.
FLUSH_TIMEOUT = 60.0
#: Bounds each answer, far beyond the test's own bounds: a leader cut off mid-request
#: stays silent, and the client must leave it by pinging the quiet connection (after
#: RetryPolicy.probe_after, unanswered for probe_timeout), not by this timeout.
ATTEMPT_TIMEOUT = 300.0
#: Breathing room between flushes for the nodes on a small machine.
PAUSE = 0.01


def emit(message: dict[str, object]) -> None:
    """One JSON line on standard output, flushed at once: the test reads it live."""
    print(json.dumps(message), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addresses")
    parser.add_argument("channel")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--max-items", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    halt = threading.Event()

    def watch_stdin() -> None:
        # Any line starting with "stop", or the end of input, asks for the finish.
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        halt.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    deadline = time.monotonic() + args.max_seconds
    retry = raftchan.RetryPolicy(timeout=FLUSH_TIMEOUT, attempt_timeout=ATTEMPT_TIMEOUT)
    appended = 0
    try:
        with raftchan.Client(args.addresses, retry=retry) as client:
            chan = client.channel(args.channel)
            while not halt.is_set() and appended < args.max_items and time.monotonic() < deadline:
                chan.extend(range(appended, appended + args.batch))
                appended += args.batch
                chan.flush()
                emit({"acked": appended})
                halt.wait(PAUSE)
            chan.flush()
            emit({"done": appended, "data": list(chan.data)})
    except Exception as exc:  # reported to the test, which fails with it
        emit({"error": f"{exc!r} after {appended} appended"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
