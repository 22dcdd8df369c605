"""Wyoming adapter: Home Assistant's speech-to-text protocol (describe, transcribe, audio, transcripts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeGuard, TypeVar
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop, VadSensitivity
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_get_stdin, async_get_stdout, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncStdioServer

from adapters.wire_json import NotJson, TooDeep, load_json
from edge_asr import __version__
from edge_asr.api import (
    AudioFormatError,
    EngineRefusal,
    SessionRequest,
    SpeechEngine,
    SpeechSession,
    is_text,
    refusal_error,
    request_names,
)
from edge_asr.audio import PcmConverter
from edge_asr.config import AUTO_LANGUAGE, ConfigError, Settings, WyomingSettings
from edge_asr.endpointing import Sensitivity
from edge_asr.events import Done, Final, Partial, SessionError, quoted, words_after

from .access import IPAddress, network_allowed, parse_address, parse_networks
from .proxy_protocol import ProxyHeaderError, read_proxy_header
from .pump import SessionPump, limit_send_buffer

_LOGGER = logging.getLogger(__name__)

# A client that announced data or a payload must send it promptly; a stalled one is cut off.
PAYLOAD_TIMEOUT_S = 1.0
MAX_DATA_BYTES = 64 * 1024
# Converted audio may be this many times `limits.max_frame_bytes` (8-bit 1 kHz becomes 32 times its size).
MAX_EXPANSION = 32
# The audio formats taken: rates in Hz, sample widths in bytes, channel counts.
MIN_RATE, MAX_RATE = 1_000, 192_000
WIDTHS = (1, 2, 4)
MAX_CHANNELS = 32
# edge-asr has no home page of its own yet; Home Assistant shows the name.
_ATTRIBUTION = Attribution(name="edge-asr", url="")
_WHISPER = Attribution(name="OpenAI", url="https://github.com/openai/whisper")
_Audio = TypeVar("_Audio", AudioStart, AudioChunk)


class ProtocolError(Exception):
    """Input the adapter refuses; `code` goes to the client in an error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EventReader:
    """Wyoming's wire format, read and checked: a header line of JSON (`type`, an optional `data` object,
    optional `data_length` and `payload_length`), then `data_length` bytes of a JSON object merged into
    `data`, then `payload_length` bytes of payload.

    `read` raises ProtocolError for bytes after which the stream cannot be trusted to be in step again:
    the connection must close. The event's fields are the handler's to check.
    """

    def __init__(self, reader: asyncio.StreamReader, max_payload_bytes: int) -> None:
        self._reader = reader
        self._max_payload_bytes = max_payload_bytes

    async def read(self) -> Event | None:
        """The next event, or None at the end of the stream."""
        try:
            line = await self._reader.readline()
        except ValueError:  # longer than the stream's line limit
            raise ProtocolError("bad_header", "event header line too long") from None
        if not line:
            return None
        header = _json_object(line, "event header", not_json="bad_json", not_object="bad_header")
        event_type = header.get("type")
        if not isinstance(event_type, str):
            raise ProtocolError("bad_header", "event header must have a string 'type'")
        data = header.get("data", {})
        if not isinstance(data, dict):
            raise ProtocolError("bad_header", "event header 'data' must be a JSON object")
        data_length = _length(header, "data_length", MAX_DATA_BYTES)
        payload_length = _length(header, "payload_length", self._max_payload_bytes)
        if data_length:
            block = await self._exactly(data_length)
            data = {**data, **_json_object(block, "data block", not_json="bad_data", not_object="bad_data")}
        payload = await self._exactly(payload_length) if payload_length else None
        return Event(type=event_type, data=data, payload=payload)

    async def _exactly(self, count: int) -> bytes:
        """Announced bytes, or ProtocolError when they stop coming."""
        try:
            return await asyncio.wait_for(self._reader.readexactly(count), PAYLOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError("read_timeout", f"announced {count} bytes did not arrive in time") from None


def _json_object(raw: bytes, what: str, not_json: str, not_object: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object of at most MAX_JSON_DEPTH levels, else ProtocolError with one of the codes."""
    try:
        value = load_json(raw)
    except NotJson:
        raise ProtocolError(not_json, f"{what} is not JSON") from None
    except TooDeep as err:
        raise ProtocolError(not_object, f"{what} {err}") from None
    if not isinstance(value, dict):
        raise ProtocolError(not_object, f"{what} must be a JSON object")
    return value


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    """A header's announced byte count (0 when absent), checked against `limit`."""
    length = header.get(key)
    if length is None:
        return 0
    if not _is_int(length) or length < 0:
        raise ProtocolError("bad_header", f"{key} must be a non-negative integer")
    if length > limit:
        raise ProtocolError("too_large", f"{key} {length} exceeds the limit of {limit} bytes")
    return length


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (JSON's true and false are bools in Python, and bools are ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_text(value: object, key: str) -> str | None:
    """A field that is a string, or None when absent or null; ProtocolError `bad_event` for anything else."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_event", f"{key} must be a string")
    if not is_text(value):
        raise ProtocolError("bad_event", f"{key} is not valid Unicode text")
    return value


@dataclass(frozen=True)
class _Request:
    """What a `transcribe` asks of the requests that follow: their language, site and names (Wyoming 1.10's
    transcript_names, then transcript_terms, bias the transcription) and how soon their command ends (its
    vad_sensitivity)."""

    language: str | None = None
    site: str | None = None
    names: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()
    sensitivity: Sensitivity = "default"


def _request_of(event: Event) -> _Request:
    """A `transcribe`, parsed by the library and checked where it checks nothing; ProtocolError `bad_event`."""
    transcribe = Transcribe.from_event(event)
    language = _optional_text(transcribe.language, "language")
    context: object = {} if transcribe.context is None else transcribe.context
    if not isinstance(context, dict):
        raise ProtocolError("bad_event", "context must be a JSON object")
    site = _optional_text(context.get("site"), "site")
    try:
        names = request_names(transcribe.transcript_names, "transcript_names")
        terms = request_names(transcribe.transcript_terms, "transcript_terms")
    except ValueError as err:
        raise ProtocolError("bad_event", str(err)) from None
    return _Request(language or None, site or None, names, terms, _sensitivity(transcribe.vad_sensitivity))


def _sensitivity(value: object) -> Sensitivity:
    """Wyoming's vad_sensitivity (the library makes a known one its enum); ProtocolError `bad_event` otherwise."""
    if value is None:
        return "default"
    if value is VadSensitivity.RELAXED:
        return "relaxed"
    if value is VadSensitivity.AGGRESSIVE:
        return "aggressive"
    if value is VadSensitivity.DEFAULT:
        return "default"
    known = ", ".join(sensitivity.value for sensitivity in VadSensitivity)
    raise ProtocolError("bad_event", f"vad_sensitivity must be one of {known}")


def _known_language(language: str) -> str | None:
    """A session's language as Wyoming names it: None while the model is still to hear it."""
    return None if language == AUTO_LANGUAGE else language


def _audio_of(kind: type[_Audio], event: Event) -> _Audio:
    """An audio-start or audio-chunk, parsed by the library, whose format the adapter can convert; ProtocolError
    `bad_event` for one it cannot."""
    # The library checks none of the fields, and takes a missing one for a bug (KeyError): it is refused here.
    audio = kind.from_event(
        Event(event.type, {"rate": None, "width": None, "channels": None, **event.data}, event.payload)
    )
    rate, width, channels = audio.rate, audio.width, audio.channels
    if not (_is_int(rate) and MIN_RATE <= rate <= MAX_RATE):
        raise ProtocolError("bad_event", f"rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz")
    if not (_is_int(width) and width in WIDTHS):
        raise ProtocolError("bad_event", f"width must be one of {', '.join(map(str, WIDTHS))} bytes")
    if not (_is_int(channels) and 1 <= channels <= MAX_CHANNELS):
        raise ProtocolError("bad_event", f"channels must be an integer from 1 to {MAX_CHANNELS}")
    return audio


async def _last_resort(step: Awaitable[None]) -> None:
    """Await one step of a connection's life; whatever it raises ends that step only and is logged at DEBUG
    by class, never with the input behind it (no input can leave a traceback in the log)."""
    try:
        await step
    except (ConnectionError, asyncio.IncompleteReadError):
        _LOGGER.debug("Wyoming client went away")
    except Exception as err:
        _LOGGER.debug("Wyoming connection: unexpected %s", type(err).__name__)


def _peer_address(writer: asyncio.StreamWriter) -> IPAddress | None:
    """The address of a TCP peer; None for a unix socket or stdio, whose clients are local."""
    connection = writer.get_extra_info("socket")
    if connection is None or connection.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    peer = writer.get_extra_info("peername")
    address = None if peer is None else parse_address(str(peer[0]))
    if address is None:  # asyncio could not ask the socket: the client left at once
        raise ConnectionResetError("the client went away before it was served")
    return address


class _Gate:
    """Who may connect (`wyoming.allowed_networks`), whose PROXY header names the client
    (`wyoming.trusted_proxies`), and the open connections (at most `wyoming.max_connections`)."""

    def __init__(self, settings: WyomingSettings) -> None:
        self._allowed = parse_networks(settings.allowed_networks)
        self._trusted = parse_networks(settings.trusted_proxies)
        self.limit = settings.max_connections
        self._open: set[WyomingHandler] = set()

    def check_allowed(self, client: IPAddress) -> None:
        """ProtocolError `forbidden` for a client that may not be served."""
        if not network_allowed(client, self._allowed):
            raise ProtocolError("forbidden", f"{client} is not in wyoming.allowed_networks")

    def trusts(self, address: IPAddress) -> bool:
        """Whether a peer at this address is a balancer that sends a PROXY header first."""
        return network_allowed(address, self._trusted)

    def admit(self, handler: WyomingHandler) -> bool:
        """Count a new connection in; at the cap it takes the place of the connection idle longest (one with a
        request under way is not idle), and is refused when none is idle."""
        if len(self._open) >= self.limit:
            idle = [(since, other) for other in self._open if (since := other.idle_since) is not None]
            if not idle:
                return False
            _since, oldest = min(idle, key=lambda pair: pair[0])
            self._open.discard(oldest)
            oldest.evict()
        self._open.add(handler)
        return True

    def release(self, handler: WyomingHandler) -> None:
        """A connection ended (or was evicted)."""
        self._open.discard(handler)

    def answering(self) -> list[asyncio.Task[bool]]:
        """The open connections' answers to requests under way."""
        return [task for handler in self._open if (task := handler.answering) is not None]


def model_info(settings: Settings, languages: tuple[str, ...]) -> Info:
    """The `info` answer: one ASR program with the configured model and its real languages."""
    return Info(
        asr=[
            AsrProgram(
                name="edge-asr",
                description="Streaming Whisper speech-to-text: transcribes while you speak",
                attribution=_ATTRIBUTION,
                installed=True,
                version=__version__,
                models=[
                    AsrModel(
                        name=settings.model.name,
                        description=f"Whisper {settings.model.name} ({settings.model.compute_type}, CTranslate2)",
                        attribution=_WHISPER,
                        installed=True,
                        version=None,
                        languages=list(languages),
                    )
                ],
                supports_transcript_streaming=settings.wyoming.transcript_chunks,
                # With endpointing the service ends each command itself; without, the satellite's (or Home
                # Assistant's) voice-activity detection sends audio-stop.
                requires_external_vad=not settings.wyoming.endpointing,
                prefers_auto_gain_enabled=True,
                prefers_noise_reduction_enabled=True,
            )
        ]
    )


class WyomingHandler(AsyncEventHandler):
    """One client connection: translates Wyoming events into engine session calls and back."""

    def __init__(
        self,
        engine: SpeechEngine,
        settings: Settings,
        gate: _Gate,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(reader, writer)
        self._engine = engine
        self._limits = settings.limits
        self._settings = settings
        self._gate = gate
        self._events = EventReader(reader, settings.limits.max_frame_bytes)
        self._pump = SessionPump(settings.limits, "Wyoming client")
        self._last_event_at = time.monotonic()
        # A connected client must send its first event (after the PROXY header, if any) by then; stdio has no
        # client that connects.
        self._handshake_deadline: float | None = None
        connection = writer.get_extra_info("socket")
        if connection is not None:
            self._handshake_deadline = self._last_event_at + self._limits.handshake_timeout_s
            limit_send_buffer(connection)
        # The client's address (the peer's, or the one a trusted balancer's PROXY header names); None when local.
        self._client: IPAddress | None = None
        self._request = _Request()
        self._session: SpeechSession | None = None
        self._responder: asyncio.Task[bool] | None = None
        self._converter = PcmConverter()
        # The open request was refused: its audio is ignored and its audio-stop answered with an empty transcript.
        self._refused = False

    async def run(self) -> None:
        """Serve events until the client leaves, breaks the framing or stops reading; then finish what it
        left open for the listeners and free its session. Never raises."""
        try:
            await _last_resort(self._serve())
        finally:
            self._gate.release(self)
            await _last_resort(self._hang_up())
            await _last_resort(self._abandon_request())

    @property
    def answering(self) -> asyncio.Task[bool] | None:
        """The task that answers the open request (its transcript and transcript-stop), while it runs."""
        responder = self._responder
        return None if responder is None or responder.done() else responder

    @property
    def idle_since(self) -> float | None:
        """When the client last sent an event (or connected), while no request is open; None during one."""
        # A request holds its place once the engine took it: sessions are capped, so idle clients cannot hold
        # the connections (a transcribe alone, or a refused request, does not).
        return None if self._session is not None else self._last_event_at

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        if self.writer.transport.get_write_buffer_size():
            # It does not take what it was sent, so it would not take why it is closed either; and its handler
            # may wait in a write until the send timeout, keeping the socket that should make room.
            self.writer.transport.abort()
            return
        # The read the connection waits in fails with this; the handler answers with it and closes.
        self.reader.set_exception(
            ProtocolError("too_many_connections", "an idle connection is closed to make room for a new one")
        )

    async def _serve(self) -> None:
        try:
            await self._admit()
            while not self.writer.transport.is_closing():  # closing: cut off (or the server stops)
                event = await self._next_event()
                if event is None:
                    return
                await self.handle_event(event)
        except ProtocolError as err:
            await self._error(err.code, str(err))

    async def _admit(self) -> None:
        """The allow-list and the connection cap; from a trusted balancer, its PROXY header first, and the
        allow-list for the client it names. ProtocolError when the connection may not go on."""
        peer = _peer_address(self.writer)
        trusted = peer is not None and self._gate.trusts(peer)
        if peer is not None and not trusted:
            self._gate.check_allowed(peer)
        if not self._gate.admit(self):
            raise ProtocolError("too_many_connections", f"all {self._gate.limit} connections are in use")
        if peer is None or not trusted:
            self._client = peer
            return
        try:
            carried = await asyncio.wait_for(read_proxy_header(self.reader), self._handshake_left())
        except ProxyHeaderError as err:
            raise ProtocolError("bad_proxy_header", str(err)) from None
        except asyncio.TimeoutError:
            raise self._handshake_expired() from None
        self._client = peer if carried is None else carried
        self._gate.check_allowed(self._client)

    async def _next_event(self) -> Event | None:
        """The next event within `limits.idle_timeout_s`, the first one within `limits.handshake_timeout_s` of
        the connection; None at the end of the stream."""
        timeout = self._limits.idle_timeout_s
        expired = ProtocolError("idle_timeout", f"no event for {timeout:g} s")
        if self._handshake_deadline is not None and self._handshake_left() < timeout:
            # Before the first event there is no session, so only the read can meet this deadline.
            timeout, expired = self._handshake_left(), self._handshake_expired()
        try:
            event = await self._pump.receive(self._session, self._events.read, timeout)
        except asyncio.TimeoutError:
            raise expired from None
        self._handshake_deadline = None
        self._last_event_at = time.monotonic()
        return event

    def _handshake_left(self) -> float:
        assert self._handshake_deadline is not None  # only sockets have a handshake
        return max(0.0, self._handshake_deadline - time.monotonic())

    def _handshake_expired(self) -> ProtocolError:
        return ProtocolError("handshake_timeout", f"no event within {self._limits.handshake_timeout_s:g} s")

    async def handle_event(self, event: Event) -> bool:
        """Answer one event; a malformed or misplaced one gets an error event and the connection goes on."""
        try:
            await self._dispatch(event)
        except ProtocolError as err:
            await self._error(err.code, str(err))
        return True

    async def _dispatch(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self._write(model_info(self._settings, self._engine.languages).event())
        elif Ping.is_type(event.type):
            await self._write(Pong(text=_optional_text(Ping.from_event(event).text, "text")).event())
        elif Transcribe.is_type(event.type):
            self._request = _request_of(event)
        elif AudioStart.is_type(event.type):
            await self._start_request(event)
        elif AudioChunk.is_type(event.type):
            await self._audio(event)
        elif AudioStop.is_type(event.type):
            await self._stop_request()
        else:
            raise ProtocolError("unknown_event", f"unexpected event type {quoted(event.type)}")

    async def _start_request(self, event: Event) -> None:
        await self._end_request()
        self._converter = PcmConverter()
        # Until a session takes the request, it is refused: its audio-stop still gets a transcript.
        self._refused = True
        _audio_of(AudioStart, event)  # each chunk announces its own format; a bad one here refuses the request
        request = self._request
        try:
            session = self._engine.session(
                SessionRequest(
                    source="wyoming",
                    language=request.language,
                    split_on_silence=False,
                    site=request.site,
                    peer=None if self._client is None else str(self._client),
                    names=request.names,
                    terms=request.terms,
                    endpointing=self._settings.wyoming.endpointing,
                    vad_sensitivity=request.sensitivity,
                    partials=self._settings.wyoming.transcript_chunks,
                )
            )
        except EngineRefusal as err:
            await self._refusal(err)
            return
        self._refused = False
        self._session = session
        await self._write(TranscriptStart(language=_known_language(session.info.language)).event())
        self._responder = asyncio.create_task(self._respond(session))

    async def _audio(self, event: Event) -> None:
        """Convert a chunk (in the format it announces) to 16 kHz mono and feed it; a bad chunk is dropped."""
        if self._session is None:
            if self._refused:
                return
            raise ProtocolError("no_audio_start", "audio-chunk before audio-start")
        chunk = _audio_of(AudioChunk, event)
        limit = self._limits.max_frame_bytes * MAX_EXPANSION
        if PcmConverter.converted_size(len(chunk.audio), chunk.rate, chunk.width, chunk.channels) > limit:
            raise ProtocolError("too_large", f"audio-chunk converts to more than {limit} bytes; dropped")
        try:
            pcm16 = self._converter.convert(chunk.audio, chunk.rate, chunk.width, chunk.channels)
        except ValueError as err:  # not whole frames
            raise ProtocolError("bad_audio", f"audio-chunk dropped: {err}") from None
        try:
            self._session.feed(pcm16)
        except AudioFormatError as err:
            await self._refusal(err)

    async def _stop_request(self) -> None:
        if self._session is None:
            if not self._refused:
                raise ProtocolError("no_audio_start", "audio-stop before audio-start")
            self._refused = False
            # Home Assistant ignores the error and waits for a transcript: it gets an empty one at once.
            await self._answer("", self._request.language)
            return
        session = self._session
        await session.finish()
        if self._responder is not None and not await self._responder:
            # The engine closed the session mid-request (it broke, after an error event): Home Assistant still waits
            # for a transcript, and an empty one tells it that nothing was understood.
            await self._answer("", _known_language(session.info.language))
        await self._end_request()

    async def _answer(self, text: str, language: str | None) -> None:
        """End a request: its transcript, then transcript-stop."""
        await self._write(Transcript(text=text, language=language).event())
        await self._write(TranscriptStop().event())

    async def _respond(self, session: SpeechSession) -> bool:
        """Committed text as transcript-chunks while audio flows (with wyoming.transcript_chunks; the session makes
        partials only then), then transcript and transcript-stop; whether it
        got that far (it does not when the session closes before its `Done`)."""
        sent = ""  # committed text of the open utterance already sent as chunks
        finals: list[str] = []
        language = _known_language(session.info.language)
        async for event in session.events():
            if isinstance(event, Partial) and (new := words_after(event.stable, sent)):
                await self._chunk(new, first=not (sent or finals))
                sent = event.stable
            elif isinstance(event, Final):
                # The final may revise committed words: then the chunks stop short, and the transcript says it.
                if self._settings.wyoming.transcript_chunks and (new := words_after(event.text, sent)):
                    await self._chunk(new, first=not (sent or finals))
                finals.append(event.text)
                language = event.language or language
                sent = ""
            elif isinstance(event, SessionError):
                await self._error(event.code, event.message)
            elif isinstance(event, Done):
                # The request is over: free its session slot before the satellite, told so, opens the next one
                # (a satellite that is quick to ask again must not find its own slot still taken).
                session.close()
                await self._answer(" ".join(text for text in finals if text), language)
                return True
        return False

    async def _chunk(self, words: str, first: bool) -> None:
        """Send words that follow what was sent, so that the chunks add up to the text."""
        await self._write(TranscriptChunk(text=words if first else f" {words}").event())

    async def _abandon_request(self) -> None:
        """The connection ended mid-request: finish what was said for the listeners, then free the session."""
        try:
            if self._session is not None:
                await self._pump.finish_orphan(self._session)
        finally:
            # Whatever the finish raised, the session's slot must not outlive the connection.
            await self._end_request()

    async def _end_request(self) -> None:
        """Free the request's session, then stop its responder (awaited, so that nothing it raised goes unseen)."""
        session, self._session = self._session, None
        responder, self._responder = self._responder, None
        if session is not None:
            session.close()
        if responder is not None:
            responder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await responder

    async def _refusal(self, refusal: EngineRefusal) -> None:
        error = refusal_error(refusal)
        await self._error(error.code, error.message)

    async def _error(self, code: str, message: str) -> None:
        _LOGGER.debug("Wyoming error %s: %s", code, message)
        await self._write(Error(text=message, code=code).event())

    async def _write(self, event: Event) -> None:
        """Send an event within `limits.send_timeout_s`, or cut the client off; a gone client is no error."""
        if self.writer.transport.is_closing():
            return
        try:
            if not await self._pump.send(async_write_event(event, self.writer)):
                self._cut_off()
        except OSError:
            _LOGGER.debug("Wyoming client went away before an event reached it")

    async def _hang_up(self) -> None:
        """Close once what is buffered reached the operating system, within `limits.send_timeout_s`."""
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            # Without a high-water mark, drain waits for an empty buffer.
            transport.set_write_buffer_limits(high=0)
            try:
                if not await self._pump.send(self.writer.drain()):
                    self._cut_off()
                    return
            except OSError:
                _LOGGER.debug("Wyoming client went away before its last events reached it")
        self.writer.close()

    def _cut_off(self) -> None:
        """Drop a client that does not read: its buffered events, its connection, and (as it ends) its session."""
        self.writer.transport.abort()
        # Sockets see their end through the transport; this also ends a stdio reader.
        self.reader.feed_eof()


class WyomingAdapter:
    """The Wyoming server (tcp://, unix:// or stdio://) on the service's event loop."""

    name = "wyoming"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._server = AsyncServer.from_uri(settings.wyoming.uri)
        self._stdio: asyncio.Task[None] | None = None
        self._gate = _Gate(settings.wyoming)

    async def start(self) -> None:
        """Listen; `describe` is answered from now on, also while the model loads."""
        factory = partial(WyomingHandler, self._engine, self._settings, self._gate)
        if isinstance(self._server, AsyncStdioServer):
            # wyoming's stdio server reads events itself and takes over SIGTERM; serve it like a socket.
            reader = await async_get_stdin()
            writer = await async_get_stdout()
            self._stdio = asyncio.create_task(factory(reader, writer).run())
        else:
            try:
                await self._server.start(factory)
            except OSError as err:
                raise ConfigError(
                    f"wyoming.uri: cannot listen on {self._settings.wyoming.uri}: {err.strerror or err}"
                ) from None
        _LOGGER.info("Wyoming on %s", self._settings.wyoming.uri)
        if self._settings.wyoming.zeroconf:
            await self._announce(self._settings.wyoming.zeroconf)

    async def _announce(self, name: str) -> None:
        """Register `_wyoming._tcp.local.`; a failure is logged and the service runs on undiscovered."""
        port = urlsplit(self._settings.wyoming.uri).port
        assert port is not None  # the config check guarantees a tcp:// URI with a port
        try:
            from wyoming.zeroconf import HomeAssistantZeroconf

            await HomeAssistantZeroconf(port=port, name=name).register_server()
        except ImportError:
            _LOGGER.error("wyoming.zeroconf: install the zeroconf extra (pip install 'edge-asr[zeroconf]')")
        except OSError as err:
            _LOGGER.error("wyoming.zeroconf: cannot announce the service: %s", err)
        else:
            _LOGGER.info("Announced as %s._wyoming._tcp.local.", name)

    async def stop(self) -> None:
        """Let the answers to requests under way go out (the drain finalised their speech), then stop listening and
        close the connections."""
        answers = self._gate.answering()
        if answers:
            await asyncio.wait(answers, timeout=self._settings.limits.send_timeout_s)
        await self._server.stop()
        if self._stdio is not None:
            self._stdio.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stdio
