"""The bench's own failure: what stops it before it can report."""

from __future__ import annotations


class BenchError(Exception):
    """A problem that stops the bench: bad corpus, unreachable server, bad flags."""
