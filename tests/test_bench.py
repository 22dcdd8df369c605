"""Tests of edge_asr.bench without the model: scoring, error classes, names right, latencies, server messages, the
corpus and vocabulary, run medians and stability, the report, the names each transport sends, the command
against a scripted WebSocket server, and the sessions per node it reads from fake nodes' /metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import re
import threading
import wave
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.sync.server import ServerConnection as SyncServerConnection
from websockets.sync.server import serve as serve_in_thread
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioStop
from wyoming.event import Event as WyomingEvent
from wyoming.event import async_read_event, async_write_event

from edge_asr.audio import FloatAudio
from edge_asr.bench import command, runner
from edge_asr.bench.arguments import add_arguments
from edge_asr.bench.corpus import Clip, load_corpus, load_vocabulary
from edge_asr.bench.errors import BenchError
from edge_asr.bench.nodes import NodeSessions, format_nodes, read_all, sessions_during
from edge_asr.bench.pacing import Replay
from edge_asr.bench.report import (
    ClipResult,
    OfflineClip,
    OfflineSummary,
    Report,
    RunResult,
    Stability,
    format_table,
    median_of_runs,
    report_json,
    stability,
    summarize,
)
from edge_asr.bench.report import clip_result as score_clip
from edge_asr.bench.resources import Resources
from edge_asr.bench.scoring import NameScore, WordScore, normalize, percentile, score_names, score_words
from edge_asr.bench.timing import (
    Playback,
    Received,
    end_to_final,
    first_seen,
    first_text_lag,
    sent_at,
    speech_span,
    word_lags,
)
from edge_asr.bench.transports import WebSocketTransport, WyomingReplies, WyomingTransport, read_message
from edge_asr.bench.wyoming_client import WyomingReply
from edge_asr.config import ModelSettings, Settings, StreamSettings
from edge_asr.events import Done, Event, Final, Message, Partial, Ready, SessionError
from edge_asr.metrics import Metrics
from edge_asr.transcript import Transcript as ModelTranscript
from edge_asr.transcript import Word
from edge_asr.vocabulary import NamesInPrompt

CHUNK = 640
T0 = 100.0


def partial(text: str, utterance: int = 1) -> Partial:
    """A partial with dummy timings."""
    return Partial(text=text, stable="", utterance=utterance, asr_ms=10, e2e_ms=20)


def final(text: str, utterance: int = 1, revised: bool = False) -> Final:
    """A final with dummy timings."""
    return Final(text=text, utterance=utterance, asr_ms=10, e2e_ms=20, ttct_ms=30, start=0.0, end=1.0, revised=revised)


def paced(seconds: float) -> tuple[tuple[float, float], ...]:
    """What a real-time replay records: chunk k of 20 ms leaves at T0 + its end position."""
    chunks = int(seconds * 32000) // CHUNK
    return tuple(((k + 1) * CHUNK / 32000, T0 + (k + 1) * CHUNK / 32000) for k in range(chunks))


def playback(events: list[tuple[float, Event]], end_at: float = T0 + 2.5) -> Playback:
    """A replay of 2.5 s of audio with these events at these times."""
    return Playback(tuple(Received(at, event) for at, event in events), paced(2.5), end_at)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "hypothesis"),
    [
        ("set the thermostat to seventy two degrees", "Set the thermostat to 72 degrees."),
        ("dim the dining room lights to thirty percent", "Dim the dining room lights to 30%."),
        ("turn on the kitchen lights", "Turn on the kitchen lights!"),
    ],
)
def test_spelled_and_written_forms_score_alike(reference: str, hypothesis: str) -> None:
    assert normalize(reference) == normalize(hypothesis)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("turn on the lights", "Turn on the lights.", WordScore(4, 0, 0, 0, 0, 0)),
        ("turn on the lights", "turn off the lights", WordScore(4, 1, 0, 0, 0, 0)),
        ("turn on the lights", "turn the lights", WordScore(4, 0, 1, 0, 0, 1)),
        ("turn on the lights", "turn on the lights now", WordScore(4, 0, 0, 1, 1, 0)),
        ("turn on the lights", "on the lights please", WordScore(4, 0, 1, 1, 1, 1)),
        ("set the thermostat to seventy two degrees", "Set the thermostat to 72 degrees.", WordScore(6, 0, 0, 0, 0, 0)),
        ("turn on the lights", "", WordScore(4, 0, 4, 0, 0, 2)),
        ("", "thank you", WordScore(0, 0, 0, 2, 2, 0)),
        ("Um.", "thank you for watching", WordScore(0, 0, 0, 4, 4, 0)),
        ("", "", WordScore(0, 0, 0, 0, 0, 0)),
        ("Your.", "your...", WordScore(1, 0, 0, 0, 0, 0)),  # an ellipsis is not a word
        ("<beep ascending>", "...", WordScore(0, 0, 0, 0, 0, 0)),
    ],
)
def test_score_words_counts_substitutions_deletions_and_insertions(
    reference: str, hypothesis: str, expected: WordScore
) -> None:
    assert score_words(reference, hypothesis) == expected


@pytest.mark.fast
def test_word_errors_add_up_the_three_kinds() -> None:
    assert (
        WordScore(9, substitutions=1, deletions=2, insertions=3, inserted_after_speech=3, lost_first_two=2).errors == 6
    )
    assert score_words("lock the front door", "unlock the door please now").errors == 4


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "hypothesis", "after_speech", "insertions"),
    [
        ("turn on the lights", "turn on the lights thank you", 2, 2),
        ("turn on the lights", "turn on please the lights", 0, 1),
        ("turn on the lights", "please turn on the lights", 0, 1),
        ("turn on the lights", "so turn on the lights okay", 1, 2),
        # Words after a substituted word are after the speech when no reference word follows.
        ("turn on the lights", "turn off the lights now", 1, 1),
        ("", "thank you for watching", 4, 4),
        ("", "", 0, 0),
    ],
)
def test_only_insertions_after_the_last_reference_word_count_as_inserted_after_speech(
    reference: str, hypothesis: str, after_speech: int, insertions: int
) -> None:
    score = score_words(reference, hypothesis)
    assert (score.inserted_after_speech, score.insertions) == (after_speech, insertions)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "hypothesis", "lost", "deletions"),
    [
        ("turn on the kitchen lights", "on the kitchen lights", 1, 1),
        ("turn on the kitchen lights", "the kitchen lights", 2, 2),
        ("turn on the kitchen lights", "turn the kitchen lights", 1, 1),
        ("turn on the kitchen lights", "turn on the lights", 0, 1),
        ("turn on the kitchen lights", "turn on", 0, 3),
        ("turn on the kitchen lights", "", 2, 5),
        # A substituted first word is a substitution, not a loss.
        ("turn on the kitchen lights", "burn on the kitchen lights", 0, 0),
        ("lights", "", 1, 1),
        ("", "hello", 0, 0),
    ],
)
def test_only_deletions_among_the_first_two_reference_words_count_as_lost_first_two(
    reference: str, hypothesis: str, lost: int, deletions: int
) -> None:
    score = score_words(reference, hypothesis)
    assert (score.lost_first_two, score.deletions) == (lost, deletions)


NAMES = ("Elowen", "Quillo fan", "Brannoc")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("dim the lamp in Elowen's room", "Dim the lamp in Elowen's room.", NameScore(1, 1)),
        # A possessive is dropped on either side, typographic apostrophe too; case does not matter.
        ("dim the lamp in Elowen\u2019s room", "dim the lamp in ELOWEN room", NameScore(1, 1)),
        ("dim the lamp in elowen room", "Dim the lamp in Elowen's room.", NameScore(1, 1)),
        # Whole words only: a longer word holding the name is not the name.
        ("dim the lamp in Elowen's room", "dim the lamp in Elowens room", NameScore(0, 1)),
        ("ask Elowenna", "ask Elowenna", NameScore(0, 0)),
        # A name of several words matches as a phrase, whatever splits its words.
        ("turn on the Quillo fan", "Turn on the quillo fan.", NameScore(1, 1)),
        ("turn on the Quillo fan", "turn on the Quillo-fan", NameScore(1, 1)),
        ("turn on the Quillo fan", "turn on the Quillo van", NameScore(0, 1)),
        ("turn on the Quillo fan", "Quillo, turn on the fan", NameScore(0, 1)),
        # Said twice, heard once; heard more often than said counts up to what was said.
        ("Elowen, call Elowen", "Elowen, call Ellen.", NameScore(1, 2)),
        ("call Elowen", "Elowen, call Elowen.", NameScore(1, 1)),
        (
            "call Brannoc and Elowen about the Quillo fan",
            "call Brannock and Elowen about the Quillo fan",
            NameScore(2, 3),
        ),
        ("turn on the lights", "turn on Elowen's lights", NameScore(0, 0)),
    ],
)
def test_names_right_counts_the_reference_names_the_hypothesis_has(
    reference: str, hypothesis: str, expected: NameScore
) -> None:
    assert score_names(reference, hypothesis, NAMES) == expected


@pytest.mark.fast
def test_without_a_vocabulary_no_name_is_expected() -> None:
    assert score_names("dim the lamp in Elowen's room", "dim the lamp in Elowen's room", ()) == NameScore(0, 0)


@pytest.mark.fast
def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0], 100) == 3.0


@pytest.mark.fast
def test_sent_at_is_the_time_the_chunk_holding_the_position_left() -> None:
    sent = paced(1.0)
    assert sent_at(sent, 0.8) == pytest.approx(T0 + 0.8)
    assert sent_at(sent, 0.81) == pytest.approx(T0 + 0.82)
    assert sent_at(sent, 0.0) == pytest.approx(T0 + 0.02)
    assert sent_at(sent, 5.0) == pytest.approx(T0 + 1.0)


@pytest.mark.fast
def test_first_seen_takes_the_first_hypothesis_with_the_word_at_its_position() -> None:
    events: list[tuple[float, Event]] = [
        (T0 + 1.0, partial("Turn")),
        (T0 + 1.3, partial("Turn of the")),
        (T0 + 1.5, partial("Turn on the")),
        (T0 + 1.8, partial("Turn on the light")),
        (T0 + 2.2, final("Turn on the lights.")),
    ]
    seen = first_seen([Received(at, event) for at, event in events])
    assert seen == [("turn", T0 + 1.0), ("on", T0 + 1.5), ("the", T0 + 1.3), ("lights", T0 + 2.2)]


@pytest.mark.fast
def test_first_seen_counts_positions_after_earlier_finals() -> None:
    events: list[tuple[float, Event]] = [
        (T0 + 0.5, partial("lock")),
        (T0 + 0.9, final("Lock the door.")),
        (T0 + 1.4, partial("and the", utterance=2)),
        (T0 + 1.6, SessionError("x", "ignored")),
        (T0 + 1.9, final("And the window.", utterance=2)),
        (T0 + 2.0, Done(utterances=2)),
    ]
    seen = first_seen([Received(at, event) for at, event in events])
    assert seen == [
        ("lock", T0 + 0.5),
        ("the", T0 + 0.9),
        ("door", T0 + 0.9),
        ("and", T0 + 1.4),
        ("the", T0 + 1.4),
        ("window", T0 + 1.9),
    ]


@pytest.mark.fast
def test_word_lags_spread_the_final_words_evenly_over_the_speech() -> None:
    replay = playback(
        [
            (T0 + 1.0, partial("Turn")),
            (T0 + 1.5, partial("Turn on the")),
            (T0 + 2.2, final("Turn on the lights.")),
        ]
    )
    # Speech from 0.5 s to 1.7 s: the four words end at 0.8, 1.1, 1.4 and 1.7 s.
    assert word_lags(replay, (0.5, 1.7)) == pytest.approx([0.2, 0.4, 0.1, 0.5])


@pytest.mark.fast
def test_word_lags_without_a_final_are_empty() -> None:
    assert word_lags(playback([(T0 + 1.0, partial("Turn"))]), (0.5, 1.7)) == []


@pytest.mark.fast
def test_first_text_lag_counts_from_the_speech_start() -> None:
    replay = playback([(T0 + 0.1, partial("")), (T0 + 1.3, partial("Turn")), (T0 + 2.2, final("Turn on."))])
    assert first_text_lag(replay, 0.5) == pytest.approx(0.8)
    assert first_text_lag(playback([(T0 + 2.2, final("Hi."))]), 0.5) == pytest.approx(1.7)
    assert first_text_lag(playback([]), 0.5) is None


@pytest.mark.fast
def test_end_to_final_is_zero_when_the_final_came_before_the_end() -> None:
    assert end_to_final(playback([(T0 + 2.2, final("Hi."))], end_at=T0 + 2.5)) == 0.0
    assert end_to_final(playback([(T0 + 2.9, final("Hi."))], end_at=T0 + 2.5)) == pytest.approx(0.4)
    assert end_to_final(playback([(T0 + 2.2, final("Hi.")), (T0 + 3.0, final("Bye.", 2))])) == pytest.approx(0.5)
    assert end_to_final(playback([(T0 + 1.0, partial("Hi"))])) is None


@pytest.mark.fast
@pytest.mark.parametrize(
    "message",
    [
        partial("hel"),
        final("Hi."),
        SessionError("busy", "full"),
        Done(2),
        Ready(session=3, sample_rate=16000, language="en", max_frame_bytes=65536),
    ],
)
def test_read_message_reads_every_server_message(message: Event | Ready) -> None:
    assert read_message(message.to_json()) == message
    assert read_message(message.to_json().encode()) == message


@pytest.mark.fast
def test_read_message_ignores_unknown_keys_and_takes_ints_for_floats() -> None:
    wire = json.dumps({**final("Hi.").to_dict(), "end": 2, "server": "edge-asr"})
    assert read_message(wire) == Final("Hi.", 1, 10, 20, 30, 0.0, 2.0)


@pytest.mark.fast
@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        b"\xff\xfe",
        "[1, 2]",
        '{"text": "no type"}',
        '{"type": "shout", "text": "hi"}',
        '{"type": "final", "text": "x"}',
        '{"type": "partial", "text": 1, "stable": "", "utterance": 1, "asr_ms": 1, "e2e_ms": 1}',
        '{"type": "done", "utterances": true}',
    ],
)
def test_a_malformed_server_message_becomes_a_bad_message_error(raw: str | bytes) -> None:
    message = read_message(raw)
    assert isinstance(message, SessionError)
    assert message.code == "bad_message"


END = json.dumps({"type": "end"})
READY = Ready(session=1, sample_rate=16000, language="en", max_frame_bytes=65536).to_json()


async def replay_through_websocket(before: Sequence[str], after_end: Sequence[str]) -> Playback:
    """Replay 0.1 s of silence through a WebSocket server that sends `before` at once and `after_end` after `end`."""

    async def handler(ws: ServerConnection) -> None:
        for raw in before:
            await ws.send(raw)
        async for message in ws:
            if message == END:
                for raw in after_end:
                    await ws.send(raw)
                return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        transport = WebSocketTransport(f"ws://127.0.0.1:{port}", Replay(realtime=False, trailing_silence_s=0.0))
        return await transport.play(bytes(3200))


@pytest.mark.fast
async def test_a_malformed_message_from_a_websocket_server_is_a_clip_error() -> None:
    replay = await replay_through_websocket(
        [READY, partial("Turn on").to_json(), '{"type": "partial", "text": "Turn"}'],
        [final("Turn on the lights.").to_json(), Done(1).to_json()],
    )

    events = [item.event for item in replay.events]
    assert events[0] == partial("Turn on")
    assert isinstance(events[1], SessionError)
    assert events[1].code == "bad_message"
    assert events[2:] == [final("Turn on the lights."), Done(1)]
    assert len(replay.sent) == 5
    result = score_clip(Clip("c", Path("c.wav"), "turn on the lights", 0.1), replay, None)
    assert (result.hypothesis, result.word_errors) == ("Turn on the lights.", 0)
    assert [error.split(":")[0] for error in result.errors] == ["bad_message"]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("first", "code"),
    [
        (partial("hi").to_json(), "no_ready"),
        ('{"type": "ready", "session": 1}', "bad_message"),
        (SessionError("busy", "too many sessions").to_json(), "busy"),
    ],
)
async def test_a_websocket_server_that_does_not_start_with_ready_fails_the_clip(first: str, code: str) -> None:
    replay = await replay_through_websocket([first], [])

    assert [item.event.code for item in replay.events if isinstance(item.event, SessionError)] == [code]
    assert len(replay.events) == 1
    assert replay.sent == ()


@pytest.mark.fast
async def test_a_websocket_server_that_closes_before_done_fails_the_clip() -> None:
    replay = await replay_through_websocket([READY], [final("Hi.").to_json()])

    assert [item.event for item in replay.events][:1] == [final("Hi.")]
    assert [item.event.code for item in replay.events if isinstance(item.event, SessionError)] == ["closed"]


@pytest.mark.fast
def test_speech_span_of_silence_is_none() -> None:
    assert speech_span(bytes(32000), StreamSettings()) is None


def clip_result(
    name: str,
    reference: str,
    hypothesis: str,
    errors: int,
    lags: tuple[float, ...] = (),
    revised: int | None = 0,
    clip_errors: tuple[str, ...] = (),
) -> ClipResult:
    """A scored clip with a few latencies; its error classes are those of the hypothesis; no vocabulary."""
    score = score_words(reference, hypothesis)
    return ClipResult(
        name=name,
        reference=reference,
        hypothesis=hypothesis,
        audio_s=2.0,
        reference_words=len(reference.split()),
        word_errors=errors,
        word_lag_ms=lags,
        first_partial_ms=None,
        end_to_final_ms=0.0 if hypothesis else None,
        ttct_ms=(300,) if hypothesis else (),
        e2e_partial_ms=(),
        e2e_final_ms=(),
        errors=clip_errors,
        inserted_after_speech=score.inserted_after_speech,
        lost_first_two=score.lost_first_two,
        no_final=bool(score.reference_words) and not hypothesis,
        revised_finals=revised,
        names_found=0,
        names_expected=0,
    )


@pytest.mark.fast
def test_summarize_counts_insertions_on_no_speech_clips_and_hallucinations() -> None:
    summary = summarize(
        [
            clip_result("a", "turn on the lights", "turn on the light", 1, (100.0, 200.0)),
            clip_result("b", "", "thank you", 2),
            clip_result("c", "", "", 0),
            clip_result("d", "open the door", "open the door", 0, (300.0,)),
        ]
    )
    assert summary.wer == pytest.approx(3 / 7)
    assert (summary.no_speech_clips, summary.hallucinations) == (2, 1)
    assert summary.word_lag_p50_ms == pytest.approx(200.0)
    assert summary.end_to_final_p50_ms == 0.0
    assert summary.first_partial_p50_ms is None
    assert summary.audio_s == pytest.approx(8.0)


SPEECH_CLIP = Clip("c", Path("c.wav"), "turn on the lights", 2.5)


@pytest.mark.fast
def test_a_clip_result_counts_its_error_classes_and_revised_finals() -> None:
    replay = playback(
        [
            (T0 + 1.0, partial("Turn on the")),
            (T0 + 1.6, final("On the lights,", revised=True)),
            (T0 + 2.4, final("thank you.", utterance=2)),
            (T0 + 2.5, final("Bye.", utterance=3, revised=True)),
        ]
    )

    result = score_clip(SPEECH_CLIP, replay, None)

    assert (result.lost_first_two, result.inserted_after_speech, result.no_final) == (1, 3, False)
    assert result.revised_finals == 2
    assert result.word_errors == 4


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "events", "no_final"),
    [
        ("turn on the lights", [(T0 + 1.0, partial("Turn on"))], True),
        ("turn on the lights", [(T0 + 1.0, partial("Turn on")), (T0 + 2.6, final(" "))], True),
        ("turn on the lights", [(T0 + 2.6, final("Turn."))], False),
        ("", [(T0 + 1.0, partial("Hmm"))], False),
        ("", [], False),
    ],
)
def test_no_final_is_a_clip_with_speech_that_got_no_final_with_text(
    reference: str, events: list[tuple[float, Event]], no_final: bool
) -> None:
    result = score_clip(Clip("c", Path("c.wav"), reference, 2.5), playback(events), None)
    assert result.no_final is no_final
    assert result.revised_finals == 0


@pytest.mark.fast
def test_a_clip_without_any_final_lost_its_first_two_words() -> None:
    result = score_clip(SPEECH_CLIP, playback([(T0 + 1.0, partial("Turn on"))]), None)
    assert (result.hypothesis, result.lost_first_two, result.word_errors) == ("", 2, 4)


@pytest.mark.fast
def test_finals_of_a_protocol_without_the_revised_flag_are_not_counted() -> None:
    events = (Received(T0 + 2.9, final("Turn on the lights.")),)
    untimed = Playback(events, paced(2.5), T0 + 2.5, timed=False)

    result = score_clip(SPEECH_CLIP, untimed, None)

    assert result.revised_finals is None
    assert summarize([result]).revised_finals is None


@pytest.mark.fast
def test_summarize_adds_up_the_error_classes_and_revised_finals() -> None:
    clips = [
        clip_result("a", "turn on the lights", "on the lights thank you", 3, revised=1),
        clip_result("b", "open the door", "", 3),
        clip_result("c", "", "thank you", 2, revised=2),
        clip_result("d", "close the door", "close the door", 0),
    ]

    summary = summarize(clips)

    assert (summary.inserted_after_speech, summary.lost_first_two) == (4, 3)
    assert (summary.no_final, summary.revised_finals) == (1, 3)


def run_result(
    hypotheses: Sequence[str], errors: int, peak_rss_mb: float, ready_s: float | None, revised: int = 0
) -> RunResult:
    """A run over three clips (7 reference words) with these final texts and `errors` word errors in all."""
    references = ("turn on the lights", "open the door", "")
    clips = tuple(
        clip_result(name, reference, hypothesis, errors if name == "a" else 0, revised=revised if name == "a" else 0)
        for name, reference, hypothesis in zip("abc", references, hypotheses, strict=True)
    )
    return RunResult(summarize(clips), Resources(0.5, peak_rss_mb, ready_s, None), clips)


@pytest.mark.fast
def test_the_median_takes_each_column_over_the_runs_that_measured_it() -> None:
    runs = [
        run_result(["turn on the lights", "open the door", ""], 0, 300.0, 4.0, revised=2),
        run_result(["turn on the light", "", ""], 1, 100.0, None, revised=0),
        run_result(["lights", "", "thank you"], 5, 200.0, 2.0, revised=1),
    ]

    median = median_of_runs(runs)

    # The median of 0, 1/7 and 5/7, not the pooled 6/21.
    assert median.wer == pytest.approx(1 / 7)
    assert median.word_errors == 1
    assert (median.no_final, median.hallucinations, median.revised_finals) == (1, 0, 1)
    assert (median.peak_rss_mb, median.start_to_ready_s, median.cpu_s_per_audio_s) == (200.0, 3.0, 0.5)
    assert median.idle_cpu_percent is None
    # Lost first words per run: 0, 2 ("open the" of b) and 4 (a's "turn on" too).
    assert median.lost_first_two == 2
    assert median_of_runs(runs[:2]).lost_first_two == pytest.approx(1.0)
    assert median_of_runs(runs[:2]).no_final == pytest.approx(0.5)


@pytest.mark.fast
def test_stability_counts_the_clips_whose_normalised_final_text_is_the_same_in_every_run() -> None:
    runs = [
        run_result(["Turn on the lights.", "open the door", ""], 0, 1.0, None),
        run_result(["turn on the lights", "open the door", ""], 0, 1.0, None),
        run_result(["turn on the lights!", "open the floor", ""], 1, 1.0, None),
    ]

    differing = stability(runs)
    assert differing.share == pytest.approx(2 / 3)
    assert differing.differing_clips == ("b",)
    assert stability(runs[:2]) == Stability(1.0, ())
    assert stability(runs[2:]) == Stability(None, ())


def report(runs: Sequence[RunResult], offline: OfflineSummary | None = None, protocol: str = "in-process") -> Report:
    """A report of these runs."""
    return Report(
        corpus="corpus",
        transport=protocol,
        protocol=protocol,
        concurrency=1,
        realtime=True,
        trailing_silence_s=0.5,
        normalizer="whisper",
        runs=tuple(runs),
        median=median_of_runs(runs),
        stability=stability(runs),
        offline=offline,
        offline_clips=(),
    )


def table_rows(table: str) -> dict[str, dict[str, str]]:
    """The table's rows by mode, each cell by its header (cells are at least two spaces apart)."""
    lines = table.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("mode  "))
    header, *rows = [
        re.split(r"\s{2,}", line) for line in itertools.takewhile(lambda line: "  " in line, lines[start:])
    ]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


OFFLINE = OfflineSummary(
    clips=3,
    reference_words=7,
    word_errors=2,
    wer=2 / 7,
    hallucinations=0,
    decode_ms_mean=350.0,
    cpu_s_per_audio_s=0.8,
    inserted_after_speech=1,
    lost_first_two=1,
    no_text=0,
    names_found=0,
    names_expected=0,
    names_right=None,
)


@pytest.mark.fast
def test_the_table_has_a_row_per_run_their_median_and_the_share_of_stable_finals() -> None:
    runs = [
        run_result(["turn on the lights thank you", "open the door", ""], 2, 300.0, 4.0, revised=1),
        run_result(["on the lights", "", ""], 1, 100.0, 3.0, revised=2),
    ]

    table = format_table(report(runs, OFFLINE))

    rows = table_rows(table)
    assert list(rows) == ["streaming 1", "streaming 2", "median", "offline"]
    first, second, median, offline = rows.values()
    assert [first[column] for column in ("WER", "ins after", "lost 1st 2", "no final", "revised")] == [
        "28.6%",
        "2",
        "0",
        "0",
        "1",
    ]
    assert [second[column] for column in ("WER", "ins after", "lost 1st 2", "no final", "revised")] == [
        "14.3%",
        "0",
        "3",
        "1",
        "2",
    ]
    assert [median[column] for column in ("WER", "ins after", "lost 1st 2", "no final", "revised")] == [
        "21.4%",
        "1",
        "1.5",
        "0.5",
        "1.5",
    ]
    assert (median["peak RSS"], median["ready"]) == ("200 MB", "3.50 s")
    assert [offline[column] for column in ("WER", "ins after", "lost 1st 2", "no final", "revised")] == [
        "28.6%",
        "1",
        "1",
        "0",
        "-",
    ]
    assert table.splitlines()[-1] == "same final text in 33% of clips across 2 runs; differs: a, b"
    assert "0 clip(s) with errors over 2 runs" in table.splitlines()[0]


@pytest.mark.fast
def test_a_single_run_has_one_streaming_row_and_no_stability_line() -> None:
    run = run_result(["turn on the lights", "open the door", ""], 0, 300.0, 4.0)

    table = format_table(report([run], protocol="wyoming"))

    rows = table_rows(table)
    assert list(rows) == ["streaming"]
    assert rows["streaming"]["no final"] == "0"
    assert "same final text" not in table
    untimed = dataclasses.replace(run, streaming=dataclasses.replace(run.streaming, revised_finals=None))
    assert table_rows(format_table(report([untimed], protocol="wyoming")))["streaming"]["revised"] == "n/a"


@pytest.mark.fast
def test_the_json_report_has_every_run_and_the_first_at_the_top_level() -> None:
    runs = [
        run_result(["turn on the lights", "open the door", ""], 0, 300.0, 4.0),
        run_result(["on the lights", "", ""], 1, 100.0, 3.0, revised=2),
    ]

    data = json.loads(report_json(report(runs, OFFLINE)))

    assert [run["streaming"]["word_errors"] for run in data["runs"]] == [0, 1]
    assert data["streaming"] == data["runs"][0]["streaming"]
    assert data["resources"] == data["runs"][0]["resources"]
    assert [clip["name"] for clip in data["clips"]] == ["a", "b", "c"]
    assert data["runs"][1]["clips"][1]["no_final"] is True
    assert data["runs"][1]["streaming"]["revised_finals"] == 2
    assert data["median"]["peak_rss_mb"] == 200.0
    assert data["stability"] == {"share": 0.3333, "differing_clips": ["a", "b"]}
    assert data["offline"]["inserted_after_speech"] == 1


NAMED_CLIPS = (
    Clip("a", Path("a.wav"), "Dim the lamp in Elowen's room and the Quillo fan", 2.5),
    Clip("b", Path("b.wav"), "Elowen, call Elowen", 2.5),
    Clip("c", Path("c.wav"), "turn on the lights", 2.5),
)


def named_run(hypotheses: Sequence[str], names: Sequence[str] = NAMES) -> RunResult:
    """A run over NAMED_CLIPS with these final texts, scored with `names`."""
    clips = tuple(
        score_clip(clip, playback([(T0 + 2.2, final(text))]), None, names)
        for clip, text in zip(NAMED_CLIPS, hypotheses, strict=True)
    )
    return RunResult(summarize(clips), Resources(0.5, 200.0, 3.0, None), clips)


@pytest.mark.fast
def test_the_table_shows_names_right_next_to_wer_for_each_run_their_median_and_offline() -> None:
    runs = [
        # a: both names; b: Elowen once of twice: 3 of 4.
        named_run(["dim the lamp in elowen room and the quillo fan", "Elowen, call Ellen.", "turn on the lights"]),
        # a: neither; b: both: 2 of 4.
        named_run(["Dim the lamp in Ellen's room and the Quillo van.", "Elowen call Elowen", "turn on the lights"]),
    ]
    offline = dataclasses.replace(OFFLINE, names_found=4, names_expected=4, names_right=1.0)

    table = format_table(report(runs, offline))

    header = re.split(r"\s{2,}", table.splitlines()[1])
    assert header[header.index("WER") + 1] == "names right"
    assert {mode: row["names right"] for mode, row in table_rows(table).items()} == {
        "streaming 1": "names 3/4",
        "streaming 2": "names 2/4",
        "median": "names 2.5/4",
        "offline": "names 4/4",
    }
    data = json.loads(report_json(report(runs, offline)))
    assert [(clip["names_found"], clip["names_expected"]) for clip in data["clips"]] == [(2, 2), (1, 2), (0, 0)]
    assert [run["streaming"]["names_right"] for run in data["runs"]] == [0.75, 0.5]
    assert (data["median"]["names_found"], data["median"]["names_right"]) == (2.5, 0.625)
    assert data["offline"]["names_right"] == 1.0


@pytest.mark.fast
def test_names_right_is_na_without_a_vocabulary_or_a_name_in_any_reference() -> None:
    hypotheses = ["dim the lamp in Elowen's room and the Quillo fan", "Elowen, call Elowen", "turn on the lights"]
    unnamed = named_run(hypotheses, names=())
    elsewhere = named_run(hypotheses, names=("Brannoc",))

    for run in (unnamed, elsewhere):
        assert (run.streaming.names_expected, run.streaming.names_right) == (0, None)
        rows = table_rows(format_table(report([run, run], OFFLINE)))
        assert {mode: row["names right"] for mode, row in rows.items()} == dict.fromkeys(
            ("streaming 1", "streaming 2", "median", "offline"), "n/a"
        )


def bench_parser() -> argparse.ArgumentParser:
    """The bench's command line on its own."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "offline", "runs"),
    [
        ([], True, 1),
        (["--no-offline"], False, 1),
        (["--offline"], True, 1),
        (["--runs", "3", "--no-offline"], False, 3),
        (["--no-offline", "--offline", "--runs=2"], True, 2),
    ],
)
def test_the_whole_clip_decode_is_on_unless_no_offline(argv: list[str], offline: bool, runs: int) -> None:
    args = bench_parser().parse_args(["corpus", *argv])
    assert (args.offline, args.runs) == (offline, runs)


@pytest.mark.fast
@pytest.mark.parametrize("runs", ["0", "-1", "two"])
def test_runs_must_be_a_positive_count(runs: str) -> None:
    with pytest.raises(SystemExit):
        bench_parser().parse_args(["corpus", "--runs", runs])


@pytest.mark.fast
def test_wyoming_replies_of_a_streaming_server_end_at_transcript_stop() -> None:
    replies = WyomingReplies()
    answered = [
        replies.add(T0 + at, reply)
        for at, reply in (
            (0.0, WyomingReply("transcript-start")),
            (1.0, WyomingReply("transcript-chunk", "Turn on")),
            (1.5, WyomingReply("transcript-chunk", " the")),
            (2.6, WyomingReply("transcript", "Turn on the lights.")),
            (2.6, WyomingReply("transcript-stop")),
        )
    ]
    assert answered == [False, False, False, False, True]
    assert [(item.at, item.event) for item in replies.received] == [
        (T0 + 1.0, Partial("Turn on", "Turn on", utterance=1, asr_ms=0, e2e_ms=0)),
        (T0 + 1.5, Partial("Turn on the", "Turn on the", utterance=1, asr_ms=0, e2e_ms=0)),
        (T0 + 2.6, Final("Turn on the lights.", 1, 0, 0, 0, 0.0, 0.0)),
    ]


@pytest.mark.fast
def test_wyoming_replies_of_a_server_that_does_not_stream_end_at_the_transcript_or_an_error() -> None:
    replies = WyomingReplies()
    assert replies.add(T0, WyomingReply("transcript", "Hi.")) is True
    assert [item.event for item in replies.received] == [Final("Hi.", 1, 0, 0, 0, 0.0, 0.0)]
    refused = WyomingReplies()
    assert refused.add(T0, WyomingReply("error", "too many sessions", "busy")) is True
    assert [item.event for item in refused.received] == [SessionError("busy", "too many sessions")]
    streaming = WyomingReplies()
    assert streaming.add(T0, WyomingReply("transcript-start")) is False
    assert streaming.add(T0, WyomingReply("error", "decode failed")) is False
    assert [item.event for item in streaming.received] == [SessionError("error", "decode failed")]


@pytest.mark.fast
def test_a_replay_without_server_timings_reports_none() -> None:
    clip = Clip("c", Path("c.wav"), "turn on the lights", 2.5)
    events: list[tuple[float, Event]] = [(T0 + 1.0, partial("Turn on")), (T0 + 2.9, final("Turn on the lights."))]
    untimed = Playback(tuple(Received(at, event) for at, event in events), paced(2.5), T0 + 2.5, timed=False)

    result = score_clip(clip, untimed, (0.5, 1.7))

    assert (result.ttct_ms, result.e2e_partial_ms, result.e2e_final_ms) == ((), (), ())
    assert result.end_to_final_ms == pytest.approx(400.0)
    assert result.first_partial_ms == pytest.approx(500.0)
    assert (len(result.word_lag_ms), result.word_errors) == (4, 0)
    summary = summarize([result])
    assert (summary.ttct_p50_ms, summary.e2e_partial_p50_ms, summary.e2e_final_p50_ms) == (None, None, None)
    assert summary.end_to_final_p50_ms == pytest.approx(400.0)
    timed = score_clip(clip, dataclasses.replace(untimed, timed=True), (0.5, 1.7))
    assert (timed.ttct_ms, timed.e2e_partial_ms, timed.e2e_final_ms) == ((30,), (20,), (20,))


def write_clip(directory: Path, name: str, text: str | None, rate: int = 16000, seconds: float = 0.5) -> None:
    """A WAV of silence, with its transcript unless text is None."""
    with wave.open(str(directory / f"{name}.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(int(rate * seconds) * 2))
    if text is not None:
        (directory / f"{name}.txt").write_text(text + "\n", encoding="utf-8")


@pytest.mark.fast
def test_load_corpus_sorts_filters_and_limits(tmp_path: Path) -> None:
    for name in ("cmd_b", "cmd_a", "other", "cmd_c"):
        write_clip(tmp_path, name, f"say {name}")
    write_clip(tmp_path, "cmd_0_no_text", None)
    clips = load_corpus(tmp_path, match="cmd_*", limit=2)
    assert clips == [
        Clip("cmd_a", tmp_path / "cmd_a.wav", "say cmd_a", 0.5),
        Clip("cmd_b", tmp_path / "cmd_b.wav", "say cmd_b", 0.5),
    ]
    assert clips[0].read_pcm() == bytes(16000)
    assert [clip.name for clip in load_corpus(tmp_path)] == ["cmd_a", "cmd_b", "cmd_c", "other"]


@pytest.mark.fast
def test_load_corpus_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="not a directory"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(BenchError, match=r"no \.wav"):
        load_corpus(tmp_path)
    write_clip(tmp_path, "loud", "hello", rate=8000)
    with pytest.raises(BenchError, match="expected 16 kHz mono"):
        load_corpus(tmp_path)


@pytest.mark.fast
def test_a_vocabulary_file_has_a_name_a_line_without_blanks_comments_or_repeats(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text(
        "# the family\nElowen\n\n   \n  Quillo   fan  \n  # the kitchen\nelowen\nBrannoc\n", encoding="utf-8"
    )

    assert load_vocabulary(path) == ("Elowen", "Quillo fan", "Brannoc")
    assert bench_parser().parse_args(["corpus", "--vocabulary", str(path)]).vocabulary == path
    assert bench_parser().parse_args(["corpus"]).vocabulary is None


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# nobody yet\n\n", "no names"),
        ("".join(f"Name{index}\n" for index in range(201)), "more than 200 names"),
        ("Elowen\n" + "x" * 101 + "\n", "longer than 100 characters"),
    ],
)
def test_a_vocabulary_file_a_request_cannot_carry_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BenchError, match=problem):
        load_vocabulary(path)
    with pytest.raises(BenchError, match="cannot read"):
        load_vocabulary(tmp_path / "missing.txt")


@contextlib.contextmanager
def scripted_server(
    scripts: Sequence[Sequence[Message]], heard: list[list[str | bytes]] | None = None
) -> Iterator[str]:
    """A WebSocket server on a thread; connection k gets `ready`, then after `end` the messages of scripts[k]
    and `done`; what each connection sent before `end` is appended to `heard`. Yields its URL."""
    pending = iter(scripts)

    def handler(ws: SyncServerConnection) -> None:
        replies = next(pending)
        messages: list[str | bytes] = []
        if heard is not None:
            heard.append(messages)
        ws.send(READY)
        for message in ws:
            if message == END:
                for reply in replies:
                    ws.send(reply.to_json())
                ws.send(Done(1).to_json())
                return
            messages.append(message)

    with serve_in_thread(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()
            thread.join()


SPOKEN = ("Elowen", "Quillo fan")


@pytest.mark.fast
@pytest.mark.parametrize("names", [(), SPOKEN])
async def test_the_websocket_transport_sends_the_names_in_a_config_message_before_the_audio(
    names: tuple[str, ...],
) -> None:
    heard: list[list[str | bytes]] = []
    with scripted_server([[final("Hi.")]], heard) as url:
        replay = await WebSocketTransport(url, Replay(realtime=False, trailing_silence_s=0.0, names=names)).play(
            bytes(3200)
        )

    assert [item.event for item in replay.events] == [final("Hi."), Done(1)]
    (messages,) = heard
    configs = [json.loads(message) for message in messages if isinstance(message, str)]
    audio = [message for message in messages if isinstance(message, bytes)]
    assert configs == ([{"type": "config", "vocabulary": list(names)}] if names else [])
    assert isinstance(messages[-1], bytes)
    assert b"".join(audio) == bytes(3200)
    if names:
        assert isinstance(messages[0], str)


async def replay_through_wyoming(names: tuple[str, ...]) -> tuple[list[WyomingEvent], Playback]:
    """Replay 0.1 s of silence through a Wyoming server that records every event up to `audio-stop`, then answers
    with a transcript; what it heard and the replay."""
    heard: list[WyomingEvent] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (event := await async_read_event(reader)) is not None:
            heard.append(event)
            if AudioStop.is_type(event.type):
                await async_write_event(Transcript("Dim Elowen's lamp.").event(), writer)
                break
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        transport = WyomingTransport(f"tcp://127.0.0.1:{port}", "en", Replay(False, 0.0, names))
        return heard, await transport.play(bytes(3200))


@pytest.mark.fast
async def test_the_wyoming_transport_puts_the_names_in_transcribe() -> None:
    heard, replay = await replay_through_wyoming(SPOKEN)

    assert [event.type for event in heard] == ["transcribe", "audio-start", *["audio-chunk"] * 5, "audio-stop"]
    transcribe = Transcribe.from_event(heard[0])
    assert (transcribe.language, transcribe.transcript_names) == ("en", ["Elowen", "Quillo fan"])
    assert [item.event for item in replay.events] == [Final("Dim Elowen's lamp.", 1, 0, 0, 0, 0.0, 0.0)]


@pytest.mark.fast
async def test_the_wyoming_transport_without_names_leaves_them_out_of_transcribe() -> None:
    heard, _replay = await replay_through_wyoming(())

    assert heard[0].type == "transcribe"
    assert "transcript_names" not in (heard[0].data or {})


class MishearingTranscriber:
    """Stands in for the model of the whole-clip decode: hears every clip as "Dim Ellowen's lamp." and records
    the prompt of each decode and whether it was told the prompt holds names."""

    common_words = frozenset({"dim", "lamp"})

    def __init__(self) -> None:
        self.asked: list[tuple[str, bool]] = []

    def decode(
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> ModelTranscript:
        """The same words for any audio."""
        self.asked.append((prompt, names is not None))
        return ModelTranscript((Word(0.1, 0.4, " Dim"), Word(0.4, 0.9, " Ellowen's"), Word(0.9, 1.2, " lamp.")), 40.0)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("names", "prompt", "hypothesis", "named"),
    [
        (NAMES, "We have Elowen and Quillo fan and Brannoc.", "Dim Elowen's lamp.", (1, 1)),
        ((), "", "Dim Ellowen's lamp.", (0, 0)),
    ],
)
def test_the_whole_clip_decode_prompts_with_the_names_and_spells_them_as_the_service_does(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    names: tuple[str, ...],
    prompt: str,
    hypothesis: str,
    named: tuple[int, int],
) -> None:
    model = MishearingTranscriber()

    def load(settings: ModelSettings) -> MishearingTranscriber:
        return model

    monkeypatch.setattr(runner, "WhisperTranscriber", load)
    write_clip(tmp_path, "a", "dim Elowen's lamp")

    clips, summary = runner.decode_whole(load_corpus(tmp_path), Settings(), names)

    assert model.asked == [(prompt, bool(names))]
    assert [(clip.hypothesis, clip.names_found, clip.names_expected) for clip in clips] == [(hypothesis, *named)]
    assert (summary.names_found, summary.names_expected) == named


@dataclasses.dataclass(frozen=True)
class DecodeCall:
    """One call of the whole-clip decode: the clips' names and the household's names it was given."""

    clips: tuple[str, ...]
    names: tuple[str, ...]


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[DecodeCall]:
    """Stands in for the whole-clip decode (no model in fast tests), hearing every clip as its reference;
    records each call."""
    calls: list[DecodeCall] = []

    def decode_whole(
        clips: Sequence[Clip], settings: Settings, names: tuple[str, ...] = ()
    ) -> tuple[list[OfflineClip], OfflineSummary]:
        calls.append(DecodeCall(tuple(clip.name for clip in clips), names))
        results = []
        for clip in clips:
            named = score_names(clip.reference, clip.reference, names)
            results.append(OfflineClip(clip.name, clip.reference, 0, 350.0, 0, 0, named.found, named.expected))
        found, expected = sum(r.names_found for r in results), sum(r.names_expected for r in results)
        return results, dataclasses.replace(
            OFFLINE, names_found=found, names_expected=expected, names_right=found / expected if expected else None
        )

    monkeypatch.setattr(command, "decode_whole", decode_whole)
    return calls


def bench(corpus: Path, url: str, *flags: str) -> int:
    """`edge-asr bench CORPUS --url URL --fast FLAGS` with default settings."""
    args = bench_parser().parse_args([str(corpus), "--url", url, "--fast", "--trailing-silence", "0", *flags])
    return command.run(args, Settings())


@pytest.mark.fast
def test_bench_replays_the_corpus_once_per_run_and_decodes_it_whole_once(
    tmp_path: Path, decodes: list[DecodeCall], capsys: pytest.CaptureFixture[str]
) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    write_clip(tmp_path, "b", "")
    scripts = [[final("Turn on the lights.", revised=True)], [], [final("Turn on the lights now.")], []]
    json_path = tmp_path / "report.json"

    with scripted_server(scripts) as url:
        status = bench(tmp_path, url, "--runs", "2", "--json", str(json_path))

    assert status == 0
    assert decodes == [DecodeCall(("a", "b"), ())]
    data = json.loads(json_path.read_text())
    assert [run["clips"][0]["hypothesis"] for run in data["runs"]] == ["Turn on the lights.", "Turn on the lights now."]
    assert [run["streaming"]["revised_finals"] for run in data["runs"]] == [1, 0]
    assert [run["streaming"]["inserted_after_speech"] for run in data["runs"]] == [0, 1]
    assert data["median"]["wer"] == 0.125
    assert data["stability"] == {"share": 0.5, "differing_clips": ["a"]}
    assert data["streaming"] == data["runs"][0]["streaming"]
    assert (data["offline"]["word_errors"], data["offline"]["decode_ms_mean"]) == (2, 350.0)
    assert [clip["name"] for clip in data["offline_clips"]] == ["a", "b"]
    out = capsys.readouterr().out
    assert list(table_rows(out)) == ["streaming 1", "streaming 2", "median", "offline"]
    assert out.splitlines()[-1] == "same final text in 50% of clips across 2 runs; differs: a"


@pytest.mark.fast
def test_bench_fails_when_a_clip_of_a_later_run_got_an_error(
    tmp_path: Path, decodes: list[DecodeCall], capsys: pytest.CaptureFixture[str]
) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    scripts: list[list[Message]] = [[final("Turn on the lights.")], [SessionError("busy", "too many sessions")]]

    with scripted_server(scripts) as url:
        status = bench(tmp_path, url, "--runs", "2", "--no-offline", "--json", "-")

    assert status == 1
    assert decodes == []
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [run["streaming"]["clip_errors"] for run in data["runs"]] == [0, 1]
    assert [run["streaming"]["no_final"] for run in data["runs"]] == [0, 1]
    assert data["offline"] is None
    assert "1 clip(s) with errors over 2 runs" in captured.err
    assert "offline" not in table_rows(captured.err)


@pytest.mark.fast
def test_bench_with_a_vocabulary_sends_the_names_decodes_with_them_and_counts_names_right(
    tmp_path: Path, decodes: list[DecodeCall], capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_clip(corpus, "a", "Elowen, call Elowen")
    write_clip(corpus, "b", "turn on the Quillo fan")
    names = tmp_path / "names.txt"
    names.write_text("# family\nElowen\n\nQuillo fan\n", encoding="utf-8")
    heard: list[list[str | bytes]] = []

    with scripted_server([[final("Elowen, call Ellen.")], [final("Turn on the quillo fan.")]], heard) as url:
        status = bench(corpus, url, "--vocabulary", str(names), "--json", "-")

    assert status == 0
    config = {"type": "config", "vocabulary": ["Elowen", "Quillo fan"]}
    assert [json.loads(messages[0]) for messages in heard] == [config, config]
    assert all(isinstance(message, bytes) for messages in heard for message in messages[1:])
    assert decodes == [DecodeCall(("a", "b"), ("Elowen", "Quillo fan"))]
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [(clip["names_found"], clip["names_expected"]) for clip in data["clips"]] == [(1, 2), (1, 1)]
    assert (data["streaming"]["names_found"], data["streaming"]["names_expected"]) == (2, 3)
    assert (data["offline"]["names_found"], data["offline"]["names_expected"]) == (3, 3)
    rows = table_rows(captured.err)
    assert (rows["streaming"]["names right"], rows["offline"]["names right"]) == ("names 2/3", "names 3/3")


def exposition(websocket: int, wyoming: int = 0, audio_s: float = 0.0) -> str:
    """A node's /metrics text, rendered by the service's own metrics, with this many sessions opened and this much
    audio received so far."""
    metrics = Metrics()
    metrics.sessions_total.labels("websocket").inc(websocket)
    metrics.sessions_total.labels("wyoming").inc(wyoming)
    metrics.audio_seconds_total.inc(audio_s)
    return metrics.render().decode()


@contextlib.contextmanager
def fake_node(answers: Sequence[str | int]) -> Iterator[str]:
    """A node's /metrics on a thread: GET k gets answers[k], an exposition or an HTTP status (the last answer
    repeats). Yields its base URL."""
    pending = list(answers)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = pending.pop(0) if len(pending) > 1 else pending[0]
            body = answer.encode() if isinstance(answer, str) else b"no"
            self.send_response(200 if isinstance(answer, str) else answer)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # shutdown() waits for the serving loop's next poll: half a second per node at the default interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.fast
def test_bench_through_a_balancer_reports_the_sessions_each_node_opened_during_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    write_clip(tmp_path, "b", "")
    write_clip(tmp_path, "c", "turn on the lights")
    scripts: list[list[Message]] = [[final("Turn on the lights.")], [], [final("Turn on the lights.")]]

    # node1 also served two Wyoming sessions meanwhile: only the bench's protocol counts.
    with (
        fake_node([exposition(5, wyoming=1, audio_s=30.0), exposition(7, wyoming=3, audio_s=41.0)]) as node1,
        fake_node([exposition(0), exposition(1, audio_s=3.0)]) as node2,
        scripted_server(scripts) as url,
    ):
        status = bench(tmp_path, url, "--no-offline", "--json", "-", "--nodes", f"{node1},{node2}/")

    assert status == 0
    captured = capsys.readouterr()
    # The audio counts every protocol's: it is the load the balancer spread.
    line = f"websocket sessions per node (3 of the bench's 3): {node1} 2 (11 s of audio), {node2} 1 (3 s of audio)"
    assert line in captured.err.splitlines()
    assert list(table_rows(captured.err)) == ["streaming"]
    assert json.loads(captured.out)["nodes"] == [
        {"node": node1, "sessions": 2, "problem": None, "audio_s": 11.0},
        {"node": node2, "sessions": 1, "problem": None, "audio_s": 3.0},
    ]


@pytest.mark.fast
def test_a_node_that_restarted_or_went_away_during_the_run_is_reported_without_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    scripts: list[list[Message]] = [[final("Turn on the lights.")]] * 2

    with (
        fake_node([exposition(9), exposition(1)]) as restarted,
        fake_node([exposition(4), 503]) as gone,
        fake_node([exposition(0), exposition(2, audio_s=6.0)]) as node3,
        scripted_server(scripts) as url,
    ):
        status = bench(tmp_path, url, "--no-offline", "--runs", "2", "--nodes", f"{restarted},{gone},{node3}")

    assert status == 0, "the run's own figures still stand"
    lines = capsys.readouterr().out.splitlines()
    [line] = [line for line in lines if line.startswith("websocket sessions per node")]
    assert line == (
        f"websocket sessions per node (2 of the bench's 2): {restarted} n/a (restarted during the run),"
        f" {gone} n/a (unreadable after the run: cannot read {gone}/metrics: HTTP 503), {node3} 2 (6 s of audio)"
    )
    assert lines[-1].startswith("same final text"), "the node line comes under the rows, before stability"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (401, "HTTP 401 (a node with http.token wants it for /metrics)"),
        ("<html>not metrics</html>", "is not Prometheus text"),
    ],
)
def test_a_node_unreadable_before_the_run_stops_the_bench_before_any_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: str | int, problem: str
) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    heard: list[list[str | bytes]] = []

    with fake_node([answer]) as node, scripted_server([], heard) as url:
        status = bench(tmp_path, url, "--no-offline", "--nodes", node)

    assert status == 1
    assert heard == []
    assert problem in capsys.readouterr().err


@pytest.mark.fast
def test_an_unreachable_node_before_the_run_stops_the_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_clip(tmp_path, "a", "turn on the lights")
    with fake_node([exposition(0)]) as node:
        pass  # closed again: nothing listens there now

    assert bench(tmp_path, "ws://127.0.0.1:9/ws/stream", "--no-offline", "--nodes", node) == 1
    assert f"cannot read {node}/metrics" in capsys.readouterr().err


@pytest.mark.fast
def test_the_nodes_count_the_sessions_of_the_wyoming_protocol_when_the_bench_speaks_it() -> None:
    with fake_node([exposition(3, wyoming=10, audio_s=40.0), exposition(8, wyoming=14, audio_s=52.0)]) as node:
        before = read_all([node])
        counted = sessions_during([node], before, "wyoming")

    assert counted == (NodeSessions(node, 4, audio_s=12.0),)
    assert format_nodes(counted, "wyoming", 6) == (
        f"wyoming sessions per node (4 of the bench's 6): {node} 4 (12 s of audio)"
    )


@pytest.mark.fast
def test_nodes_are_base_urls_and_only_apply_through_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = bench_parser().parse_args(["corpus", "--nodes", " http://10.0.0.11:8787/, https://node2:8787"])
    assert args.nodes == ("http://10.0.0.11:8787", "https://node2:8787")
    assert bench_parser().parse_args(["corpus"]).nodes is None
    for bad in ("", "10.0.0.11:8787", "http://node1:8787/metrics", "http://a:1,http://a:1", "ws://node1:8787"):
        with pytest.raises(SystemExit):
            bench_parser().parse_args(["corpus", "--nodes", bad])
    capsys.readouterr()

    args = bench_parser().parse_args([str(tmp_path), "--nodes", "http://127.0.0.1:9"])
    assert command.run(args, Settings()) == 1
    assert "--nodes only applies with --url or --wyoming" in capsys.readouterr().err
