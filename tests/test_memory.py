"""The encoder budget on real threads: decodes at the floor run side by side, a longer one waits for the room and
runs alone, nobody overtakes a decode that waits, and a decode alone is admitted however large."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from edge_asr.memory import EncoderBudget

from .waiting import until

pytestmark = pytest.mark.fast

BUDGET = 3000
FLOOR = 1500
# Hang detector, not a speed target: a thread that should be admitted "at once" is within milliseconds.
HANG_S = 5.0


class Decode(threading.Thread):
    """A decode that holds its frames from admission until the test lets it finish."""

    def __init__(self, budget: EncoderBudget, frames: int) -> None:
        super().__init__(daemon=True)
        self._budget = budget
        self.frames = frames
        self.admitted = threading.Event()
        self.alone: bool | None = None
        self.finish = threading.Event()

    def run(self) -> None:
        with self._budget.admit(self.frames) as alone:
            self.alone = alone
            self.admitted.set()
            self.finish.wait(HANG_S)


def _start(budget: EncoderBudget, frames: int) -> Decode:
    decode = Decode(budget, frames)
    decode.start()
    return decode


def _asked(budget: EncoderBudget, count: int) -> Callable[[], bool]:
    """`count` decodes wait for admission."""
    return lambda: len(budget._waiting) == count


def test_two_decodes_at_the_floor_run_side_by_side() -> None:
    budget = EncoderBudget(BUDGET)
    first, second = _start(budget, FLOOR), _start(budget, FLOOR)
    try:
        assert first.admitted.wait(HANG_S)
        assert second.admitted.wait(HANG_S)
        assert [first.alone, second.alone].count(True) == 1
    finally:
        first.finish.set()
        second.finish.set()


def test_a_longer_decode_waits_for_the_room_runs_alone_and_no_later_decode_overtakes_it() -> None:
    budget = EncoderBudget(BUDGET)
    running = _start(budget, FLOOR)
    assert running.admitted.wait(HANG_S)
    long_decode = _start(budget, 2500)
    until(_asked(budget, 1), HANG_S, "the long decode to ask")
    later = _start(budget, FLOOR)  # would fit beside the running one, but the long decode asked first
    until(_asked(budget, 2), HANG_S, "the later decode to ask")
    try:
        assert not long_decode.admitted.wait(0.1)
        assert not later.admitted.is_set()

        running.finish.set()

        assert long_decode.admitted.wait(HANG_S)
        assert long_decode.alone is True
        assert not later.admitted.wait(0.1)  # 2500 + 1500 frames do not fit

        long_decode.finish.set()

        assert later.admitted.wait(HANG_S)
    finally:
        for decode in (running, long_decode, later):
            decode.finish.set()


def test_a_decode_larger_than_the_budget_is_admitted_when_nothing_else_runs() -> None:
    budget = EncoderBudget(BUDGET)
    huge = _start(budget, BUDGET * 2)
    try:
        assert huge.admitted.wait(HANG_S)
        assert huge.alone is True
    finally:
        huge.finish.set()
    huge.join(HANG_S)
    after = _start(budget, FLOOR)
    try:
        assert after.admitted.wait(HANG_S)  # the frames were given back
    finally:
        after.finish.set()
