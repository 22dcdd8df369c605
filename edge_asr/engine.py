"""Shares one model among sessions: decode scheduling, admission limits and the decode threads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from .audio import BYTES_PER_SECOND, SAMPLE_WIDTH
from .config import ConfigError, Settings
from .events import Done, Event, Final, SessionError, SessionInfo
from .metrics import Metrics
from .model import Transcriber, Transcript, WhisperTranscriber
from .session import DecodeRequest, StreamSession

_LOGGER = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """All `limits.max_sessions` sessions are taken."""


class EngineNotReady(RuntimeError):
    """The model is not loaded and warm yet."""


class AudioFormatError(ValueError):
    """Audio that is not whole s16le samples."""


class UnsupportedLanguage(ValueError):
    """A language the loaded model does not know."""


Listener = Callable[[SessionInfo, Event], None]


@dataclass(frozen=True)
class ComponentState:
    """The state of a part outside the engine, such as the MQTT connection, for /health."""

    name: str
    state: str
    healthy: bool


@dataclass(frozen=True)
class Health:
    """What /health reports."""

    ready: bool
    status: str
    model: str
    threads: int
    workers: int
    languages: tuple[str, ...]
    sessions: int
    max_sessions: int
    uptime_s: float
    last_decode_s_ago: float | None
    decode_queue: int
    decodes: int
    components: tuple[ComponentState, ...]


class EngineSession:
    """A client's stream on the engine: feed audio, read events, finish."""

    def __init__(
        self,
        engine: Engine,
        session_id: int,
        source: str,
        site: str,
        language: str,
        prompt: str,
        split_on_silence: bool,
    ) -> None:
        self.id = session_id
        self.source = source
        self.site = site
        self.language = language
        self.closed = False
        self.last_decoded_at = time.monotonic()
        self._engine = engine
        self._state = StreamSession(
            engine.settings.stream, engine.settings.limits, split_on_silence=split_on_silence, prompt=prompt
        )
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
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

    async def feed(self, pcm: bytes) -> None:
        """Add 16 kHz mono s16le audio; odd byte counts are refused whole."""
        if len(pcm) % SAMPLE_WIDTH:
            raise AudioFormatError(f"audio of {len(pcm)} bytes is not whole 16-bit samples")
        if self.closed or not pcm:
            return
        self._engine.metrics.audio_seconds_total.inc(len(pcm) / BYTES_PER_SECOND)
        self._publish(self._state.push(pcm, time.monotonic()))
        self._engine.wake()

    async def finish(self) -> Final | None:
        """End of audio: wait for the open utterance's final and return it (None when nothing was said).

        A `Done` event follows the final. Audio fed meanwhile is transcribed as the next utterance.
        """
        finals_before = self._finals
        self._publish(self._state.end_of_audio(time.monotonic()))
        self._engine.wake()
        while self._state.ending and not self.closed:
            self._changed.clear()
            await self._changed.wait()
        final = self._last_final if self._finals > finals_before else None
        self._publish([Done(self._state.utterance - 1)])
        return final

    def set_prompt(self, prompt: str) -> None:
        """Text that comes before this stream's speech, passed to the decoder."""
        self._state.prompt = prompt

    @property
    def has_open_utterance(self) -> bool:
        """Speech was heard whose final is not out yet."""
        return self._state.active

    @property
    def info(self) -> SessionInfo:
        """Who this session's events belong to."""
        return SessionInfo(self.id, self.source, self.site, self.language)

    def set_site(self, site: str) -> None:
        """Where the speaker is (a room or satellite name), for listeners such as MQTT."""
        self.site = site

    def set_language(self, language: str) -> None:
        """Switch the spoken language; raises UnsupportedLanguage for one the model does not know."""
        self.language = self._engine.check_language(language)

    def report_error(self, code: str, message: str) -> None:
        """Queue an error for the client, in order with the session's other events."""
        self._publish([SessionError(code, message)])

    async def events(self) -> AsyncIterator[Event]:
        """Events in order, until the session closes."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Release the session; its queued and in-flight decodes are dropped."""
        if self.closed:
            return
        self.closed = True
        self._engine.release(self)
        self._events.put_nowait(None)
        self._changed.set()

    def _publish(self, events: list[Event]) -> None:
        if self.closed:
            return
        info = self.info
        for event in events:
            if isinstance(event, Final):
                self._finals += 1
                self._last_final = event
            self._engine.metrics.observe_event(event)
            self._events.put_nowait(event)
            self._engine.notify(info, event)
        self._changed.set()

    def _wants_decode(self) -> bool:
        return self._state.wants_decode()

    def _decode_started(self) -> DecodeRequest:
        return self._state.next_request()

    def _decode_done(self, request: DecodeRequest, transcript: Transcript | None) -> None:
        now = time.monotonic()
        self.last_decoded_at = now
        if transcript is None:
            if not self._failing:
                self.report_error("decode_failed", "the model failed on this audio; see the server log")
            self._failing = True
            self._publish(self._state.decode_failed(request, now))
            return
        self._failing = False
        self._publish(self._state.apply(request, transcript.words, transcript.asr_ms, now))


class Engine:
    """Owns the model, the decode threads and the sessions that share them."""

    def __init__(self, settings: Settings, transcriber_factory: Callable[[], Transcriber] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._factory = transcriber_factory or (lambda: WhisperTranscriber(settings.model))
        self._transcriber: Transcriber | None = None
        self._workers = settings.model.effective_workers
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="decode")
        self._sessions: dict[int, EngineSession] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        # Running decode tasks and when each started, for the watchdog.
        self._decodes_running: dict[asyncio.Task[None], float] = {}
        self._started = time.monotonic()
        self._status = "loading model"
        self._last_decode: float | None = None
        self._decodes = 0
        self._listeners: list[Listener] = []
        self._components: dict[str, ComponentState] = {}

    @property
    def ready(self) -> bool:
        """The model is loaded and warm, and decodes are being scheduled."""
        return self._transcriber is not None and self._dispatcher is not None and not self._dispatcher.done()

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages of the loaded model (empty until it is loaded)."""
        return self._transcriber.languages if self._transcriber else ()

    def decoding_alive(self, stall_s: float) -> bool:
        """The scheduler runs and no decode has been running for longer than `stall_s`."""
        if not self.ready:
            return False
        now = time.monotonic()
        return all(now - started < stall_s for started in self._decodes_running.values())

    async def finish_all(self, timeout_s: float) -> None:
        """Finalise every open utterance (for shutdown), waiting at most `timeout_s`."""
        open_sessions = [s for s in self._sessions.values() if s.has_open_utterance]
        if not open_sessions:
            return
        _LOGGER.info("Finishing %d open utterance(s)", len(open_sessions))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.finish() for s in open_sessions)), timeout_s)

    def check_language(self, language: str) -> str:
        """The model's code for a language tag (`en-US` → `en`); raises UnsupportedLanguage."""
        code = language.strip().lower().replace("_", "-").split("-")[0]
        if code not in self.languages:
            known = ", ".join(self.languages) if len(self.languages) <= 10 else f"{len(self.languages)} languages"
            raise UnsupportedLanguage(f"language {language!r} is not one the model knows ({known})")
        return code

    async def start(self) -> None:
        """Load and warm the model off the event loop, then start scheduling decodes."""
        loop = asyncio.get_running_loop()
        try:
            transcriber = await loop.run_in_executor(self._executor, self._factory)
            warm_ms = await loop.run_in_executor(self._executor, transcriber.warm_up)
        except Exception as err:
            self._status = f"model failed: {err}"
            raise
        self._transcriber = transcriber
        try:
            self.check_language(self.settings.model.language)
        except UnsupportedLanguage as err:
            self._status = f"model.language: {err}"
            raise ConfigError(f"model.language: {err}") from None
        _LOGGER.info("Model warm (%.0f ms), %d decode worker(s)", warm_ms, self._workers)
        self._status = "ready"
        self._dispatcher = asyncio.create_task(self._dispatch(), name="edge-asr-dispatch")
        self._dispatcher.add_done_callback(self._dispatcher_ended)

    async def stop(self) -> None:
        """Close every session, let running decodes end, and stop the decode threads."""
        for session in list(self._sessions.values()):
            session.close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        await asyncio.gather(*self._decodes_running, return_exceptions=True)
        self._status = "stopped"
        await asyncio.to_thread(self._executor.shutdown, True)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` on the event loop with every event of every session, in order."""
        self._listeners.append(listener)

    def notify(self, info: SessionInfo, event: Event) -> None:
        """Hand one session's event to the listeners; a failing listener is logged, not fatal."""
        for listener in self._listeners:
            try:
                listener(info, event)
            except Exception:
                _LOGGER.exception("Event listener %r failed", listener)

    def set_component(self, name: str, state: str, healthy: bool) -> None:
        """Record the state of a part outside the engine (e.g. the MQTT connection) for /health."""
        self._components[name] = ComponentState(name, state, healthy)

    def session(
        self,
        source: str,
        language: str | None = None,
        prompt: str = "",
        split_on_silence: bool = True,
        site: str | None = None,
    ) -> EngineSession:
        """Open a session, or raise EngineBusy / EngineNotReady / UnsupportedLanguage."""
        if not self.ready:
            self.metrics.rejected_total.labels("not_ready").inc()
            raise EngineNotReady(self._status)
        if len(self._sessions) >= self.settings.limits.max_sessions:
            self.metrics.rejected_total.labels("busy").inc()
            raise EngineBusy(f"all {self.settings.limits.max_sessions} sessions are in use")
        code = self.check_language(language or self.settings.model.language)
        session = EngineSession(
            self, next(self._ids), source, site or self.settings.mqtt.default_site, code, prompt, split_on_silence
        )
        self._sessions[session.id] = session
        self.metrics.sessions_total.labels(source).inc()
        self.metrics.sessions_active.set(len(self._sessions))
        return session

    def release(self, session: EngineSession) -> None:
        """Forget a closed session."""
        self._sessions.pop(session.id, None)
        self.metrics.sessions_active.set(len(self._sessions))

    def wake(self) -> None:
        """Tell the dispatcher that a session may want a decode."""
        self._wake.set()

    def health(self) -> Health:
        """Model, sessions, uptime and decode facts."""
        now = time.monotonic()
        return Health(
            ready=self.ready,
            status=self._status,
            model=self.settings.model.name,
            threads=self.settings.model.effective_threads,
            workers=self._workers,
            languages=self.languages,
            sessions=len(self._sessions),
            max_sessions=self.settings.limits.max_sessions,
            uptime_s=round(now - self._started, 3),
            last_decode_s_ago=None if self._last_decode is None else round(now - self._last_decode, 3),
            decode_queue=sum(1 for s in self._sessions.values() if s._wants_decode()),
            decodes=self._decodes,
            components=tuple(self._components.values()),
        )

    def _dispatcher_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._status = f"decode scheduler failed: {task.exception()}"
            _LOGGER.error("Decode scheduler stopped: %s", task.exception())

    def _pick(self) -> EngineSession | None:
        """Finals before partials; among each, the session that has waited longest."""
        waiting = [s for s in self._sessions.values() if s._wants_decode()]
        self.metrics.decode_queue.set(len(waiting))
        if not waiting:
            return None
        return min(waiting, key=lambda s: (not s._state.ending, s.last_decoded_at))

    async def _dispatch(self) -> None:
        """Start decodes while a worker is free and a session wants one; sleep otherwise."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._decodes_running) < self._workers and (session := self._pick()) is not None:
                try:
                    request = session._decode_started()
                except Exception:  # a bug in one session must not stop everyone's decodes
                    _LOGGER.exception("Session %d: cannot build its decode request", session.id)
                    session.report_error("internal_error", "the session failed; see the server log")
                    session.close()
                    continue
                task = asyncio.create_task(self._decode(session, request))
                self._decodes_running[task] = time.monotonic()
                task.add_done_callback(self._decode_ended)

    def _decode_ended(self, task: asyncio.Task[None]) -> None:
        self._decodes_running.pop(task, None)

    async def _decode(self, session: EngineSession, request: DecodeRequest) -> None:
        assert self._transcriber is not None
        loop = asyncio.get_running_loop()
        transcript: Transcript | None = None
        try:
            transcript = await loop.run_in_executor(
                self._executor, self._transcriber.decode, request.audio, request.prompt, session.language
            )
        except Exception:
            _LOGGER.exception("Decode failed for session %d", session.id)
        finally:
            self._wake.set()
        self._last_decode = time.monotonic()
        self._decodes += 1
        if transcript is not None:
            kind = "final" if request.final else "partial"
            self.metrics.decode_seconds.labels(kind).observe(transcript.asr_ms / 1000)
        if not session.closed:
            session._decode_done(request, transcript)
