"""`edge-asr bench CORPUS --soak MINUTES`: a mix of clients against a real service and broker for a long run, to show
the service does not leak and loses no final.

The soak starts a mosquitto broker (persistent store, free loopback port) and `edge-asr serve` (the repository's
config/edge-asr.yaml or --config, with the bench's --model/--threads/--log-level/--set, then the soak's own
listeners and `mqtt.enabled=true`), waits for /health 200 with MQTT connected, and runs these clients at once,
each kind in lanes that play corpus clips in real time one after the other (LANE_PAUSE_S between clips,
VANISHED_PAUSE_S after a vanishing client) until the time is up:

- 2 Wyoming satellites: one connection and request per clip, as `WyomingTransport` does; the transcript is the final;
- 2 WebSocket speakers: a clip, `end`, read until `done`;
- 1 vanishing WebSocket client: streams a clip to half-way through its speech (on until a partial shows, if none
  has), then drops the TCP connection;
- 1 slow reader: a WebSocket client with a small receive buffer that reads nothing for 3 s, then everything;
- 1 never-reading WebSocket client with a small receive buffer: reads `ready` only, streams a clip then silence
  until the service cuts it off (the next one starts then), or 120 s (a missed target), or the end of the run.

Each lane has its own site (`soak_websocket_1`, ...: `?site=` on the WebSocket, the `transcribe` context on
Wyoming), so the broker's finals can be told apart. At 1/3 and 2/3 of the run the broker is stopped for 3 s
and started again on the same port; the soak's MQTT subscriber (fixed client id, clean_session False, QoS 1)
gets what was published meanwhile once it is back.

Measured: the service's RSS every second (by pid, with psutil), and twice at rest: when the warm-up ends (the
first sixth of the run, at least 30 s) every lane finishes its clip and waits, the service settles and rests
REST_S, its RSS is read and the lanes go on (the run is longer by that rest); at the end, once every client is
gone, the same. The difference of the two readings at rest is the growth, held against `--max-rss-growth-mb`
(default 20 MB for runs under 10 minutes, 5 MB up to 30 minutes, 5 MB per 30 minutes beyond); the peak under load
is reported beside it. Sessions still open
(/health) and event-loop tasks (`edge_asr_event_loop_tasks` in /metrics, when present) once every client is gone
(waiting up to SETTLE_TIMEOUT_S for them to settle), against the tasks before the first client. Finals: what the
clients got, what the broker delivered (matched as `soak_report.account` says) and the service's own count of the
finals it made. CPU seconds of the service from ready to the end. Then SIGTERM: the service must exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ..audio import BYTES_PER_SECOND
from ..config import Settings
from ..scheduler import IDLE_RELEASE_S
from .corpus import Clip, load_corpus
from .errors import BenchError
from .output import print_report
from .pacing import CHUNK_BYTES, Replay
from .processes import Broker, Service, ServiceMetrics, make_broker, start_service
from .soak_clients import ClientKind, ClientRun, never_read, satellite, speak, vanish
from .soak_mqtt import FinalSubscriber
from .soak_report import (
    SoakReport,
    account,
    broker_restart,
    error_counts,
    format_soak,
    missed_targets,
    never_reader_tally,
    rss_tally,
    soak_json,
)
from .timing import speech_span

_LOGGER = logging.getLogger(__name__)

# The mix: each kind of client and how many lanes of it run at once (7 sessions at most, under max_sessions 8).
LANES: tuple[tuple[ClientKind, int], ...] = (
    ("wyoming", 2),
    ("websocket", 2),
    ("vanishing", 1),
    ("slow-reader", 1),
    ("never-reader", 1),
)
# A lane rests between clips, as people do between commands; lanes start a little apart.
LANE_PAUSE_S = 1.0
# A device that vanished comes back a little later: meanwhile the service finishes its utterance, so the mix
# stays within limits.max_sessions.
VANISHED_PAUSE_S = 3.0
LANE_STAGGER_S = 0.5
# Lanes start their clip lists this many clips apart, so that they do not all speak the same clip.
LANE_CLIP_OFFSET = 7
# The broker is stopped at each of these shares of the run, for BROKER_DOWN_S.
BROKER_RESTART_SHARES = (1 / 3, 2 / 3)
BROKER_DOWN_S = 3.0
# RSS after the warm-up (this share of the run, at least WARMUP_MIN_S) is the baseline of the growth: by then every
# kind of client and the decoder's buffers have been through the service (measured in a 2-minute soak: RSS climbs
# some 35 MB in the first 30 s, then in steps of a few MB until about 70 s, then stays flat).
WARMUP_SHARE = 1 / 6
WARMUP_MIN_S = 30.0
RSS_GROWTH_MB_PER_30_MIN = 5.0
# A run shorter than this ends its warm-up before the service's memory has settled (+7.6 MB from 30 s to 70 s of a
# 2-minute soak): it is allowed SHORT_RUN_RSS_GROWTH_MB, so that it catches a gross leak; a slow one needs the
# 30-minute run.
SHORT_RUN_MINUTES = 10.0
SHORT_RUN_RSS_GROWTH_MB = 20.0
RSS_SAMPLE_S = 1.0
# RSS is compared at rest: under load a reading lands wherever the decodes in flight happen to be (tens of MB
# apart from one second to the next), and the service gives back what its decodes freed once decoding has paused
# for IDLE_RELEASE_S. The soak waits that, and a few seconds more, before each reading at rest.
REST_S = IDLE_RELEASE_S + 4.0
TIMELINE_STEP_S = 10.0
# After the last client: how long sessions and tasks may take to settle, and the broker to get the last finals.
SETTLE_TIMEOUT_S = 30.0
BROKER_SETTLE_TIMEOUT_S = 30.0
# With no final count in /metrics, the broker is taken as complete after this long without a new final.
BROKER_QUIET_S = 3.0
# After SIGTERM the service flushes what MQTT still queues; the subscriber gets it within this.
AFTER_STOP_S = 1.0
SUBSCRIBER_ID = "edge-asr-soak"
REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "edge-asr.yaml"


@dataclass(frozen=True)
class SoakPlan:
    """How long the soak runs, when the warm-up ends, when the broker restarts, and the RSS growth allowed."""

    minutes: float
    duration_s: float
    warmup_s: float
    restarts_at_s: tuple[float, ...]
    max_rss_growth_mb: float


def default_rss_limit_mb(minutes: float) -> float:
    """RSS growth allowed after the warm-up: 20 MB for a run under 10 minutes (the service's memory is still
    settling), 5 MB up to 30 minutes, then 5 MB per 30 minutes (a slow leak grows with time)."""
    if minutes < SHORT_RUN_MINUTES:
        return SHORT_RUN_RSS_GROWTH_MB
    return RSS_GROWTH_MB_PER_30_MIN * max(1.0, minutes / 30)


def soak_plan(minutes: float, max_rss_growth_mb: float | None) -> SoakPlan:
    """The plan of a run of `minutes`."""
    duration_s = 60 * minutes
    return SoakPlan(
        minutes=minutes,
        duration_s=duration_s,
        warmup_s=min(duration_s, max(WARMUP_MIN_S, WARMUP_SHARE * duration_s)),
        restarts_at_s=tuple(share * duration_s for share in BROKER_RESTART_SHARES),
        max_rss_growth_mb=default_rss_limit_mb(minutes) if max_rss_growth_mb is None else max_rss_growth_mb,
    )


def _check_flags(args: argparse.Namespace) -> None:
    """The soak starts its own service and broker and paces in real time: the flags of other modes do not apply."""
    ignored = [
        flag
        for flag, given in (
            ("--url", args.url),
            ("--wyoming", args.wyoming),
            ("--pid", args.pid is not None),
            ("--fast", args.fast),
            ("--runs", args.runs != 1),
            ("--concurrency", args.concurrency != 1),
            ("--vocabulary", args.vocabulary is not None),
        )
        if given
    ]
    if ignored:
        raise BenchError(f"--soak starts its own service, broker and client mix: {', '.join(ignored)} do not apply")


def _service_flags(args: argparse.Namespace) -> list[str]:
    """The bench's model and settings flags, handed on to the service under test."""
    flags: list[str] = []
    if args.model:
        flags += ["--model", args.model]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    if args.log_level:
        flags += ["--log-level", args.log_level]
    for item in args.set:
        flags += ["--set", item]
    return flags


def run_soak(args: argparse.Namespace, settings: Settings) -> int:
    """Run the soak; 0 when every target was met, 1 when one was missed or the soak could not run."""
    directory: Path | None = None
    try:
        _check_flags(args)
        plan = soak_plan(args.soak, args.max_rss_growth_mb)
        clips = load_corpus(args.corpus, args.match, args.limit)
        if not any(clip.has_words for clip in clips):
            raise BenchError(
                "--soak needs clips with speech (a .txt with words) for its vanishing and never-reading clients"
            )
        config = args.config or (REPO_CONFIG if REPO_CONFIG.is_file() else None)
        directory = Path(tempfile.mkdtemp(prefix="edge-asr-soak-"))
        flags = _service_flags(args)
        report = asyncio.run(
            _soak(plan, clips, settings, config, flags, args.trailing_silence, directory, str(args.corpus))
        )
    except BenchError as err:
        print(f"edge-asr bench: {err}", file=sys.stderr)
        if directory is not None:
            print(f"edge-asr bench: service and broker logs kept in {directory}", file=sys.stderr)
        return 1
    if report.misses:
        print(f"edge-asr bench: service and broker logs kept in {directory}", file=sys.stderr)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    if not print_report(format_soak(report), lambda: soak_json(report), args.json):
        return 1
    return 1 if report.misses else 0


def _service_settings(broker_port: int) -> tuple[str, ...]:
    """The soak's `--set` settings, after the user's flags so that they win: HTTP, Wyoming and the soak's broker."""
    return (
        "http.enabled=true",
        "wyoming.enabled=true",
        "mqtt.enabled=true",
        "mqtt.host=127.0.0.1",
        f"mqtt.port={broker_port}",
        "mqtt.tls=false",
    )


async def _soak(
    plan: SoakPlan,
    clips: Sequence[Clip],
    settings: Settings,
    config: Path | None,
    flags: Sequence[str],
    trailing_silence_s: float,
    directory: Path,
    corpus: str,
) -> SoakReport:
    """Start the broker, the subscriber and the service, run the mix, settle, stop everything and report."""
    store = directory / "mosquitto-store"
    store.mkdir(exist_ok=True)
    # The persistent store keeps the soak subscriber's session and its queued messages across the broker's restarts.
    broker = await asyncio.to_thread(make_broker, directory, "persistence true", f"persistence_location {store}/")
    subscriber = FinalSubscriber(broker.port, settings.mqtt.topic_prefix, SUBSCRIBER_ID)
    try:
        await subscriber.connect()
        service = await asyncio.to_thread(
            start_service,
            directory,
            *_service_settings(broker.port),
            config=config,
            flags=flags,
            healthy=("mqtt",),  # so that the first final already has a broker
        )
        _LOGGER.info("Service ready (pid %d): %s, %s", service.pid, service.ws_url, service.wyoming_uri)
        try:
            soak = _Soak(plan, clips, settings, service, broker, subscriber, Replay(True, trailing_silence_s))
            measured = await soak.run()
        finally:
            exit_code = await asyncio.to_thread(service.stop)
        await asyncio.sleep(AFTER_STOP_S)
        broker_finals = tuple(subscriber.finals())
        connects, unreadable = subscriber.connects, subscriber.unreadable
    finally:
        subscriber.close()
        await asyncio.to_thread(broker.stop)
    start, end = measured.metrics_start, measured.metrics_end
    made = None if start.finals is None or end.finals is None else end.finals - start.finals
    clients = tuple(sorted(soak.clients, key=lambda run: run.started_s))
    report = SoakReport(
        corpus=corpus,
        clips=len(clips),
        minutes=plan.minutes,
        service_pid=service.pid,
        send_timeout_s=settings.limits.send_timeout_s,
        rss=rss_tally(
            soak.samples,
            plan.warmup_s,
            measured.warmup_rss_mb,
            measured.end_rss_mb,
            plan.max_rss_growth_mb,
            TIMELINE_STEP_S,
        ),
        sessions_left=measured.sessions_left,
        event_loop_tasks_before=start.event_loop_tasks,
        event_loop_tasks_after=measured.tasks_after,
        finals=account(clients, broker_finals, made),
        never_readers=never_reader_tally(clients),
        broker_restarts=tuple(broker_restart(at_s, down, broker_finals) for at_s, down in soak.restarts),
        subscriber_connects=connects,
        unreadable_on_broker=unreadable,
        cpu_s=measured.cpu_s,
        audio_s=sum(run.audio_s for run in clients),
        events_dropped=end.events_dropped,
        mqtt_finals_dropped=end.mqtt_finals_dropped,
        errors=error_counts(clients),
        service_exit_code=exit_code,
        service_log_problems=service.log_problems(),
        misses=(),
        clients=clients,
        broker_finals=broker_finals,
    )
    return dataclasses.replace(report, misses=missed_targets(report))


@dataclass(frozen=True)
class _Measured:
    """What the soak read from the service at the start and once every client was gone."""

    metrics_start: ServiceMetrics
    metrics_end: ServiceMetrics
    sessions_left: int | None
    tasks_after: int | None
    warmup_rss_mb: float
    end_rss_mb: float
    cpu_s: float


class _Soak:
    """One run of the mix against a started service: the lanes, the broker restarts, the RSS samples."""

    def __init__(
        self,
        plan: SoakPlan,
        clips: Sequence[Clip],
        settings: Settings,
        service: Service,
        broker: Broker,
        subscriber: FinalSubscriber,
        replay: Replay,
    ) -> None:
        self._plan = plan
        self._clips = list(clips)
        self._spoken = [clip for clip in clips if clip.has_words]
        self._settings = settings
        self._service = service
        self._broker = broker
        self._subscriber = subscriber
        self._replay = replay
        self._cuts: dict[str, int] = {}
        # Set when the clients start.
        self._t0 = self._deadline = 0.0
        # Cleared while the lanes rest after the warm-up; how many clients play meanwhile.
        self._lanes_go = asyncio.Event()
        self._lanes_go.set()
        self._playing = 0
        self._played = asyncio.Condition()
        self._warmup_rss_mb: float | None = None
        self.clients: list[ClientRun] = []
        # Each restart: seconds into the soak, and the outage from stop to start as seconds since the epoch.
        self.restarts: list[tuple[float, tuple[float, float]]] = []
        self.samples: list[tuple[float, float]] = []

    def _now_s(self) -> float:
        return time.monotonic() - self._t0

    async def run(self) -> _Measured:
        """Run every lane and the broker restarts until the time is up, then let the service settle and measure."""
        metrics_start = await asyncio.to_thread(self._service.metrics)
        cpu_start = self._service.cpu_s()
        self._t0 = time.monotonic()
        self._deadline = self._t0 + self._plan.duration_s
        lanes = [(kind, number) for kind, count in LANES for number in range(1, count + 1)]
        work = asyncio.gather(
            *(self._lane(kind, number, index) for index, (kind, number) in enumerate(lanes)),
            self._restart_broker(),
            self._rest_after_warmup(metrics_start.event_loop_tasks),
        )
        watcher = asyncio.create_task(self._watch())
        try:
            running: list[asyncio.Future[Any]] = [work, watcher]
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()  # the service died: its BenchError ends the soak
            await work
        finally:
            work.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, BenchError):
                await watcher
            with contextlib.suppress(asyncio.CancelledError):
                await work
        sessions_left, tasks_after = await self._settle(metrics_start.event_loop_tasks)
        end_rss_mb = await self._rss_at_rest()
        metrics_end = await self._broker_settled(metrics_start.finals)
        warmup_rss_mb = end_rss_mb if self._warmup_rss_mb is None else self._warmup_rss_mb
        return _Measured(
            metrics_start,
            metrics_end,
            sessions_left,
            tasks_after,
            warmup_rss_mb,
            end_rss_mb,
            self._service.cpu_s() - cpu_start,
        )

    async def _lane(self, kind: ClientKind, number: int, index: int) -> None:
        """Play clips as one kind of client, one after the other, until the time is up."""
        site = f"soak_{kind.replace('-', '_')}_{number}"
        clips = self._spoken if kind in ("vanishing", "never-reader") else self._clips
        position = index * LANE_CLIP_OFFSET
        await asyncio.sleep(index * LANE_STAGGER_S)
        while True:
            await self._lanes_go.wait()
            if time.monotonic() >= self._deadline:
                return
            clip = clips[position % len(clips)]
            position += 1
            self._playing += 1
            try:
                self.clients.append(await self._play(kind, site, clip))
            finally:
                async with self._played:
                    self._playing -= 1
                    self._played.notify_all()
            await asyncio.sleep(VANISHED_PAUSE_S if kind == "vanishing" else LANE_PAUSE_S)

    async def _rest_after_warmup(self, tasks_before: int | None) -> None:
        """When the warm-up ends, hold the lanes once their clients are done, read the service's RSS at rest, and let
        them go on for as long as the rest took."""
        await asyncio.sleep(max(0.0, self._t0 + self._plan.warmup_s - time.monotonic()))
        if time.monotonic() >= self._deadline:
            return
        resting_since = time.monotonic()
        self._lanes_go.clear()
        try:
            async with self._played:
                await self._played.wait_for(lambda: self._playing == 0)
            await self._settle(tasks_before)
            self._warmup_rss_mb = await self._rss_at_rest()
            _LOGGER.info("Soak: RSS at rest after the warm-up %.1f MB", self._warmup_rss_mb)
        finally:
            self._deadline += time.monotonic() - resting_since
            self._lanes_go.set()

    async def _rss_at_rest(self) -> float:
        """The service's RSS after REST_S with no client."""
        await asyncio.sleep(REST_S)
        rss_mb = self._service.rss_mb()
        self.samples.append((self._now_s(), rss_mb))
        return rss_mb

    async def _play(self, kind: ClientKind, site: str, clip: Clip) -> ClientRun:
        """One client of `kind` speaking `clip`."""
        pcm, started_s, url = clip.read_pcm(), self._now_s(), self._service.ws_url
        if kind == "wyoming":
            language = self._settings.model.language
            return await satellite(self._service.wyoming_uri, language, site, clip.name, pcm, self._replay, started_s)
        if kind in ("websocket", "slow-reader"):
            return await speak(url, site, clip.name, pcm, self._replay, started_s, slow=kind == "slow-reader")
        if kind == "vanishing":
            return await vanish(url, site, clip.name, pcm, self._cut(clip, pcm), started_s)
        return await never_read(url, site, clip.name, pcm, clip.has_words, started_s, self._deadline)

    def _cut(self, clip: Clip, pcm: bytes) -> int:
        """Where a vanishing client goes: half-way through the clip's speech (as the service's VAD finds it), in
        whole chunks; half the clip when the VAD finds none."""
        if clip.name not in self._cuts:
            span = speech_span(pcm, self._settings.stream)
            middle_s = (span[0] + span[1]) / 2 if span else clip.duration_s / 2
            self._cuts[clip.name] = max(CHUNK_BYTES, int(middle_s * BYTES_PER_SECOND) // CHUNK_BYTES * CHUNK_BYTES)
        return self._cuts[clip.name]

    async def _restart_broker(self) -> None:
        """Stop the broker at each restart time for BROKER_DOWN_S, then start it again on the same port."""
        for at_s in self._plan.restarts_at_s:
            await asyncio.sleep(max(0.0, self._t0 + at_s - time.monotonic()))
            await self._lanes_go.wait()  # not while the service rests for a reading
            stopped_s, stopped_at = self._now_s(), time.time()
            _LOGGER.info("Soak: stopping the broker at %.0f s", stopped_s)
            await asyncio.to_thread(self._broker.stop)
            await asyncio.sleep(BROKER_DOWN_S)
            await asyncio.to_thread(self._broker.start)
            self.restarts.append((stopped_s, (stopped_at, time.time())))
            _LOGGER.info("Soak: broker back after %.1f s", time.time() - stopped_at)

    async def _watch(self) -> None:
        """Sample the service's RSS every RSS_SAMPLE_S and print progress; BenchError when the service died."""
        progress_every = max(1, round(min(60.0, self._plan.duration_s / 4) / RSS_SAMPLE_S))
        count = 0
        while True:
            try:
                self.samples.append((self._now_s(), self._service.rss_mb()))
            except psutil.Error:
                raise BenchError(
                    f"the service died {self._now_s():.0f} s into the soak; see {self._service.log_path}"
                ) from None
            count += 1
            if count % progress_every == 0:
                sessions = await asyncio.to_thread(self._service.sessions)
                print(
                    f"soak {self._now_s():5.0f}/{self._plan.duration_s:.0f} s: {len(self.clients)} clients done,"
                    f" {sessions} session(s) open, RSS {self.samples[-1][1]:.1f} MB",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(RSS_SAMPLE_S)

    async def _settle(self, tasks_before: int | None) -> tuple[int | None, int | None]:
        """Wait until no session is open and no more tasks run than before the first client, up to
        SETTLE_TIMEOUT_S; the sessions and tasks then."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            sessions = await asyncio.to_thread(self._service.sessions)
            tasks = (await asyncio.to_thread(self._service.metrics)).event_loop_tasks
            settled = sessions == 0 and (tasks is None or tasks_before is None or tasks <= tasks_before)
            if settled or time.monotonic() >= deadline:
                return sessions, tasks
            await asyncio.sleep(0.5)

    async def _broker_settled(self, made_before: int | None) -> ServiceMetrics:
        """Wait until the broker delivered as many distinct finals as the service made (or, without that count,
        none came for BROKER_QUIET_S), up to BROKER_SETTLE_TIMEOUT_S; the service's metrics then."""
        deadline = time.monotonic() + BROKER_SETTLE_TIMEOUT_S
        delivered, quiet_since = -1, time.monotonic()
        while True:
            metrics = await asyncio.to_thread(self._service.metrics)
            now = len({(final.site, final.session, final.utterance) for final in self._subscriber.finals()})
            if now != delivered:
                delivered, quiet_since = now, time.monotonic()
            if metrics.finals is not None and made_before is not None:
                complete = delivered >= metrics.finals - made_before
            else:
                complete = time.monotonic() - quiet_since >= BROKER_QUIET_S
            if complete or time.monotonic() >= deadline:
                return metrics
            await asyncio.sleep(0.5)
