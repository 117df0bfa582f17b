"""Benchmarks of raftchan against the systems a user would pick instead.

``python -m benchmarks run --quick`` runs every system in one go; see ``README.md``.
"""
