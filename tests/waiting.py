"""Waiting in tests: the package's one polling helper (`eventually`, `until`), and a fake engine's component state
to wait for."""

from __future__ import annotations

from edge_asr.bench.waiting import eventually, until

from .fakes import FakeEngine

__all__ = ["eventually", "state", "until"]


def state(engine: FakeEngine, component: str = "mqtt") -> str:
    """A component's state as the fake engine's /health would show it ("" before any)."""
    found = engine.components.get(component)
    return found.state if found is not None else ""
