"""Property-based tests: generated and mutated input drives the Wyoming adapter over real sockets (against a fake
engine). Whatever comes in, every fault gets an error event (and a close where the stream cannot go on), nothing
reaches the log as a traceback, every session is freed, and the next client is served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeGuard

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wyoming.error import Error
from wyoming.event import Event, async_read_event

import adapters.wyoming
from adapters.wyoming import MAX_CHANNELS, MAX_RATE, MIN_RATE, WIDTHS
from edge_asr.config import SITE_PATTERN
from edge_asr.endpointing import SENSITIVITY_SCALE

from .fakes import FakeEngine
from .wyoming_client import (
    END,
    END_MARK,
    assert_answered,
    assert_no_tracebacks,
    json_values,
    serving,
    wire_event,
    wire_inputs,
)

pytestmark = [pytest.mark.fast, pytest.mark.asyncio(loop_scope="module")]

WAIT_S = 5.0
# Announced bytes that do not come are waited for this long here (1 s in service), to keep examples quick.
PAYLOAD_TIMEOUT_S = 0.05
# A server quiet this long (many payload timeouts) is waiting for a header, not for announced bytes.
QUIET_S = 1.0
FUZZ = settings(
    max_examples=75,
    deadline=None,
    # caplog is per test, not per example: each example looks only at the records it added.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# What a transcribe's vad_sensitivity may be (Wyoming 1.10's, as Home Assistant sends it).
SENSITIVITIES = tuple(SENSITIVITY_SCALE)
REQUEST_TYPES = ("describe", "ping", "transcribe", "audio-start", "audio-chunk", "audio-stop")


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test checks at its end that nothing reached the log at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[tuple[FakeEngine, int]]:
    """One adapter and fake engine for every example of the module."""
    engine = FakeEngine(check_sites=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapters.wyoming, "PAYLOAD_TIMEOUT_S", PAYLOAD_TIMEOUT_S)
        async with serving(engine) as port:
            yield engine, port


async def _exchange(port: int, data: bytes) -> tuple[list[Event], bool]:
    """Send `data`, then END twice; the events up to END's pong or the server's close, and whether it closed.
    AssertionError when neither comes within WAIT_S, or a quiet server does not answer one more END."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    events: list[Event] = []
    read: asyncio.Future[Event | None] | None = None
    nudged = False
    try:
        await _send(writer, data + END + END)
        while True:
            # Waited for without cancelling: a read cut off mid-event would lose the bytes it took.
            read = read or asyncio.ensure_future(async_read_event(reader))
            left = deadline - loop.time()
            done, _ = await asyncio.wait({read}, timeout=left if nudged else min(QUIET_S, left))
            if not done:
                if nudged or loop.time() >= deadline:
                    raise AssertionError(f"neither END's pong nor a close within {WAIT_S} s; got {events}")
                # A well-framed event's payload may take in both ENDs: the server rightly answers it and waits for
                # a header. Once quiet it can be waiting for nothing else, so one more END must be read as one and
                # answered with its pong.
                nudged = True
                await _send(writer, END)
                continue
            finished, read = read, None
            try:
                event = finished.result()
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                event = None
            if event is None:
                # A server that took the END sent when it was quiet for anything but a header was still waiting
                # for announced bytes.
                assert not nudged, f"closed after an END sent to a quiet connection; got {events}"
                return events, True
            events.append(event)
            if event.type == "pong" and event.data.get("text") == END_MARK:
                return events, False
    finally:
        if read is not None:
            read.cancel()
        writer.close()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write and drain; the server may close before it read everything."""
    writer.write(data)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _served(port: int) -> str:
    """The transcript of a normal request on a new connection."""
    start = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
    chunk = wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(640))
    request = wire_event("transcribe", {"language": "en"}) + start + chunk * 2 + wire_event("audio-stop")
    events, closed = await _exchange(port, request)
    assert not closed
    [transcript] = [e for e in events if e.type == "transcript"]
    return str(transcript.data["text"])


async def _all_sessions_closed(engine: FakeEngine) -> bool:
    """Whether every session the engine opened is closed, waiting for the ones still closing."""
    try:
        await asyncio.wait_for(asyncio.gather(*(s.gone.wait() for s in engine.open_sessions)), WAIT_S)
    except asyncio.TimeoutError:
        return False
    return True


async def _check(server: tuple[FakeEngine, int], caplog: pytest.LogCaptureFixture, data: bytes) -> list[Event]:
    """The invariant for any input; the events it got, for more specific checks."""
    engine, port = server
    first_record = len(caplog.records)
    events, closed = await _exchange(port, data)

    assert_answered(events, closed)
    assert await _all_sessions_closed(engine)
    assert await _served(port) == "w1 w2"
    # A task that died unseen shows once collected: the collection (slow) waits for the end of the test.
    assert not [r.getMessage() for r in caplog.records[first_record:] if r.levelno >= logging.WARNING]
    return events


def _codes(events: list[Event]) -> list[str]:
    return [str(Error.from_event(e).code) for e in events if Error.is_type(e.type)]


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _block_event(event_type: str, block: bytes) -> bytes:
    """An event with a data block of exactly these bytes."""
    return json.dumps({"type": event_type, "data_length": len(block)}).encode() + b"\n" + block


_NO_NEWLINE = st.binary(max_size=120).map(lambda line: line.replace(b"\n", b""))
_OBJECT_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(REQUEST_TYPES), json_values(2)),
        "data": json_values(4),
        "data_length": st.one_of(st.integers(-2, 16), json_values(2)),
        "payload_length": st.one_of(st.integers(-2, 16), json_values(2)),
    },
).map(lambda header: json.dumps(header).encode())


@FUZZ
@given(line=st.one_of(json_values().map(lambda value: json.dumps(value).encode()), _OBJECT_HEADERS, _NO_NEWLINE))
@example(line=b"[" * 5_000 + b"]" * 5_000)
@example(line=b"[" * 100_000 + b"]" * 100_000)
@example(line=json.dumps({"type": "transcribe", "data": {"context": {"deep": _nested(40)}}}).encode())
@example(line=json.dumps({"type": "transcribe", "data": None}).encode())
async def test_any_header_line_is_answered_or_refused_with_an_error_then_a_close(
    server: tuple[FakeEngine, int], caplog: pytest.LogCaptureFixture, line: bytes
) -> None:
    events = await _check(server, caplog, line + b"\n")

    expected: str | None
    try:
        header = json.loads(line + b"\n")
    except RecursionError:
        expected = "bad_header"
    except ValueError:  # the server reads the same bytes the same way
        expected = "bad_json"
    else:
        expected = None if isinstance(header, dict) else "bad_header"
    if expected is not None:
        assert _codes(events) == [expected]
        assert events[-1].type == "error", "a header the stream cannot go on after closes the connection"


@FUZZ
@given(data=wire_inputs())
@example(data=_block_event("transcribe", b"null"))
@example(data=_block_event("transcribe", b"[1, 2]"))
@example(data=_block_event("transcribe", b"42"))
@example(data=_block_event("transcribe", json.dumps({"deep": _nested(40)}).encode()))
@example(data=wire_event("transcribe", {"language": 5}))
@example(data=wire_event("transcribe", {"language": "en", "context": "kitchen"}))
@example(data=wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}) + b"\xff" * 3)
# Payloads that end exactly where the two ENDs end: an unknown event (the shrunk input) and known ones.
@example(data=b'{"type":"","data_length":2,"payload_length":124}\n{}\x00\x00\x00\x00\x00\x00\x00\x00')
@example(data=json.dumps({"type": "describe", "payload_length": 2 * len(END)}).encode() + b"\n")
@example(data=json.dumps({"type": "ping", "payload_length": 2 * len(END)}).encode() + b"\n")
async def test_mutated_and_misframed_input_is_answered_or_refused_with_an_error_then_a_close(
    server: tuple[FakeEngine, int], caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    await _check(server, caplog, data)


_USABLE_FORMATS = st.fixed_dictionaries(
    {
        "rate": st.sampled_from([8000, 16000, 22050, 44100, 48000]),
        "width": st.sampled_from(WIDTHS),
        "channels": st.integers(1, 3),
    }
)
_FORMAT_VALUES = st.integers(-10, 300_000) | json_values(2)


@st.composite
def _format_fields(draw: st.DrawFn) -> dict[str, Any]:
    """`rate`, `width` and `channels`: a usable format, some of whose fields may be missing or wrong."""
    fields: dict[str, Any] = draw(_USABLE_FORMATS)
    for key in draw(st.sets(st.sampled_from(sorted(fields)))):
        if draw(st.booleans()):
            del fields[key]
        else:
            fields[key] = draw(_FORMAT_VALUES)
    return fields


Generated = tuple[str, dict[str, Any], bytes]


@st.composite
def _events(draw: st.DrawFn) -> Generated:
    """One event of a known or unknown type, with fields that may be right or wrong."""
    kind = draw(st.sampled_from([*REQUEST_TYPES, "audio-chunk", "audio-chunk", "unknown"]))
    payload = b""
    if kind == "ping":
        data = draw(st.fixed_dictionaries({}, optional={"text": st.text(max_size=8) | json_values(2)}))
    elif kind == "transcribe":
        names = st.sampled_from(["kitchen", "living_room", "", "no spaces", "ü"]) | st.text(max_size=8)
        site = st.fixed_dictionaries({}, optional={"site": names | json_values(2)})
        language = st.sampled_from(["en", "de", "EN-us", "fr", ""]) | json_values(2)
        sensitivity = st.sampled_from([*SENSITIVITIES, "RELAXED", "sleepy"]) | json_values(2)
        data = draw(
            st.fixed_dictionaries(
                {},
                optional={"language": language, "context": site | json_values(2), "vad_sensitivity": sensitivity},
            )
        )
    elif kind in ("audio-start", "audio-chunk"):
        data = draw(_format_fields())
        if kind == "audio-chunk":
            frame = _frame_bytes(data)
            whole = st.integers(0, 8).map(lambda frames: bytes(frames * frame)) if frame else st.just(b"")
            payload = draw(whole | st.binary(max_size=64))
    elif kind == "unknown":
        kind = draw(st.text(max_size=12).filter(lambda name: name not in REQUEST_TYPES))
        data = draw(st.dictionaries(st.text(max_size=6), json_values(2), max_size=2))
    else:
        data = {}
    return kind, data, payload


def _frame_bytes(data: dict[str, Any]) -> int:
    """The bytes of one frame of a usable format, else 0."""
    rate, width, channels = data.get("rate"), data.get("width"), data.get("channels")
    if not (_is_int(rate) and _is_int(width) and _is_int(channels)):
        return 0
    usable = MIN_RATE <= rate <= MAX_RATE and width in WIDTHS and 1 <= channels <= MAX_CHANNELS
    return width * channels if usable else 0


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _wire(kind: str, data: dict[str, Any], payload: bytes, in_block: bool) -> bytes:
    """The event's bytes, its data in the header or in a data block (as the wyoming package writes it)."""
    if not in_block:
        return wire_event(kind, data, payload)
    block = json.dumps(data).encode()
    header: dict[str, object] = {"type": kind, "data_length": len(block)}
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + block + payload


def _expected_answers(events: list[Generated]) -> list[str]:
    """What the adapter must answer, in order (transcript-chunks aside, which follow the decoding): the
    README's rules applied to the fake engine, which knows en and de, checks site names, and hears a word per
    chunk."""
    answers: list[str] = []
    language: str | None = None
    site: str | None = None
    words: int | None = None  # the open request's chunks; None when no request is open
    refused = False
    for kind, data, payload in events:
        if kind == "describe":
            answers.append("info")
        elif kind == "ping":
            answers.append("pong" if _text_or_none(data.get("text")) else "error:bad_event")
        elif kind == "transcribe":
            context = data.get("context")
            if (
                not _text_or_none(data.get("language"))
                or not (context is None or isinstance(context, dict))
                or (isinstance(context, dict) and not _text_or_none(context.get("site")))
                or data.get("vad_sensitivity") not in (None, *SENSITIVITIES)
            ):
                answers.append("error:bad_event")
            else:
                language = data.get("language") or None
                site = context.get("site") if context else None
        elif kind == "audio-start":
            words, refused = None, True
            if not _frame_bytes(data):
                answers.append("error:bad_event")
            elif site and not SITE_PATTERN.fullmatch(site):
                answers.append("error:bad_config")
            elif (language or "en").lower()[:2] not in ("en", "de"):
                answers.append("error:unsupported_language")
            else:
                words, refused = 0, False
                answers.append("transcript-start")
        elif kind == "audio-chunk":
            if words is None:
                answers += [] if refused else ["error:no_audio_start"]
            elif not (frame := _frame_bytes(data)):
                answers.append("error:bad_event")
            elif len(payload) % frame:
                answers.append("error:bad_audio")
            else:
                words += 1
        elif kind == "audio-stop":
            if words is not None:
                text = " ".join(f"w{n}" for n in range(1, words + 1))
                answers += [f"transcript:{text}", "transcript-stop"]
            elif refused:
                answers += ["transcript:", "transcript-stop"]
            else:
                answers.append("error:no_audio_start")
            words, refused = None, False
        else:
            answers.append("error:unknown_event")
    return [*answers, "pong"]


def _text_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _answers(events: list[Event]) -> list[str]:
    named = {"error": lambda e: f"error:{e.data.get('code')}", "transcript": lambda e: f"transcript:{e.data['text']}"}
    return [named[e.type](e) if e.type in named else e.type for e in events if e.type != "transcript-chunk"]


@FUZZ
@given(events=st.lists(st.tuples(_events(), st.booleans()), max_size=12))
@example(events=[(("transcribe", {"language": 5}, b""), False)])
@example(events=[(("transcribe", {"vad_sensitivity": ["relaxed"]}, b""), False)])
@example(events=[(("transcribe", {"context": "kitchen"}, b""), True)])
@example(events=[(("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(2)), False)])
@example(
    events=[(("audio-start", {"rate": 16000, "width": 3, "channels": 1}, b""), False), (("audio-stop", {}, b""), False)]
)
@example(
    events=[
        (("transcribe", {"context": {"site": "no spaces"}}, b""), True),
        (("audio-start", {"rate": 16000, "width": 2, "channels": 1}, b""), False),
        (("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(2)), False),
        (("audio-stop", {}, b""), False),
    ]
)
async def test_any_sequence_of_events_gets_exactly_its_answers(
    server: tuple[FakeEngine, int], caplog: pytest.LogCaptureFixture, events: list[tuple[Generated, bool]]
) -> None:
    data = b"".join(_wire(kind, fields, payload, in_block) for (kind, fields, payload), in_block in events)

    answered = await _check(server, caplog, data)

    assert _answers(answered) == _expected_answers([event for event, _in_block in events])
