"""Wyoming adapter: Home Assistant's speech-to-text protocol (describe, transcribe, audio, transcripts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_get_stdin, async_get_stdout, async_read_event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncStdioServer

from edge_asr import __version__
from edge_asr.api import AudioFormatError, EngineRefusal, SpeechEngine, SpeechSession, refusal_error
from edge_asr.audio import SAMPLE_RATE, SAMPLE_WIDTH
from edge_asr.config import Settings
from edge_asr.events import Done, Final, Partial, SessionError, words_after

_LOGGER = logging.getLogger(__name__)

# A client that announced data or a payload must send it promptly; a stalled one is cut off.
PAYLOAD_TIMEOUT_S = 1.0
MAX_DATA_BYTES = 64 * 1024
# edge-asr has no home page of its own yet; Home Assistant shows the name.
_ATTRIBUTION = Attribution(name="edge-asr", url="")
_WHISPER = Attribution(name="OpenAI", url="https://github.com/openai/whisper")


class ProtocolError(Exception):
    """Bytes that are not a Wyoming event; `code` goes to the client in an error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class GuardedReader:
    """The two reads `wyoming.event.async_read_event` makes, with the checks a server needs.

    Header lines must be JSON objects with a `type` and announce data and payload within the limits;
    announced bytes must arrive within PAYLOAD_TIMEOUT_S.
    """

    def __init__(self, reader: asyncio.StreamReader, max_payload_bytes: int) -> None:
        self._reader = reader
        self._max_payload_bytes = max_payload_bytes

    async def readline(self) -> bytes:
        """A header line, checked."""
        try:
            line = await self._reader.readline()
        except ValueError:  # longer than the stream's line limit
            raise ProtocolError("bad_header", "event header line too long") from None
        if not line:
            return line
        try:
            header: Any = json.loads(line)
        except ValueError:
            raise ProtocolError("bad_json", "event header is not JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("type"), str):
            raise ProtocolError("bad_header", "event header must be a JSON object with a string 'type'")
        for key, limit in (("data_length", MAX_DATA_BYTES), ("payload_length", self._max_payload_bytes)):
            length = header.get(key)
            if length is None:
                continue
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise ProtocolError("bad_header", f"{key} must be a non-negative integer")
            if length > limit:
                raise ProtocolError("too_large", f"{key} {length} exceeds the limit of {limit} bytes")
        if header.get("data") is not None and not isinstance(header["data"], dict):
            raise ProtocolError("bad_header", "data must be a JSON object")
        return line

    async def readexactly(self, count: int) -> bytes:
        """Announced data or payload bytes, or ProtocolError when they stop coming."""
        try:
            return await asyncio.wait_for(self._reader.readexactly(count), PAYLOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError("read_timeout", f"announced {count} bytes did not arrive in time") from None


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
                supports_transcript_streaming=True,
                # The satellite's (or Home Assistant's) VAD decides when a request ends.
                requires_external_vad=True,
                prefers_auto_gain_enabled=True,
                prefers_noise_reduction_enabled=True,
            )
        ]
    )


class WyomingHandler(AsyncEventHandler):
    """One client connection: translates Wyoming events into engine session calls and back."""

    def __init__(
        self, engine: SpeechEngine, settings: Settings, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(reader, writer)
        self._engine = engine
        self._settings = settings
        self._guarded = GuardedReader(reader, settings.limits.max_frame_bytes)
        self._language: str | None = None
        self._site: str | None = None
        self._session: SpeechSession | None = None
        self._responder: asyncio.Task[None] | None = None
        self._converter = AudioChunkConverter(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1)
        self._refused = False

    async def run(self) -> None:
        """Read events until the client leaves or breaks the protocol."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(
                        async_read_event(self._guarded),  # type: ignore[arg-type]
                        self._settings.limits.idle_timeout_s,
                    )
                except ProtocolError as err:
                    await self._error(err.code, str(err))
                    return
                except asyncio.TimeoutError:
                    await self._error("idle_timeout", f"no event for {self._settings.limits.idle_timeout_s:g} s")
                    return
                if event is None:
                    return
                await self.handle_event(event)
        except (ConnectionError, asyncio.IncompleteReadError):
            _LOGGER.debug("Wyoming client went away")
        finally:
            await self._end_request()
            self.writer.close()

    async def handle_event(self, event: Event) -> bool:
        """Answer one event; protocol faults become error events and the connection goes on."""
        try:
            if Describe.is_type(event.type):
                await self._write(model_info(self._settings, self._engine.languages).event())
            elif Ping.is_type(event.type):
                await self._write(Pong(text=Ping.from_event(event).text).event())
            elif Transcribe.is_type(event.type):
                transcribe = Transcribe.from_event(event)
                self._language = transcribe.language
                site = (transcribe.context or {}).get("site")
                self._site = site if isinstance(site, str) and site else None
            elif AudioStart.is_type(event.type):
                await self._start_request(AudioStart.from_event(event))
            elif AudioChunk.is_type(event.type):
                await self._audio(AudioChunk.from_event(event))
            elif AudioStop.is_type(event.type):
                await self._stop_request()
            else:
                await self._error("unknown_event", f"unexpected event type {event.type!r}")
        except (KeyError, TypeError, ValueError) as err:
            await self._error("bad_event", f"malformed {event.type} event: {err!r}")
        return True

    async def _start_request(self, start: AudioStart) -> None:
        await self._end_request()
        self._refused = False
        _check_format(start.rate, start.width, start.channels)
        try:
            session = self._engine.session(
                source="wyoming", language=self._language, split_on_silence=False, site=self._site
            )
        except EngineRefusal as err:
            self._refused = True
            await self._refusal(err)
            return
        self._session = session
        await self._write(TranscriptStart(language=session.language).event())
        self._responder = asyncio.create_task(self._respond(session))

    async def _audio(self, chunk: AudioChunk) -> None:
        if self._session is None:
            if not self._refused:
                await self._error("no_audio_start", "audio-chunk before audio-start")
            return
        _check_format(chunk.rate, chunk.width, chunk.channels)
        if len(chunk.audio) % (chunk.width * chunk.channels):
            await self._error("bad_audio", "audio-chunk is not whole samples; dropped")
            return
        try:
            self._session.feed(self._converter.convert(chunk).audio)
        except AudioFormatError as err:
            await self._refusal(err)

    async def _stop_request(self) -> None:
        if self._session is None:
            if not self._refused:
                await self._error("no_audio_start", "audio-stop before audio-start")
            self._refused = False
            return
        await self._session.finish()
        if self._responder is not None:
            await self._responder
        await self._end_request()

    async def _respond(self, session: SpeechSession) -> None:
        """Committed text as transcript-chunks while audio flows, then transcript and transcript-stop."""
        sent = ""  # committed text of the open utterance already sent as chunks
        finals: list[str] = []
        async for event in session.events():
            if isinstance(event, Partial) and (new := words_after(event.stable, sent)):
                await self._chunk(new, first=not (sent or finals))
                sent = event.stable
            elif isinstance(event, Final):
                # The final may revise committed words: then the chunks stop short, and the transcript says it.
                if new := words_after(event.text, sent):
                    await self._chunk(new, first=not (sent or finals))
                finals.append(event.text)
                sent = ""
            elif isinstance(event, SessionError):
                await self._error(event.code, event.message)
            elif isinstance(event, Done):
                text = " ".join(text for text in finals if text)
                await self._write(Transcript(text=text, language=session.language).event())
                await self._write(TranscriptStop().event())
                return

    async def _chunk(self, words: str, first: bool) -> None:
        """Send words that follow what was sent, so that the chunks add up to the text."""
        await self._write(TranscriptChunk(text=words if first else f" {words}").event())

    async def _end_request(self) -> None:
        if self._responder is not None and not self._responder.done():
            self._responder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._responder
        self._responder = None
        if self._session is not None:
            self._session.close()
            self._session = None
        self._converter = AudioChunkConverter(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1)

    async def _refusal(self, refusal: EngineRefusal) -> None:
        error = refusal_error(refusal)
        await self._error(error.code, error.message)

    async def _error(self, code: str, message: str) -> None:
        _LOGGER.debug("Wyoming error %s: %s", code, message)
        await self._write(Error(text=message, code=code).event())

    async def _write(self, event: Event) -> None:
        with contextlib.suppress(ConnectionError):
            await async_write_event(event, self.writer)


def _check_format(rate: int, width: int, channels: int) -> None:
    if not (isinstance(rate, int) and 1000 <= rate <= 192_000):
        raise ValueError(f"rate {rate!r} is not a sample rate")
    if width not in (1, 2, 4):
        raise ValueError(f"width {width!r} is not 1, 2 or 4 bytes")
    if not (isinstance(channels, int) and 1 <= channels <= 8):
        raise ValueError(f"channels {channels!r} is not 1 to 8")


class WyomingAdapter:
    """The Wyoming server (tcp://, unix:// or stdio://) on the service's event loop."""

    name = "wyoming"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._server = AsyncServer.from_uri(settings.wyoming.uri)
        self._stdio: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen; `describe` is answered from now on, also while the model loads."""
        factory = partial(WyomingHandler, self._engine, self._settings)
        if isinstance(self._server, AsyncStdioServer):
            # wyoming's stdio server reads events itself and takes over SIGTERM; serve it like a socket.
            reader = await async_get_stdin()
            writer = await async_get_stdout()
            self._stdio = asyncio.create_task(factory(reader, writer).run())
        else:
            await self._server.start(factory)
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
        """Stop listening and close the connections."""
        await self._server.stop()
        if self._stdio is not None:
            self._stdio.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stdio
