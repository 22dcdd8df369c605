"""Decode scheduling: a few worker threads shared by every session. The only module that starts threads.

A session that wants a decode says so (`DecodeJob.decode_need`); whenever that may have changed, and
whenever a decode ends, `kick()` starts waiting decodes on free workers at once: finals before partials,
then the session that has waited longest. A final here is any decode a final waits for: the whole decode of an
utterance, or one through audio it skipped. With two workers or more, a partial (for display) starts only where
it leaves a worker free: the next final starts at once, and on a 2-core box it does not share the CPU with
another partial, so it is still out by the end of the request when several people speak at once. Partials come
less often then, and cost less CPU. Once no decode has run for IDLE_RELEASE_S, the model gives the memory its
decodes freed back to the system, on a decode thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol, TypeVar

from .metrics import Metrics
from .session import DecodeRequest
from .transcript import Transcriber, Transcript

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
# A failing model fails every decode: after the first traceback, one summary line per interval.
_FAILURE_LOG_INTERVAL_S = 60.0
# Once no decode has run for this long, the memory the decodes freed goes back to the system, so a service waiting
# for the next command holds only what it uses. Decoding seldom pauses this long within a conversation, so its next
# decodes do not pay for memory handed back and faulted in again.
IDLE_RELEASE_S = 1.0


class DecodeNeed(NamedTuple):
    """Why and since when a session waits for a decode."""

    final: bool
    since: float

    def order(self) -> tuple[bool, float]:
        """Sort key: finals first, then the longest wait."""
        return (not self.final, self.since)


class DecodeJob(Protocol):
    """What the scheduler asks of a session."""

    def decode_need(self) -> DecodeNeed | None:
        """Whether a decode would bring something new now (None: it would not)."""

    def begin_decode(self) -> DecodeRequest:
        """The window to decode now; the session counts it as in flight."""

    def end_decode(self, request: DecodeRequest, transcript: Transcript | None) -> None:
        """The decode of `request` ended; `transcript` is None when the model raised."""

    def abort(self, reason: str) -> None:
        """The session broke (a bug): tell its client and close it."""


class DecodeScheduler:
    """Runs decodes of many sessions on `workers` threads, never more than one per session at a time."""

    def __init__(
        self,
        workers: int,
        jobs: Callable[[], Iterable[DecodeJob]],
        metrics: Metrics,
        idle_release_s: float = IDLE_RELEASE_S,
    ) -> None:
        self.workers = workers
        self._jobs = jobs
        self._metrics = metrics
        self._idle_release_s = idle_release_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._transcriber: Transcriber | None = None
        # Running decodes and when each started, for the watchdog.
        self._running: dict[asyncio.Task[None], float] = {}
        self._release_timer: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Task[None] | None = None
        # Partials start only while fewer decodes than this run: with two workers or more, one stays free for finals.
        self._partial_workers = max(1, workers - 1)
        self.decodes = 0
        self.last_decode_at: float | None = None
        # Decodes that raised since the last one that did not, and the newest error.
        self.failures_in_a_row = 0
        self.last_failure = ""
        self._failure_logged_at = 0.0

    async def run_blocking(self, function: Callable[[], _T]) -> _T:
        """Run blocking work (loading the model) on a decode thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    @property
    def running(self) -> bool:
        """Decodes are being scheduled."""
        return self._transcriber is not None

    def start(self, transcriber: Transcriber) -> None:
        """Schedule decodes on `transcriber` from now on."""
        self._transcriber = transcriber
        self.kick()
        self._release_when_idle()

    def waiting(self) -> int:
        """How many sessions wait for a decode."""
        return sum(1 for job in self._jobs() if job.decode_need() is not None)

    def stalled(self, stall_s: float) -> bool:
        """A decode has been running for longer than `stall_s`."""
        now = time.monotonic()
        return any(now - started >= stall_s for started in self._running.values())

    def kick(self) -> None:
        """Start waiting decodes while a worker is free; call it whenever a session may want one."""
        if self._transcriber is None:
            return
        while len(self._running) < self.workers and (job := self._next()) is not None:
            try:
                request = job.begin_decode()
            except Exception:  # a bug in one session must not stop everyone's decodes
                _LOGGER.exception("A session could not build its decode request")
                job.abort("the session failed; see the server log")
                continue
            task = asyncio.create_task(self._decode(self._transcriber, job, request))
            self._running[task] = time.monotonic()
            task.add_done_callback(self._decode_ended)

    async def stop(self) -> None:
        """Stop scheduling, let running decodes end and stop the threads."""
        self._transcriber = None
        if self._release_timer is not None:
            self._release_timer.cancel()
        releasing = [self._releasing] if self._releasing is not None else []
        await asyncio.gather(*self._running, *releasing, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, True)

    def _next(self) -> DecodeJob | None:
        needs = [(need, job) for job in self._jobs() if (need := job.decode_need()) is not None]
        self._metrics.decode_queue.set(len(needs))
        if len(self._running) >= self._partial_workers:
            needs = [(need, job) for need, job in needs if need.final]
        if not needs:
            return None
        return min(needs, key=lambda pair: pair[0].order())[1]

    def _failed(self, err: Exception) -> None:
        """Count a failed decode; log the first of a run in full, then a summary at most once a minute."""
        self.failures_in_a_row += 1
        self.last_failure = f"{type(err).__name__}: {err}"
        self._metrics.decode_failures_total.inc()
        now = time.monotonic()
        if self.failures_in_a_row == 1:
            _LOGGER.error("Decode failed", exc_info=err)
        elif now - self._failure_logged_at >= _FAILURE_LOG_INTERVAL_S:
            _LOGGER.error("%d decodes failed in a row, the newest: %s", self.failures_in_a_row, self.last_failure)
        else:
            return
        self._failure_logged_at = now

    def _decode_ended(self, task: asyncio.Task[None]) -> None:
        # The worker is free: the next waiting decode starts now, not when the next audio arrives.
        self._running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("Decode bookkeeping failed: %r", task.exception())
        self.kick()
        self._release_when_idle()

    def _release_when_idle(self) -> None:
        """Give the decodes' freed memory back IDLE_RELEASE_S after the last decode, if none has started since."""
        if self._running or self._transcriber is None:
            return
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._release_timer = asyncio.get_running_loop().call_later(self._idle_release_s, self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._release_timer = None
        if self._running or self._transcriber is None:
            return  # the running decode's end arms the timer again
        self._releasing = asyncio.create_task(self._release_memory(self._transcriber))

    async def _release_memory(self, transcriber: Transcriber) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, transcriber.release_memory)
        except Exception:  # memory stays with the process; decoding goes on
            _LOGGER.exception("Could not give the decoders' free memory back")

    async def _decode(self, transcriber: Transcriber, job: DecodeJob, request: DecodeRequest) -> None:
        loop = asyncio.get_running_loop()
        transcript: Transcript | None = None
        try:
            transcript = await loop.run_in_executor(
                self._executor,
                functools.partial(
                    transcriber.decode,
                    request.audio,
                    request.prompt,
                    request.language,
                    whole=request.final,
                    names=request.names,
                    judge_end=request.judge_end,
                ),
            )
        except Exception as err:
            self._failed(err)
        self.last_decode_at = time.monotonic()
        self.decodes += 1
        if transcript is not None:
            self.failures_in_a_row = 0
            kind = "final" if request.final else "partial"
            self._metrics.decode_seconds.labels(kind).observe(transcript.asr_ms / 1000)
        try:
            job.end_decode(request, transcript)
        except Exception:
            _LOGGER.exception("A session could not take its decode")
            job.abort("the session failed; see the server log")
