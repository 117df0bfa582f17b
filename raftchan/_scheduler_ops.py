"""Functions the keeper runs on the Dask scheduler (``Client.run_on_scheduler``).

They are pickled by value, so the scheduler does not need raftchan installed: keep this
module free of raftchan imports. Each takes ``groups``: scheduler-side pseudo-client
name -> list of Dask keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def pin(
    groups: dict[str, list[Any]], wait: float, dask_scheduler: Any = None
) -> dict[str, list[Any]]:
    """Make each name desire its keys; return, per name, the keys the scheduler does not know.

    A key not known yet is waited for up to ``wait`` seconds: a writer's submission can
    still be on its way when the leader confirms (the writer holds its future meanwhile).
    ``client_desires_keys`` ignores unknown keys with only a warning, hence the check.
    """
    tasks = dask_scheduler.tasks
    deadline = time.monotonic() + wait
    while True:
        missing = {name: [k for k in keys if k not in tasks] for name, keys in groups.items()}
        if not any(missing.values()) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.01)
    for name, keys in groups.items():
        gone = set(missing[name])
        present = [k for k in keys if k not in gone]
        if present:
            dask_scheduler.client_desires_keys(keys=present, client=name)
    return {name: keys for name, keys in missing.items() if keys}


def release(groups: dict[str, list[Any]], dask_scheduler: Any = None) -> int:
    """Make each name stop desiring its keys; return how many keys were released.

    Names the scheduler does not know are skipped: ``client_releases_keys`` raises
    KeyError for them, and that error would close the keeper's connection.
    """
    released = 0
    for name, keys in groups.items():
        client_state = dask_scheduler.clients.get(name)
        if client_state is None:
            continue
        wanted = [
            k
            for k in keys
            if k in dask_scheduler.tasks and dask_scheduler.tasks[k] in client_state.wants_what
        ]
        if wanted:
            dask_scheduler.client_releases_keys(keys=wanted, client=name)
            released += len(wanted)
    return released


def wanted(names: list[str], dask_scheduler: Any = None) -> dict[str, list[Any]]:
    """For each name the scheduler knows, the keys it desires."""
    result = {}
    for name in names:
        client_state = dask_scheduler.clients.get(name)
        if client_state is not None and client_state.wants_what:
            result[name] = [ts.key for ts in client_state.wants_what]
    return result
