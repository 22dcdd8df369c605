"""The engine: owns the model and the sessions that share it; admission, events to listeners, health.

`Engine` is what adapters use (the `SpeechEngine` protocol); `EngineSession` is one client's stream (a
`SpeechSession` to the adapters, a `DecodeJob` to the scheduler). A request passes `Admission` before its session
exists; the session then reports to its `SessionSink` (the engine) only its events, that it wants a decode, and that
it closed, and the engine asks a session nothing but what the scheduler needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Protocol

from .admission import Admission, Admitted
from .api import (
    AudioFormatError,
    ComponentState,
    EngineNotReady,
    EngineShuttingDown,
    Health,
    Listener,
    SessionRequest,
    UnsupportedLanguage,
)
from .audio import BYTES_PER_SECOND, SAMPLE_WIDTH
from .config import ConfigError, Settings
from .decoding import WhisperTranscriber
from .events import Done, Event, Final, Partial, SessionError, SessionInfo
from .metrics import Metrics
from .model import languages_of
from .scheduler import DecodeNeed, DecodeScheduler
from .session import DecodeRequest, StreamSession
from .transcript import Transcriber, Transcript

_LOGGER = logging.getLogger(__name__)
# A decode running longer than this means decoding is stuck: not live, and the watchdog starves.
DECODE_STALL_S = 30.0
# Shutdown waits for writers to take the last events; they do within a loop iteration or two.
_DELIVERY_POLL_S = 0.01


class SessionSink(Protocol):
    """Where a session reports."""

    def publish(self, info: SessionInfo, events: Sequence[Event]) -> None:
        """The session's state moved on (audio, a decode, a final) and made these events, perhaps none."""

    def decode_wanted(self) -> None:
        """The session may want a decode now."""

    def closed(self, session: EngineSession) -> None:
        """The session closed: forget it and free its slot."""


class _EventQueue:
    """A session's events on their way to its client, in order. A client that does not keep up loses its
    oldest partials once `limit` events wait (each partial supersedes the one before), then its oldest
    errors (a flood of bad frames gets as many errors back); finals and `Done` are never dropped."""

    def __init__(self, limit: int, on_drop: Callable[[], None]) -> None:
        self._limit = limit
        self._on_drop = on_drop
        self._items: deque[Event | None] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Event | None) -> None:
        """Queue an event (None: the end of the stream)."""
        if len(self._items) >= self._limit:
            stale: Event | None = next((queued for queued in self._items if isinstance(queued, Partial)), None)
            if stale is None:
                stale = next((queued for queued in self._items if isinstance(queued, SessionError)), None)
            if stale is not None:
                self._items.remove(stale)
                self._on_drop()
        self._items.append(item)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Event | None:
        """The next event, waiting for one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class EngineSession:
    """A client's stream on the engine: feed audio, read events, finish."""

    def __init__(
        self,
        session_id: int,
        admitted: Admitted,
        settings: Settings,
        sink: SessionSink,
        admission: Admission,
        metrics: Metrics,
        *,
        listeners_read_partials: bool,
    ) -> None:
        request = admitted.request
        self.admitted = admitted
        self._sink = sink
        self._admission = admission
        self._metrics = metrics
        self._client_reads_partials = request.partials
        self._listeners_read_partials = listeners_read_partials
        self._state = StreamSession(
            settings.stream,
            settings.limits,
            split_on_silence=request.split_on_silence,
            prompt=request.prompt,
            language=admitted.language,
            endpoint_rules=admitted.endpoint_rules,
            partials=request.partials or listeners_read_partials,
        )
        self._state.set_names(admitted.names.prompt, admitted.names.speller)
        vocabulary = admitted.names.vocabulary
        self._info = SessionInfo(
            session_id, request.source, admitted.site, admitted.language, len(vocabulary.names), vocabulary.digest
        )
        self._closed = False
        self._last_decoded_at = time.monotonic()
        self._limits = settings.limits
        self._events = _EventQueue(self._limits.max_queued_events, self._metrics.events_dropped_total.inc)
        self._sending = False
        self._changed = asyncio.Event()
        self._finals = 0
        self._last_final: Final | None = None
        self._failing = False

    async def __aenter__(self) -> EngineSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def info(self) -> SessionInfo:
        """Who this session's events belong to, and which vocabulary was in force."""
        return self._info

    @property
    def has_open_utterance(self) -> bool:
        """Speech was heard whose final is not out yet."""
        return self._state.active

    @property
    def undelivered(self) -> int:
        """Events the client's writer has not sent yet (queued, or taken and being sent)."""
        return len(self._events) + self._sending

    @property
    def audio_s(self) -> float:
        """Seconds of audio fed so far."""
        return self._state.stream_s

    def feed(self, pcm: bytes) -> None:
        """Add 16 kHz mono s16le audio; odd byte counts are refused whole."""
        if len(pcm) % SAMPLE_WIDTH:
            raise AudioFormatError(f"audio of {len(pcm)} bytes is not whole 16-bit samples")
        if self._closed or not pcm:
            return
        self._metrics.audio_seconds_total.inc(len(pcm) / BYTES_PER_SECOND)
        self._publish(self._state.push(pcm, time.monotonic()))
        self._sink.decode_wanted()

    async def room(self) -> None:
        """Wait until less than `limits.max_buffer_s` of audio waits for a decode and fewer than
        `limits.max_queued_events` events wait for the client: a client that sends faster than its speech can be
        decoded, or asks for answers (`end` after `end`) faster than it reads them, is slowed down instead of
        filling memory."""
        while self._full() and not self._closed:
            self._changed.clear()
            await self._changed.wait()

    def _full(self) -> bool:
        return (
            self._state.undecoded_s >= self._limits.max_buffer_s or len(self._events) >= self._limits.max_queued_events
        )

    async def finish(self) -> Final | None:
        """End of audio: wait for the open utterance's final and return it (None when nothing was said).

        A `Done` event follows the final. Audio fed meanwhile is transcribed as the next utterance.
        """
        if self._state.finished:
            # The service ended the request at its command's end: its final and `Done` are out or on their way.
            return self._last_final
        finals_before = self._finals
        self._publish(self._state.end_of_audio(time.monotonic()))
        self._sink.decode_wanted()
        while self._state.ending and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        final = self._last_final if self._finals > finals_before else None
        self._publish([Done(self._state.utterance - 1)])
        return final

    def set_prompt(self, prompt: str) -> None:
        """Text that comes before this stream's speech, passed to the decoder."""
        self._state.set_prompt(prompt)

    def set_site(self, site: str) -> None:
        """Where the speaker is (a room or satellite name), for listeners such as MQTT; raises InvalidSite."""
        self._info = dataclasses.replace(self._info, site=self._admission.site(site))

    def set_language(self, language: str) -> None:
        """Switch the spoken language; raises UnsupportedLanguage for one the model does not know."""
        self._info = dataclasses.replace(self._info, language=self._admission.language(language))
        self._state.set_language(self._info.language)

    def set_vocabulary(self, names: tuple[str, ...], terms: tuple[str, ...] = ()) -> None:
        """The client's own names (and terms) for later decodes, before the configured vocabulary."""
        decoding = self._admission.names(names, terms)
        vocabulary = decoding.vocabulary
        self._info = dataclasses.replace(
            self._info, vocabulary_names=len(vocabulary.names), vocabulary_digest=vocabulary.digest
        )
        self._state.set_names(decoding.prompt, decoding.speller)

    def set_partials(self, wanted: bool) -> None:
        """Whether the client reads partials from now on; while neither it nor a listener does, none is decoded."""
        self._client_reads_partials = wanted
        self._state.set_partials(wanted or self._listeners_read_partials)

    def report_error(self, code: str, message: str) -> None:
        """Queue an error for the client, in order with the session's other events."""
        self._publish([SessionError(code, message)])

    async def events(self) -> AsyncIterator[Event]:
        """Events in order, until the session closes; an event counts as delivered once the writer asks for the
        next one (it has sent this one), so a shutdown waits for the send itself, not just for the taking."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            self._changed.set()  # room() may be waiting for the client to take its events
            self._sending = True
            try:
                yield event
            finally:
                self._sending = False

    def close(self) -> None:
        """Release the session; a decode still running for it is dropped."""
        if self._closed:
            return
        self._closed = True
        self._sink.closed(self)
        self._events.put(None)
        self._changed.set()

    # What the scheduler asks (DecodeJob).

    def decode_need(self) -> DecodeNeed | None:
        """Whether a decode would bring something new now."""
        if self._closed or not self._state.wants_decode():
            return None
        return DecodeNeed(final=self._state.wants_final_decode(), since=self._last_decoded_at)

    def begin_decode(self) -> DecodeRequest:
        """The window to decode now."""
        return self._state.next_request()

    def end_decode(self, request: DecodeRequest, transcript: Transcript | None) -> None:
        """Turn a decode's words into events; a failed decode is reported once until one succeeds."""
        if self._closed:
            return
        now = time.monotonic()
        self._last_decoded_at = now
        if transcript is None:
            if not self._failing:
                self.report_error("decode_failed", "the model failed on this audio; see the server log")
            self._failing = True
            self._publish(self._state.decode_failed(request, now))
            return
        self._failing = False
        self._publish(self._state.apply(request, transcript, now))

    def abort(self, reason: str) -> None:
        """Tell the client the session broke, and close it."""
        try:
            self.report_error("internal_error", reason)
        finally:
            self.close()

    def _publish(self, events: list[Event]) -> None:
        if self._closed:
            return
        for event in events:
            if isinstance(event, Final):
                self._finals += 1
                self._last_final = event
            elif isinstance(event, Partial) and not self._client_reads_partials:
                continue  # decoded for a listener only
            self._events.put(event)
        self._changed.set()
        self._sink.publish(self.info, events)


class Engine:
    """Owns the model, the decode scheduler and the sessions that share them."""

    def __init__(self, settings: Settings, transcriber_factory: Callable[[], Transcriber] | None = None) -> None:
        self.settings = settings
        self._metrics = Metrics()
        self._factory = transcriber_factory or (lambda: WhisperTranscriber(settings.model))
        self._transcriber: Transcriber | None = None
        self._sessions: dict[int, EngineSession] = {}
        self._scheduler = DecodeScheduler(
            settings.model.effective_workers, lambda: self._sessions.values(), self._metrics
        )
        self._ids = itertools.count(1)
        self._started = time.monotonic()
        self._status = "loading model"
        self._listeners: list[Listener] = []
        self._listeners_read_partials = False
        self._components: dict[str, ComponentState] = {}
        self._languages_before_load: tuple[str, ...] | None = None
        self._draining = False
        self._refusing = False
        self._admission = Admission(settings, self._metrics, lambda: self.languages, self._common_words)
        # Set whenever an utterance ends or a session closes, for shutdown to wait on.
        self._settled = asyncio.Event()

    @property
    def metrics(self) -> Metrics:
        """The engine's Prometheus metrics."""
        return self._metrics

    @property
    def ready(self) -> bool:
        """The model is loaded and warm, and decodes are being scheduled."""
        return self._transcriber is not None and self._scheduler.running

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages of the model: the loaded model's own, or what its files say while it loads."""
        if self._transcriber is not None:
            return self._transcriber.languages
        if self._languages_before_load is None:
            self._languages_before_load = languages_of(self.settings.model.name)
        return self._languages_before_load

    @property
    def model_failing(self) -> bool:
        """`service.max_decode_failures` decodes in a row have failed."""
        return self._scheduler.failures_in_a_row >= self.settings.service.max_decode_failures

    def decoding_alive(self) -> bool:
        """Decodes are scheduled, none has been running for `DECODE_STALL_S`, and the model is not failing."""
        return self.ready and not self._scheduler.stalled(DECODE_STALL_S) and not self.model_failing

    def drain(self) -> None:
        """Report not-ready from now on, so balancers send new sessions elsewhere; sessions are still taken."""
        self._draining = True

    def refuse_sessions(self) -> None:
        """Take no new session: `session()` raises EngineShuttingDown."""
        self._refusing = True

    @property
    def open_utterances(self) -> int:
        """Sessions with speech whose final is not out yet."""
        return sum(1 for session in self._sessions.values() if session.has_open_utterance)

    async def settle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every open utterance to end by itself; whether they all did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.open_utterances:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._settled.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)
        return True

    async def delivered(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until every session's writer has taken its events (before connections close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(session.undelivered for session in self._sessions.values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_DELIVERY_POLL_S)
        return True

    async def finish_all(self, timeout_s: float) -> None:
        """Finalise every open utterance (for shutdown), waiting at most `timeout_s`."""
        open_sessions = [s for s in self._sessions.values() if s.has_open_utterance]
        if not open_sessions:
            return
        _LOGGER.info("Finishing %d open utterance(s)", len(open_sessions))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.finish() for s in open_sessions)), timeout_s)

    def _common_words(self) -> frozenset[str]:
        return self._transcriber.common_words if self._transcriber is not None else frozenset()

    async def start(self) -> None:
        """Load and warm the model off the event loop, then start scheduling decodes."""
        try:
            transcriber = await self._scheduler.run_blocking(self._factory)
            warm_ms = await self._scheduler.run_blocking(transcriber.warm_up)
        except Exception as err:
            self._status = f"model failed: {err}"
            raise
        self._transcriber = transcriber
        try:
            self._admission.language(self.settings.model.language)
        except UnsupportedLanguage as err:
            self._status = f"model.language: {err}"
            raise ConfigError(f"model.language: {err}") from None
        _LOGGER.info("Model warm (%.0f ms), %d decode worker(s)", warm_ms, self._scheduler.workers)
        self._status = "ready"
        self._scheduler.start(transcriber)

    async def stop(self) -> None:
        """Close every session, let running decodes end, and stop the decode threads."""
        for session in list(self._sessions.values()):
            session.close()
        await self._scheduler.stop()
        self._status = "stopped"

    def add_listener(self, listener: Listener, *, reads_partials: bool) -> None:
        """Call `listener` on the event loop with every event of every session, in order; while a listener
        `reads_partials`, sessions opened from then on decode them."""
        self._listeners.append(listener)
        self._listeners_read_partials |= reads_partials

    def set_component(self, name: str, state: str, healthy: bool) -> None:
        """Record the state of a part outside the engine (e.g. the MQTT connection) for /health."""
        self._components[name] = ComponentState(name, state, healthy)

    def set_names(self, source: str, names: tuple[str, ...]) -> None:
        """The household's names from a source outside the config (e.g. "homeassistant"), for new sessions."""
        self._admission.set_names(source, names)

    def session(self, request: SessionRequest) -> EngineSession:
        """Open a session on the request's terms once `Admission` has settled them, or raise EngineShuttingDown /
        EngineNotReady / EngineBusy / UnsupportedLanguage / InvalidSite."""
        if self._refusing:
            self._metrics.rejected_total.labels("shutting_down").inc()
            raise EngineShuttingDown("the service is shutting down; try another node")
        if not self.ready:
            self._metrics.rejected_total.labels("not_ready").inc()
            raise EngineNotReady(self._status)
        admitted = self._admission.admit(request, len(self._sessions))
        session = EngineSession(
            next(self._ids),
            admitted,
            self.settings,
            self,
            self._admission,
            self._metrics,
            listeners_read_partials=self._listeners_read_partials,
        )
        self._sessions[session.info.id] = session
        self._metrics.sessions_total.labels(request.source).inc()
        self._metrics.sessions_active.set(len(self._sessions))
        return session

    def health(self) -> Health:
        """Model, sessions, uptime and decode facts."""
        now = time.monotonic()
        last = self._scheduler.last_decode_at
        ready = self.ready and not self._draining and not self.model_failing
        return Health(
            ready=ready,
            live=not self._scheduler.stalled(DECODE_STALL_S) and not self.model_failing,
            accepting=ready and not self._refusing and len(self._sessions) < self.settings.limits.max_sessions,
            status=self._health_status(),
            model=self.settings.model.name,
            threads=self.settings.model.effective_threads,
            workers=self._scheduler.workers,
            languages=self.languages,
            sessions=len(self._sessions),
            max_sessions=self.settings.limits.max_sessions,
            uptime_s=round(now - self._started, 3),
            last_decode_s_ago=None if last is None else round(now - last, 3),
            decode_queue=self._scheduler.waiting(),
            decodes=self._scheduler.decodes,
            components=tuple(self._components.values()),
        )

    def _health_status(self) -> str:
        if self._draining and self._status == "ready":
            return "draining"
        if self._scheduler.stalled(DECODE_STALL_S):
            return f"decoding stuck: a decode has run for more than {DECODE_STALL_S:g} s"
        if self.model_failing and self._status == "ready":
            failures = self._scheduler.failures_in_a_row
            return f"model failing: {failures} decodes in a row failed ({self._scheduler.last_failure})"
        return self._status

    # What a session reports (SessionSink).

    def publish(self, info: SessionInfo, events: Sequence[Event]) -> None:
        """Count a session's events and hand them to the listeners (a failing listener is logged, not fatal);
        shutdown may be waiting for its utterance to end."""
        for event in events:
            self._metrics.observe_event(event)
            for listener in self._listeners:
                try:
                    listener(info, event)
                except Exception:
                    _LOGGER.exception("Event listener %r failed", listener)
        self._settled.set()

    def decode_wanted(self) -> None:
        """A session may want a decode: start it if a worker is free."""
        self._scheduler.kick()

    def closed(self, session: EngineSession) -> None:
        """Forget a closed session and free its address's slot."""
        if self._sessions.pop(session.info.id, None) is not None:
            self._admission.release(session.admitted)
        self._settled.set()
        self._metrics.sessions_active.set(len(self._sessions))
