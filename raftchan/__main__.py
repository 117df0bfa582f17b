"""``python -m raftchan``: the same command as the ``raftchan`` console script."""

from __future__ import annotations

from raftchan.cli import main

if __name__ == "__main__":
    main()
