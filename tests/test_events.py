"""The wire messages: each owns its dict form both ways, and malformed ones are refused with a reason."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_asr.events import (
    Done,
    Final,
    Message,
    Partial,
    Ready,
    SessionError,
    SessionInfo,
    message_from_dict,
    words_after,
)

pytestmark = pytest.mark.fast

MESSAGES: list[Message] = [
    Ready(session=3, sample_rate=16000, language="en", max_frame_bytes=262144),
    Partial(text="set the thermo", stable="set the", utterance=1, asr_ms=97, e2e_ms=120),
    Final(text="Set the thermostat.", utterance=1, asr_ms=90, e2e_ms=110, ttct_ms=380, start=0.0, end=2.86),
    Final(text="Lights on.", utterance=2, asr_ms=1, e2e_ms=2, ttct_ms=3, start=3.5, end=4.25, revised=True),
    SessionError(code="busy", message="all 8 sessions are in use"),
    Done(utterances=2),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_reads_back_from_its_json(message: Message) -> None:
    data = json.loads(message.to_json())

    assert data["type"] == message.kind
    assert message_from_dict(data) == message


def test_a_final_rounds_its_times_to_the_millisecond_on_the_wire() -> None:
    final = Final("x", 1, 1, 1, 1, start=1.23456, end=2.0004)

    assert final.to_dict()["start"] == 1.235
    assert final.to_dict()["end"] == 2.0
    assert final.to_dict()["revised"] is False


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([], "JSON object"),
        ({"text": "x"}, "unknown message type None"),
        ({"type": ["final"]}, "unknown message type"),
        ({"type": "shout"}, "unknown message type 'shout'"),
        ({"type": "done"}, "without 'utterances'"),
        ({"type": "done", "utterances": "2"}, "done.utterances must be int"),
        ({"type": "done", "utterances": True}, "done.utterances must be int"),
        ({"type": "error", "code": 1, "message": "m"}, "error.code must be str"),
        (
            {
                "type": "final",
                "text": "x",
                "utterance": 1,
                "asr_ms": 1,
                "e2e_ms": 1,
                "ttct_ms": 1,
                "start": "0",
                "end": 1,
            },
            "final.start must be float",
        ),
    ],
)
def test_a_malformed_message_is_refused_with_the_field_named(data: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        message_from_dict(data)


def test_a_final_without_revised_reads_as_not_revised_and_an_int_time_as_float() -> None:
    data = {"type": "final", "text": "x", "utterance": 1, "asr_ms": 1, "e2e_ms": 1, "ttct_ms": 1, "start": 0, "end": 2}

    final = message_from_dict(data)

    assert final == Final("x", 1, 1, 1, 1, 0.0, 2.0, revised=False)


@given(st.dictionaries(st.text(max_size=12), st.none() | st.booleans() | st.integers() | st.text(max_size=8)))
def test_any_dict_is_read_or_refused_with_a_value_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        message_from_dict(data)


def test_session_facts_use_the_names_listeners_publish() -> None:
    assert SessionInfo(4, "wyoming", "hall", "en", 12, "0123456789ab").to_dict() == {
        "session": 4,
        "adapter": "wyoming",
        "site": "hall",
        "language": "en",
        "vocabulary_names": 12,
        "vocabulary_digest": "0123456789ab",
    }


@pytest.mark.parametrize(
    ("text", "stable", "after"),
    [
        ("set the thermostat to 72.", "set the", "thermostat to 72."),
        ("Set the thermostat, to 72.", "set the thermostat", "to 72."),
        ("set the thermos", "set the thermostat", None),
        ("set the", "set the thermostat", None),
        ("set the", "set the", ""),
        ("hello world", "", "hello world"),
        ("", "", ""),
    ],
)
def test_words_after_the_stable_text_compare_without_case_or_punctuation(
    text: str, stable: str, after: str | None
) -> None:
    assert words_after(text, stable) == after
