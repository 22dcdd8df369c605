"""The endpointer: when a voice command is over (the silence after it, and what its whole decode says), on real speech
and a scripted transcriber; and its rules on their own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from edge_asr.config import ConfigError, EndpointingSettings, LimitSettings, StreamSettings, build_settings
from edge_asr.endpointing import MIN_SILENCE_S, EndpointRules, EndReason, Verdict
from edge_asr.events import Done, Final
from edge_asr.session import StreamSession
from edge_asr.transcript import EndCues, Word
from edge_asr.vad import VadGate

from .speech import read_pcm, silence
from .test_session import Audio, Driver, Script

pytestmark = pytest.mark.fast

RULES = EndpointRules.of(EndpointingSettings())
COMMAND = "cmd_piper_joe_03"  # "set the thermostat to seventy two degrees"
# The stream position of an event is that of the chunk after which it came: the VAD's frame and the driver's chunk.
GRAIN_S = 0.06


def words(*texts: str, probability: float = 0.9) -> tuple[Word, ...]:
    """Words one after another, 0.3 s each."""
    return tuple(Word(index * 0.3, index * 0.3 + 0.25, text, probability) for index, text in enumerate(texts))


def punctuated(script: Script) -> Script:
    """The script with the decoder's full stop on its last word."""
    *head, (text, start, end) = script
    return [*head, (f"{text}.", start, end)]


def endpointed(
    script: Script,
    rules: EndpointRules = RULES,
    language: str = "en",
    limits: LimitSettings | None = None,
    end_cues: EndCues | None = None,
) -> Driver:
    """A driver for a Wyoming request whose command the session ends; its transcriber gives `end_cues` to a decode
    that asks for them."""
    stream = StreamSettings()
    session = StreamSession(
        stream, limits or LimitSettings(), split_on_silence=False, language=language, endpoint_rules=rules
    )
    return Driver(
        session,
        script,
        stream.final_silence_ms / 1000,
        VadGate.of(stream, ends_commands=True).final_tail_s,
        end_cues=end_cues,
    )


def voice_end(lead_s: float, name: str) -> float:
    """Where the session's VAD puts the end of the last voiced frame of a command said after `lead_s` of silence."""
    gate = VadGate.of(StreamSettings(), ends_commands=True)
    gate.push(silence(lead_s) + read_pcm(name))
    return gate.last_voice_end_s


def done_at(driver: Driver) -> float:
    """Where in the stream the request's `Done` came."""
    [done] = [emitted for emitted in driver.log if isinstance(emitted.event, Done)]
    return done.stream_s


# --- the rules -----------------------------------------------------------------------------------


def test_a_command_that_ends_on_a_word_a_command_ends_on_with_a_full_stop_is_complete() -> None:
    assert RULES.verdict(words(" Turn", " on", " the", " lights."), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" What", " time", " is", " it?"), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" Turn", " the", " fan", " on."), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" Stop."), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" Is", " the", " garage", " door", " open?"), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" Dim", " the", " lights", " to", " 30%."), "en") is Verdict.COMPLETE
    assert RULES.verdict(words(" Set", " an", " alarm", " for", " 7.30."), "en") is Verdict.COMPLETE


@pytest.mark.parametrize(
    "texts",
    [
        (" Turn", " on", " the."),  # an article
        (" Set", " a", " timer", " for."),  # a preposition
        (" Lights", " and."),  # a conjunction
        (" Set", " it", " to", " twenty."),  # a number that may go on
        (" Set", " it", " to", " 20."),  # the same number in digits
        (" Turn", " on."),  # a particle right after its verb
        (" Set.",),  # a verb that waits for its object
        (" Can", " you", " open."),  # ... and after a pronoun
        (" Set", " it", " to", " 200."),  # hundreds may go on
        (" Turn", " on", " the", " lights"),  # no end-of-sentence punctuation
        (" Turn", " on", " the", " lights..."),  # the decoder heard the speech trail off or go on
        (" Turn", " on", " the", " lights\u2026"),
    ],
)
def test_a_command_that_cannot_end_there_is_unfinished(texts: tuple[str, ...]) -> None:
    assert RULES.verdict(words(*texts), "en") is Verdict.UNFINISHED


def test_a_last_word_the_decoder_was_unsure_of_is_unfinished() -> None:
    assert RULES.verdict(words(" Turn", " on", " the", " lights.", probability=0.3), "en") is Verdict.UNFINISHED


def test_other_languages_use_no_word_list_only_punctuation_and_confidence() -> None:
    assert RULES.verdict(words(" Mach", " das", " Licht", " an", " the."), "de") is Verdict.COMPLETE
    assert RULES.verdict(words(" Mach", " das", " Licht", " an"), "de") is Verdict.UNFINISHED
    assert RULES.verdict(words(" 把灯打开。"), "zh") is Verdict.COMPLETE


# Cues that just make a command sure, and cues that say all they can.
SURE = EndCues(RULES.sure_end_probability, -RULES.sure_pitch_fall_st)
CERTAIN = EndCues(0.99, -6.0)


def test_a_complete_command_the_decoder_and_the_voice_say_ends_there_is_sure() -> None:
    lights = words(" Turn", " on", " the", " lights.")
    assert RULES.verdict(lights, "en", SURE) is Verdict.SURE
    assert RULES.verdict(lights, "en", None) is Verdict.COMPLETE
    assert RULES.verdict(words(" Mach", " das", " Licht", " an."), "de", CERTAIN) is Verdict.SURE


@pytest.mark.parametrize(
    "cues",
    [
        EndCues(RULES.sure_end_probability - 0.01, -6.0),  # the decoder is not sure enough
        EndCues(0.99, -RULES.sure_pitch_fall_st + 0.1),  # the voice hardly fell
        EndCues(0.99, 2.0),  # ... or rose, as a phrase that goes on (or a question) does
        EndCues(None, -6.0),  # the text ends no sentence
        EndCues(0.99, None),  # too little voice to tell
    ],
)
def test_a_complete_command_is_not_sure_unless_both_cues_say_so(cues: EndCues) -> None:
    assert RULES.verdict(words(" Turn", " on", " the", " lights."), "en", cues) is Verdict.COMPLETE


def test_a_complete_command_whose_end_the_decoder_does_not_expect_is_unfinished() -> None:
    lights = words(" Turn", " on", " the", " lights.")
    assert RULES.verdict(lights, "en", EndCues(RULES.min_end_probability - 0.01, -6.0)) is Verdict.UNFINISHED
    assert RULES.verdict(lights, "en", EndCues(RULES.min_end_probability, 0.0)) is Verdict.COMPLETE
    # A decode that was not judged (or could not be) is taken at its words.
    assert RULES.verdict(lights, "en", EndCues(None, None)) is Verdict.COMPLETE
    assert RULES.verdict(lights, "en", None) is Verdict.COMPLETE


def test_however_sure_the_cues_a_command_that_cannot_end_there_waits() -> None:
    assert RULES.verdict(words(" Set", " it", " to", " twenty."), "en", CERTAIN) is Verdict.UNFINISHED
    assert (
        RULES.verdict(words(" Turn", " on", " the", " lights.", probability=0.3), "en", CERTAIN) is Verdict.UNFINISHED
    )
    assert RULES.verdict(words(" Turn", " on", " the", " lights"), "en", CERTAIN) is Verdict.UNFINISHED


def test_no_word_is_nothing() -> None:
    assert RULES.verdict((), "en") is Verdict.NOTHING
    assert RULES.verdict(words(" ...", " ."), "en") is Verdict.NOTHING


def said(verdict: Verdict) -> Callable[[], Verdict]:
    """A decode's verdict, as the rules ask for it."""
    return lambda: verdict


def test_the_decode_is_not_asked_while_neither_the_silence_nor_the_clock_could_end_the_request() -> None:
    def unasked() -> Verdict:
        raise AssertionError("the verdict was asked")

    assert RULES.end(audio_s=3.0, silence_s=RULES.sure_silence_s - 0.01, verdict=unasked) is None
    assert RULES.end(audio_s=3.0, silence_s=None, verdict=unasked) is None
    assert RULES.end(audio_s=RULES.max_command_s, silence_s=None, verdict=unasked) is EndReason.TOO_LONG


def test_the_silence_a_command_waits_for_depends_on_its_verdict() -> None:
    sure, complete, unfinished = RULES.sure_silence_s, RULES.complete_silence_s, RULES.unfinished_silence_s
    assert sure < complete < unfinished
    assert RULES.end(audio_s=3.0, silence_s=sure - 0.01, verdict=said(Verdict.SURE)) is None
    assert RULES.end(audio_s=3.0, silence_s=sure, verdict=said(Verdict.SURE)) is EndReason.COMMAND
    assert RULES.end(audio_s=3.0, silence_s=sure, verdict=said(Verdict.COMPLETE)) is None
    assert RULES.end(audio_s=3.0, silence_s=complete - 0.01, verdict=said(Verdict.COMPLETE)) is None
    assert RULES.end(audio_s=3.0, silence_s=complete, verdict=said(Verdict.COMPLETE)) is EndReason.COMMAND
    for verdict in (Verdict.UNFINISHED, Verdict.UNDECODED):
        assert RULES.end(audio_s=3.0, silence_s=complete, verdict=said(verdict)) is None
        assert RULES.end(audio_s=3.0, silence_s=unfinished, verdict=said(verdict)) is EndReason.COMMAND
    assert RULES.end(audio_s=3.0, silence_s=None, verdict=said(Verdict.COMPLETE)) is None


def test_no_speech_ends_only_after_no_speech_s_and_a_long_command_at_max_command_s() -> None:
    assert RULES.end(audio_s=RULES.no_speech_s - 0.1, silence_s=None, verdict=said(Verdict.NOTHING)) is None
    assert RULES.end(audio_s=RULES.no_speech_s, silence_s=None, verdict=said(Verdict.NOTHING)) is EndReason.NO_SPEECH
    # Speech the decoder found nothing in is no speech: it is not ended by its silence.
    assert RULES.end(audio_s=3.0, silence_s=5.0, verdict=said(Verdict.NOTHING)) is None
    assert RULES.end(audio_s=RULES.max_command_s, silence_s=None, verdict=said(Verdict.UNDECODED)) is EndReason.TOO_LONG


def test_a_client_s_sensitivity_scales_the_silences_as_home_assistant_s_does() -> None:
    settings = EndpointingSettings(sure_silence_ms=210, complete_silence_ms=300, unfinished_silence_ms=1400)
    relaxed = EndpointRules.of(settings, "relaxed")
    aggressive = EndpointRules.of(settings, "aggressive")
    assert relaxed.sure_silence_s == pytest.approx(0.21 * 1.25 / 0.7)
    assert aggressive.sure_silence_s == MIN_SILENCE_S
    assert relaxed.complete_silence_s == pytest.approx(0.3 * 1.25 / 0.7)
    assert relaxed.unfinished_silence_s == pytest.approx(1.4 * 1.25 / 0.7)
    assert aggressive.unfinished_silence_s == pytest.approx(1.4 * 0.25 / 0.7)
    assert aggressive.complete_silence_s == MIN_SILENCE_S  # 0.107 s scaled, but never below the floor
    assert EndpointRules.of(settings, "default") == EndpointRules.of(settings)


def test_a_complete_command_may_not_wait_longer_than_an_unfinished_one() -> None:
    with pytest.raises(ConfigError, match=r"^endpointing\.complete_silence_ms: must not exceed"):
        build_settings({"endpointing": {"complete_silence_ms": 1200, "unfinished_silence_ms": 1000}})


def test_a_sure_command_never_waits_longer_than_a_complete_one() -> None:
    # Lowering complete_silence_ms alone lowers both.
    rules = EndpointRules.of(build_settings({"endpointing": {"complete_silence_ms": 300}}).endpointing)
    assert rules.sure_silence_s == rules.complete_silence_s == pytest.approx(0.3)


def test_decodes_are_asked_for_the_cues_only_where_the_rules_use_them() -> None:
    assert RULES.judges_end
    no_sooner = EndpointingSettings(sure_silence_ms=600, complete_silence_ms=600)
    assert EndpointRules.of(no_sooner).judges_end, "the floor of the end probability still needs it"
    assert not EndpointRules.of(dataclasses.replace(no_sooner, min_end_probability=0.0)).judges_end


# --- a session that ends its command ---------------------------------------------------------------


def test_a_complete_command_ends_after_its_short_silence_with_one_final_and_done() -> None:
    audio = Audio().pause(0.3).say(COMMAND).pause(3.0)
    driver = endpointed(punctuated(audio.script))
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text == "set the thermostat to seventy two degrees."
    assert [type(event) for event in driver.events if not isinstance(event, Final)][-1] is Done
    spoken_end = voice_end(0.3, COMMAND)
    assert spoken_end + RULES.complete_silence_s <= done_at(driver) <= spoken_end + RULES.complete_silence_s + GRAIN_S
    assert driver.session.finished


def test_a_command_the_decoder_is_sure_of_ends_after_the_shortest_silence() -> None:
    audio = Audio().pause(0.3).say(COMMAND).pause(3.0)
    driver = endpointed(punctuated(audio.script), end_cues=SURE)
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text == "set the thermostat to seventy two degrees."
    spoken_end = voice_end(0.3, COMMAND)
    assert spoken_end + RULES.sure_silence_s <= done_at(driver) <= spoken_end + RULES.sure_silence_s + GRAIN_S
    # The whole decodes ask for it; the partials, which the endpointer does not read, do not.
    assert {request.judge_end for request in driver.requests if request.final} == {True}
    assert {request.judge_end for request in driver.requests if not request.final} <= {False}


def test_a_command_the_cues_are_unsure_of_waits_for_the_complete_silence() -> None:
    audio = Audio().pause(0.3).say(COMMAND).pause(3.0)
    driver = endpointed(punctuated(audio.script), end_cues=EndCues(0.99, 0.0))
    driver.feed(audio.pcm)

    assert len(driver.finals()) == 1
    spoken_end = voice_end(0.3, COMMAND)
    assert spoken_end + RULES.complete_silence_s <= done_at(driver) <= spoken_end + RULES.complete_silence_s + GRAIN_S


def test_without_a_sooner_end_no_decode_asks_for_the_end_probability() -> None:
    rules = EndpointRules.of(EndpointingSettings(sure_silence_ms=600, complete_silence_ms=600, min_end_probability=0))
    audio = Audio().pause(0.3).say(COMMAND).pause(3.0)
    driver = endpointed(punctuated(audio.script), rules, end_cues=CERTAIN)
    driver.feed(audio.pcm)

    assert len(driver.finals()) == 1
    assert not any(request.judge_end for request in driver.requests)
    spoken_end = voice_end(0.3, COMMAND)
    assert spoken_end + rules.complete_silence_s <= done_at(driver) <= spoken_end + rules.complete_silence_s + GRAIN_S


def test_an_unfinished_command_waits_for_the_long_silence() -> None:
    audio = Audio().pause(0.3).say(COMMAND).pause(3.0)
    driver = endpointed(audio.script)  # no full stop: the decoder did not end the sentence
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text == "set the thermostat to seventy two degrees"
    spoken_end = voice_end(0.3, COMMAND)
    assert (
        spoken_end + RULES.unfinished_silence_s <= done_at(driver) <= spoken_end + RULES.unfinished_silence_s + GRAIN_S
    )


def test_a_pause_inside_a_command_shorter_than_the_silence_does_not_end_it() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_05").pause(0.15).say(COMMAND).pause(2.0)
    driver = endpointed(punctuated(audio.script))
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text.startswith("open the garage door")
    assert final.text.endswith("seventy two degrees.")


def test_audio_after_the_end_is_not_heard_and_the_end_of_audio_adds_nothing() -> None:
    audio = Audio().pause(0.3).say(COMMAND).pause(1.0)
    driver = endpointed(punctuated(audio.script))
    driver.feed(audio.pcm)
    requests = len(driver.requests)
    events = len(driver.events)

    driver.feed(read_pcm("cmd_piper_joe_05") + silence(1.0))
    assert driver.end() == []
    assert len(driver.requests) == requests
    assert len(driver.events) == events
    assert not driver.session.wants_decode()


def test_no_speech_at_all_ends_the_request_with_done_and_no_final() -> None:
    rules = dataclasses.replace(RULES, no_speech_s=2.0)
    driver = endpointed([], rules)
    driver.feed(silence(3.0))

    assert driver.finals() == []
    assert [type(event) for event in driver.events] == [Done]
    assert done_at(driver) == pytest.approx(2.0, abs=0.021)


def test_speech_the_decoder_hears_nothing_in_is_not_a_command_until_no_speech_s() -> None:
    rules = dataclasses.replace(RULES, no_speech_s=5.0)
    audio = Audio().pause(0.3).say(COMMAND).pause(5.0)
    driver = endpointed([], rules)  # the transcriber hears nothing: a cough, a door
    driver.feed(audio.pcm)

    assert driver.finals() == []
    assert done_at(driver) == pytest.approx(5.0, abs=0.021)


def test_a_command_that_goes_on_ends_at_max_command_s() -> None:
    rules = dataclasses.replace(RULES, max_command_s=4.0)
    audio = Audio().pause(0.3).say(COMMAND).pause(0.1).say(COMMAND).pause(0.1).say(COMMAND)
    driver = endpointed(punctuated(audio.script), rules)
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.end == pytest.approx(4.0, abs=0.021)
    assert done_at(driver) == pytest.approx(4.0, abs=0.021)
