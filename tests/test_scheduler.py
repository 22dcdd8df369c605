"""Decode scheduling against a gated fake model: a freed worker starts the next waiting decode at once,
finals go first, partials leave a worker to finals, a broken session does not stop the others. One and two
workers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest

from edge_asr.api import SessionRequest
from edge_asr.config import build_settings
from edge_asr.engine import Engine
from edge_asr.metrics import Metrics
from edge_asr.scheduler import DecodeNeed, DecodeScheduler
from edge_asr.session import DecodeRequest
from edge_asr.transcript import Transcript
from edge_asr.vocabulary import NamesInPrompt

from .fakes import GatedTranscriber
from .speech import read_pcm, silence
from .waiting import eventually

pytestmark = pytest.mark.fast

# Hang detector, not a speed target: a decode that should start "at once" starts within milliseconds.
HANG_S = 5.0


@dataclass
class FakeJob:
    """A session as the scheduler sees it: wants one decode, named by its prompt."""

    name: str
    final: bool = False
    since: float = 0.0
    wants: bool = True
    broken: bool = False
    results: list[Transcript | None] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    def decode_need(self) -> DecodeNeed | None:
        return DecodeNeed(self.final, self.since) if self.wants and not self.aborted else None

    def begin_decode(self) -> DecodeRequest:
        if self.broken:
            raise RuntimeError("a bug in this session")
        self.wants = False
        return DecodeRequest(
            audio=np.zeros(1600, dtype=np.float32),
            start_s=0.0,
            end_s=0.1,
            prompt=self.name,
            language="en",
            final=self.final,
            newest_arrival=0.0,
            utterance_start_s=0.0,
        )

    def end_decode(self, request: DecodeRequest, transcript: Transcript | None) -> None:
        self.results.append(transcript)

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)


class ReleaseRecorder(GatedTranscriber):
    """Also records, at each release of memory, how many decodes were running."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = 0
        self.running_at_release: list[int] = []

    def decode(
        self,
        audio: np.typing.NDArray[np.float32],
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Transcript:
        try:
            return super().decode(audio, prompt, language, whole, names, judge_end)
        finally:
            self.ended += 1

    def release_memory(self) -> None:
        self.running_at_release.append(len(self.started) - self.ended)
        super().release_memory()


async def _idle_period_passed(idle_release_s: float) -> None:
    """Wait until a scheduler with nothing to decode, started now, gives memory back after `idle_release_s`: proof
    that a release timer armed before now with that delay has fired, however slow the machine."""
    witness = GatedTranscriber()
    scheduler = DecodeScheduler(1, list, Metrics(), idle_release_s=idle_release_s)
    scheduler.start(witness)
    try:
        await eventually(lambda: bool(witness.released_on), HANG_S, "the witness scheduler's release")
    finally:
        await scheduler.stop()


def _started_count(model: GatedTranscriber, count: int) -> bool:
    return len(model.started) == count


def _scheduler(workers: int, jobs: list[FakeJob], model: GatedTranscriber) -> DecodeScheduler:
    scheduler = DecodeScheduler(workers, lambda: jobs, Metrics())
    scheduler.start(model)
    return scheduler


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_freed_worker_starts_the_waiting_decode_without_another_kick(workers: int) -> None:
    model = GatedTranscriber()
    busy = [FakeJob(f"busy{index}", final=True) for index in range(workers)]
    jobs = list(busy)
    scheduler = _scheduler(workers, jobs, model)
    try:
        await eventually(lambda: len(model.started) == workers, HANG_S, "every worker to be busy")
        late = FakeJob("late", final=True)
        jobs.append(late)
        scheduler.kick()  # what a session does when it starts waiting: every worker is busy, so nothing starts
        # kick() begins a decode before it returns: one not begun now waits for a worker.
        assert scheduler.waiting() == 1

        model.open("busy0")

        await eventually(lambda: "late" in model.started, HANG_S, "the freed worker to take the waiting decode")
        model.open("late")
        await eventually(lambda: bool(late.results), HANG_S, "the late decode to end")
    finally:
        for job in jobs:
            model.open(job.name)
        await scheduler.stop()


async def test_finals_go_before_partials_and_the_longest_wait_first() -> None:
    model = GatedTranscriber()
    jobs = [FakeJob("running")]
    scheduler = _scheduler(1, jobs, model)
    try:
        await eventually(lambda: model.started == ["running"], HANG_S, "the first decode")
        jobs += [
            FakeJob("newer partial", since=2.0),
            FakeJob("older partial", since=1.0),
            FakeJob("final", final=True, since=3.0),
        ]
        for count, name in enumerate(("running", "final", "older partial"), start=2):
            model.open(name)
            await eventually(partial(_started_count, model, count), HANG_S, f"decode {count}")
        assert model.started == ["running", "final", "older partial", "newer partial"]
    finally:
        for job in jobs:
            model.open(job.name)
        await scheduler.stop()


async def test_with_two_workers_a_partial_starts_only_where_it_leaves_a_worker_free() -> None:
    model = GatedTranscriber()
    jobs = [FakeJob("partial a", since=1.0), FakeJob("partial b", since=2.0)]
    scheduler = _scheduler(2, jobs, model)
    try:
        await eventually(lambda: model.started == ["partial a"], HANG_S, "the first partial")
        scheduler.kick()
        assert scheduler.waiting() == 1, "a second partial would leave no worker for a final"

        jobs.append(FakeJob("final", final=True, since=3.0))
        scheduler.kick()
        await eventually(lambda: "final" in model.started, HANG_S, "the final, on the worker partials left free")
        assert "partial b" not in model.started

        model.open("partial a")
        await eventually(lambda: bool(jobs[0].results), HANG_S, "the first partial to end")
        scheduler.kick()  # as its end does, however the loop ordered the two
        assert scheduler.waiting() == 1, "a partial beside the running final would leave no worker free"

        model.open("final")
        await eventually(lambda: "partial b" in model.started, HANG_S, "the next partial, once the final ended")
    finally:
        for job in jobs:
            model.open(job.name)
        await scheduler.stop()


async def test_a_session_that_cannot_build_its_request_is_aborted_and_the_others_are_served() -> None:
    model = GatedTranscriber()
    broken, healthy = FakeJob("broken", final=True, broken=True), FakeJob("healthy")
    model.open("healthy")
    scheduler = _scheduler(1, [broken, healthy], model)
    try:
        await eventually(lambda: bool(healthy.results), HANG_S, "the healthy session's decode")
        assert broken.aborted
        assert model.started == ["healthy"]
    finally:
        await scheduler.stop()


async def test_a_decode_that_raises_reaches_its_session_as_no_transcript() -> None:
    class Failing(GatedTranscriber):
        def decode(
            self,
            audio: np.typing.NDArray[np.float32],
            prompt: str,
            language: str,
            whole: bool = False,
            names: NamesInPrompt | None = None,
            judge_end: bool = False,
        ) -> Transcript:
            raise RuntimeError("the model broke")

    job = FakeJob("one")
    scheduler = _scheduler(1, [job], Failing())
    try:
        await eventually(lambda: bool(job.results), HANG_S, "the failed decode to be reported")
        assert job.results == [None]
    finally:
        await scheduler.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_audio_stop_while_every_worker_is_busy_still_gets_its_final(workers: int) -> None:
    """The satellite case: its partial decode is running and every other worker has another speaker's final,
    more speech comes, then the end of audio; when its decode ends, the freed worker must take the final
    decode with no more audio."""
    model = GatedTranscriber()
    settings = build_settings({"model": {"threads": 1, "workers": workers}, "stream": {"min_window_s": 0.5}})
    engine = Engine(settings, lambda: model)
    await engine.start()
    speech = silence(0.3) + read_pcm("asterisk_conf-usermenu")
    half = 32000 * 2
    others = [engine.session(SessionRequest("test", prompt=f"other{index}")) for index in range(workers - 1)]
    ending: list[asyncio.Task[object]] = []
    try:
        satellite = engine.session(SessionRequest("test", prompt="satellite"))
        satellite.feed(speech[:half])
        await eventually(lambda: model.started == ["satellite"], HANG_S, "the satellite's partial")
        for other in others:
            other.feed(speech[:half])
            ending.append(asyncio.create_task(other.finish()))
        await eventually(lambda: len(model.started) == workers, HANG_S, "every worker to be busy")
        satellite.feed(speech[half:])
        finishing = asyncio.create_task(satellite.finish())
        decodes_when_finished: list[int] = []
        finishing.add_done_callback(lambda _: decodes_when_finished.append(model.started.count("satellite")))

        model.open("satellite")

        await eventually(lambda: model.started.count("satellite") == 2, HANG_S, "the final decode on the freed worker")
        await asyncio.wait_for(finishing, HANG_S)
        assert decodes_when_finished == [2], "finish() returned before the final decode"
    finally:
        for name in ("satellite", "other0"):
            model.open(name)
        await asyncio.gather(*ending, return_exceptions=True)
        await engine.stop()


async def test_the_freed_memory_goes_back_on_a_decode_thread_once_decoding_pauses_and_not_before() -> None:
    model = ReleaseRecorder()
    jobs = [FakeJob("first")]
    scheduler = DecodeScheduler(2, lambda: jobs, Metrics(), idle_release_s=0.2)
    scheduler.start(model)
    try:
        await eventually(lambda: model.started == ["first"], HANG_S, "the first decode")
        await _idle_period_passed(0.2)  # a release timer armed at the start has fired, with "first" running

        for name in ("second", "third"):  # the next decode starts within the pause: still nothing given back
            jobs.append(FakeJob(name))
            model.open(model.started[-1])
            await asyncio.sleep(0.1)
            scheduler.kick()
            await eventually(partial(list.__contains__, model.started, name), HANG_S, f"the {name} decode")
        assert model.released_on == []

        model.open("third")

        await eventually(lambda: len(model.released_on) == 1, HANG_S, "the memory to be given back")
        assert model.released_on[0].startswith("decode")
        await _idle_period_passed(0.4)  # a timer armed again by the release has fired
    finally:
        for job in jobs:
            model.open(job.name)
        await scheduler.stop()
    # Counted once stop() has let every release started end: one release, while nothing decoded.
    assert model.running_at_release == [0]


async def test_memory_that_cannot_be_given_back_is_logged_and_decoding_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unreleasing(GatedTranscriber):
        def release_memory(self) -> None:
            raise OSError("malloc_trim broke")

    model = Unreleasing()
    jobs = [FakeJob("first")]
    scheduler = DecodeScheduler(1, lambda: jobs, Metrics(), idle_release_s=0.05)
    scheduler.start(model)
    try:
        model.open("first")
        await eventually(lambda: "Could not give" in caplog.text, HANG_S, "the failed release to be logged")
        jobs.append(FakeJob("after"))
        scheduler.kick()
        model.open("after")
        await eventually(lambda: bool(jobs[-1].results), HANG_S, "the next decode to end")
    finally:
        for job in jobs:
            model.open(job.name)
        await scheduler.stop()
