"""Fakes for the part not under test: a scripted model for the engine, a scripted engine for the adapters."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

from edge_asr.api import (
    AudioFormatError,
    ComponentState,
    EngineBusy,
    EngineRefusal,
    Health,
    InvalidSite,
    Listener,
    SessionRequest,
    UnsupportedLanguage,
)
from edge_asr.audio import SAMPLE_RATE, FloatAudio
from edge_asr.config import SITE_PATTERN
from edge_asr.events import Done, Event, Final, Partial, SessionError, SessionInfo
from edge_asr.metrics import Metrics
from edge_asr.transcript import Transcript, Word
from edge_asr.vocabulary import NamesInPrompt


class ScriptedTranscriber:
    """Says "word" for every second of audio it is given, and records what it was asked."""

    name = "scripted"
    languages: tuple[str, ...] = ("en",)
    common_words: frozenset[str] = frozenset({"the", "on", "lamp"})

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.calls: list[float] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Nothing to warm."""
        return 1.0

    def release_memory(self) -> None:
        """Nothing to give back."""

    def decode(
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Transcript:
        """A word per whole second of audio, after `delay_s`; raises when `fail` is set."""
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            time.sleep(self.delay_s)
            self.calls.append(len(audio) / SAMPLE_RATE)
            if self.fail:
                raise RuntimeError("scripted failure")
            seconds = int(len(audio) / SAMPLE_RATE)
            return Transcript(tuple(Word(i + 0.1, i + 0.9, " word") for i in range(seconds)), 5.0)
        finally:
            with self._lock:
                self.concurrent -= 1


class GatedTranscriber:
    """Each decode blocks until the test opens the gate for its prompt; records the order decodes start in."""

    name = "gated"
    languages: tuple[str, ...] = ("en",)
    common_words: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.started: list[str] = []
        # The threads release_memory was called on, in order.
        self.released_on: list[str] = []
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Nothing to warm."""
        return 1.0

    def release_memory(self) -> None:
        """Record the thread it was called on."""
        self.released_on.append(threading.current_thread().name)

    def _gate(self, prompt: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(prompt, threading.Event())

    def open(self, prompt: str) -> None:
        """Let the decode whose prompt is `prompt` (running or to come) finish."""
        self._gate(prompt).set()

    def decode(
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Transcript:
        """Wait for the gate (10 s at most, so a broken test cannot hang the suite), then hear nothing."""
        with self._lock:
            self.started.append(prompt)
        self._gate(prompt).wait(10)
        return Transcript((), 1.0)


@dataclass
class FakeSession:
    """A scripted session: each audio frame adds a word ("w1", "w2", ...), all but the newest stable;
    `finish` makes them the final."""

    engine: FakeEngine
    id: int
    source: str
    site: str
    language: str
    prompt: str
    vocabulary: tuple[str, ...] = ()
    # Whether the client reads partials: as the engine, listeners hear them all the same.
    partials: bool = True
    fed: bytearray = field(default_factory=bytearray)
    words: list[str] = field(default_factory=list)
    closed: bool = False
    finished: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    _queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)

    async def __aenter__(self) -> FakeSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def info(self) -> SessionInfo:
        """Who the events belong to."""
        return SessionInfo(self.id, self.source, self.site, self.language)

    @property
    def has_open_utterance(self) -> bool:
        """Words were fed that no final has taken yet."""
        return bool(self.words)

    def feed(self, pcm: bytes) -> None:
        """Take a frame and emit a partial with one more word."""
        if len(pcm) % 2:
            raise AudioFormatError(f"audio of {len(pcm)} bytes is not whole 16-bit samples")
        self.fed += pcm
        self.words.append(f"w{len(self.words) + 1}")
        if self.engine.partial_padding:  # a big partial per frame, not compressible: for clients that do not read
            self._emit(
                Partial(secrets.token_urlsafe(self.engine.partial_padding)[: self.engine.partial_padding], "", 1, 1, 1)
            )
            return
        self._emit(Partial(" ".join(self.words), " ".join(self.words[:-1]), 1, 1, 1))

    async def room(self) -> None:
        """Always room: the fake holds no audio that waits for decoding."""

    async def finish(self) -> Final | None:
        """The words so far as the final (with the engine's `revisions` applied), then `Done`."""
        self.finished = True
        words = [self.engine.revisions.get(word, word) for word in self.words]
        revised = words != self.words
        final = Final(" ".join(words), 1, 1, 1, 1, 0.0, len(self.fed) / 32000, revised) if words else None
        if final is not None:
            self._emit(final)
        self.words = []
        self._emit(Done(1 if final else 0))
        return final

    def set_prompt(self, prompt: str) -> None:
        """Record the prompt."""
        self.prompt = prompt

    def set_site(self, site: str) -> None:
        """Record the site (InvalidSite for a bad one when the engine checks sites)."""
        self.site = self.engine.check_site(site)

    def set_language(self, language: str) -> None:
        """Switch language when the fake engine knows it."""
        self.language = self.engine.check_language(language)

    def set_vocabulary(self, names: tuple[str, ...], terms: tuple[str, ...] = ()) -> None:
        """Record the client's names and terms."""
        self.vocabulary = names + terms

    def set_partials(self, wanted: bool) -> None:
        """Record whether the client reads partials."""
        self.partials = wanted

    def report_error(self, code: str, message: str) -> None:
        """Queue an error in order."""
        self._emit(SessionError(code, message))

    async def events(self) -> AsyncIterator[Event]:
        """Events until closed."""
        while (event := await self._queue.get()) is not None:
            yield event

    def close(self) -> None:
        """Free the slot."""
        if not self.closed:
            self.closed = True
            self.gone.set()
            self._queue.put_nowait(None)

    def _emit(self, event: Event) -> None:
        if self.closed:
            return
        if self.partials or not isinstance(event, Partial):
            self._queue.put_nowait(event)
        for listener in self.engine.listeners:
            listener(self.info, event)


@dataclass
class FakeEngine:
    """An engine that refuses on demand and hands out scripted sessions; the adapters' fake for their tests."""

    languages: tuple[str, ...] = ("en", "de")
    refusal: EngineRefusal | None = None
    # Words the finals hear differently from the partials: {"w2": "wX"}.
    revisions: dict[str, str] = field(default_factory=dict)
    # When set, every partial carries this many characters instead of the words.
    partial_padding: int = 0
    max_open_sessions: int = 1_000
    ready: bool = True
    sessions: list[FakeSession] = field(default_factory=list)
    peers: list[str | None] = field(default_factory=list)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)
    components: dict[str, ComponentState] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    # When set, sites are checked as the real engine checks them (without sites.allowed): InvalidSite.
    check_sites: bool = False

    def check_site(self, site: str) -> str:
        """The site, or InvalidSite when sites are checked and this one is not a valid name."""
        if self.check_sites and not SITE_PATTERN.fullmatch(site):
            raise InvalidSite(f"site {site!r} must be 1 to 64 letters, digits, '_' or '-'")
        return site

    def check_language(self, language: str) -> str:
        """The two-letter code, or UnsupportedLanguage."""
        code = language.lower()[:2]
        if code not in self.languages:
            raise UnsupportedLanguage(f"language {language!r} is not one the model knows")
        return code

    def session(self, request: SessionRequest) -> FakeSession:
        """A new scripted session, or the configured refusal; records the client's address."""
        if self.refusal is not None:
            raise self.refusal
        if len(self.open_sessions) >= self.max_open_sessions:
            raise EngineBusy(f"all {self.max_open_sessions} sessions are in use")
        self.peers.append(request.peer)
        checked_site = self.check_site(request.site or "default")
        session = FakeSession(
            self,
            len(self.sessions) + 1,
            request.source,
            checked_site,
            self.check_language(request.language or "en"),
            request.prompt,
            request.names + request.terms,
            request.partials,
        )
        self.sessions.append(session)
        return session

    @property
    def open_sessions(self) -> list[FakeSession]:
        """Sessions not closed yet."""
        return [session for session in self.sessions if not session.closed]

    def health(self) -> Health:
        """Ready or not, with the open session count."""
        return Health(
            ready=self.ready,
            live=True,
            accepting=self.ready,
            status="ready" if self.ready else "loading model",
            model="fake",
            threads=1,
            workers=1,
            languages=self.languages,
            sessions=len(self.open_sessions),
            max_sessions=8,
            uptime_s=1.0,
            last_decode_s_ago=None,
            decode_queue=0,
            decodes=0,
            components=tuple(self.components.values()),
        )

    def add_listener(self, listener: Listener, *, reads_partials: bool) -> None:
        """Record a listener (the fake's sessions make partials whoever reads them)."""
        self.listeners.append(listener)

    def set_component(self, name: str, state: str, healthy: bool) -> None:
        """Record a component state."""
        self.components[name] = ComponentState(name, state, healthy)

    def set_names(self, source: str, names: tuple[str, ...]) -> None:
        """Record the names a source gave."""
        self.names[source] = names
