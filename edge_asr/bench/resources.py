"""What the measured process uses while the corpus is replayed: CPU time, peak RSS, idle CPU afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil

from .scoring import ratio

RSS_INTERVAL_S = 0.1
IDLE_SECONDS = 3.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class Resources:
    """What the measured process used; None where it could not be measured."""

    cpu_s_per_audio_s: float | None
    peak_rss_mb: float | None
    start_to_ready_s: float | None
    idle_cpu_percent: float | None


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time (user + system) the process has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


class _Usage:
    """CPU time and peak RSS of one process from now until `stop`; RSS sampled every 100 ms."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self.peak_rss = 0
        self._cpu_start = cpu_seconds(process)
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            await asyncio.sleep(RSS_INTERVAL_S)

    async def stop(self) -> float:
        """Stop sampling; return the CPU seconds used since the start."""
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        return cpu_seconds(self._process) - self._cpu_start


async def _idle_cpu_percent(process: psutil.Process) -> float:
    """CPU use of the process over IDLE_SECONDS, in % of one core."""
    cpu, started = cpu_seconds(process), time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    return 100 * (cpu_seconds(process) - cpu) / (time.monotonic() - started)


async def measure(
    process: psutil.Process, work: Callable[[], Awaitable[_T]], audio_s: float, start_to_ready_s: float | None = None
) -> tuple[_T, Resources]:
    """Run `work` while measuring the process, then its idle CPU; psutil.Error when the process is gone."""
    usage = _Usage(process)
    result = await work()
    cpu = await usage.stop()
    idle = await _idle_cpu_percent(process)
    return result, Resources(ratio(cpu, audio_s), usage.peak_rss / 2**20, start_to_ready_s, idle)
