"""`edge-asr bench --soak`: how finals are matched between clients and broker (fast), and a one-minute soak of the
real service, model and mosquitto broker whose report must show nothing lost and nothing left open."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge_asr.bench.corpus import Clip
from edge_asr.bench.processes import parse_metrics
from edge_asr.bench.soak import REST_S, default_rss_limit_mb, soak_plan
from edge_asr.bench.soak_clients import ClientKind, ClientRun, ReceivedFinal
from edge_asr.bench.soak_mqtt import BrokerFinal, read_final
from edge_asr.bench.soak_report import account, rss_tally
from edge_asr.metrics import Metrics

from .speech import REPO, SPEECH_DIR

# Short spoken commands keep the one-minute soak light; the run, the model load and the stops take ~80 s.
SOAK_CLIPS = "cmd_piper_joe_*"
SOAK_TIMEOUT_S = 240


def client(
    kind: ClientKind,
    site: str,
    session: int | None,
    *finals: tuple[int, str],
    owed: tuple[int, ...] = (),
    spoke_unread: bool = False,
) -> ClientRun:
    """A client's record with these finals received."""
    return ClientRun(
        kind=kind,
        site=site,
        clip="clip",
        started_s=0.0,
        audio_s=1.0,
        session=session,
        finals=tuple(ReceivedFinal(utterance, text) for utterance, text in finals),
        owed=owed,
        spoke_unread=spoke_unread,
        ended="done",
        cut_off_after_s=None,
        errors=(),
    )


def on_broker(site: str, session: int, utterance: int, text: str = "text") -> BrokerFinal:
    """A final the broker delivered."""
    return BrokerFinal(site, session, utterance, text, None)


@pytest.mark.fast
def test_finals_match_by_session_and_utterance_and_a_duplicate_delivery_counts_once() -> None:
    clients = [client("websocket", "ws", 3, (1, "a"), (2, "b")), client("slow-reader", "slow", 4, (1, "c"))]
    broker = [on_broker("ws", 3, 1), on_broker("ws", 3, 2), on_broker("ws", 3, 2), on_broker("slow", 4, 1)]

    tally = account(clients, broker, made_by_service=3)

    assert (tally.on_broker, tally.broker_duplicates, tally.received_by_clients) == (3, 1, 3)
    assert (tally.lost_on_clients, tally.lost_on_broker, tally.not_on_broker, tally.lost) == (0, 0, 0, ())


@pytest.mark.fast
def test_a_final_missing_on_either_side_is_lost() -> None:
    clients = [client("websocket", "ws", 3, (1, "a")), client("websocket", "ws", 5, (1, "b"))]
    # Session 3's second final reached the broker only; session 5's final reached its client only.
    broker = [on_broker("ws", 3, 1), on_broker("ws", 3, 2)]

    tally = account(clients, broker, made_by_service=3)

    assert (tally.lost_on_clients, tally.lost_on_broker, tally.not_on_broker) == (1, 1, 1)
    assert tally.lost == (
        "websocket ws session 3 (clip, at 0 s): final of utterance 2 not received by the client",
        "websocket ws session 5 (clip, at 0 s): final of utterance 1 not on the broker",
    )


@pytest.mark.fast
def test_clients_that_left_owe_the_broker_their_open_utterance_and_never_readers_their_clip() -> None:
    clients = [
        client("vanishing", "gone", 7, owed=(1,)),
        client("vanishing", "gone", 8, owed=(1,)),
        client("never-reader", "mute", 9, spoke_unread=True),
        client("never-reader", "mute", 10, spoke_unread=True),
    ]
    broker = [on_broker("gone", 7, 1), on_broker("mute", 9, 1)]

    tally = account(clients, broker, made_by_service=None)

    assert (tally.vanished_on_broker, tally.vanished_owed) == (1, 2)
    # What a client that left did not receive is not lost on the client; only the broker owes it.
    assert (tally.lost_on_clients, tally.lost_on_broker, tally.not_on_broker) == (0, 2, None)


@pytest.mark.fast
def test_wyoming_transcripts_match_the_text_of_their_sessions_on_the_broker_per_site() -> None:
    clients = [
        client("wyoming", "sat", None, (1, "turn on the light")),
        client("wyoming", "sat", None, (1, "")),
        client("wyoming", "sat", None, (1, "open the door")),
    ]
    # A request of two utterances has a transcript of both; an empty one was nothing said.
    broker = [on_broker("sat", 1, 1, "turn on"), on_broker("sat", 1, 2, "the light"), on_broker("sat", 4, 1, "lock")]

    tally = account(clients, broker, made_by_service=3)

    [wyoming] = [kind for kind in tally.kinds if kind.kind == "wyoming"]
    assert (wyoming.clients, wyoming.finals_on_broker, wyoming.lost_on_clients, wyoming.lost_on_broker) == (3, 2, 1, 1)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("reference", "has_words"), [("<beep ascending>", False), ("", False), (" ", False), ("Beep.", True)]
)
def test_a_clip_owes_a_final_only_when_its_reference_has_words_as_scored(reference: str, has_words: bool) -> None:
    assert Clip("clip", Path("clip.wav"), reference, 1.0).has_words is has_words


@pytest.mark.fast
def test_rss_growth_is_counted_between_the_readings_at_rest_and_the_peak_under_load_beside_it() -> None:
    samples = [(0.0, 200.0), (10.0, 240.0), (20.0, 250.0), (40.0, 251.0), (60.0, 252.0)]

    rss = rss_tally(samples, warmup_s=20.0, after_warmup_mb=230.0, end_mb=233.5, limit_mb=5.0, step_s=30.0)

    assert (rss.after_warmup_mb, rss.growth_mb, rss.peak_mb) == (230.0, 3.5, 252.0)
    assert rss.trend_mb_per_min == pytest.approx(3.0)
    assert rss.timeline == ((0.0, 200.0), (40.0, 251.0))


@pytest.mark.fast
def test_the_plan_scales_the_warm_up_and_the_rss_limit_with_the_run() -> None:
    limits = [default_rss_limit_mb(minutes) for minutes in (1, 10, 30, 90)]
    assert limits == [20.0, 5.0, 5.0, 15.0]
    short, long = soak_plan(1, None), soak_plan(30, 2.0)
    assert short.warmup_s == 30.0
    assert short.restarts_at_s == pytest.approx((20.0, 40.0))
    assert (long.warmup_s, long.max_rss_growth_mb) == (300.0, 2.0)


@pytest.mark.fast
def test_the_soak_reads_the_service_metrics_and_final_payloads() -> None:
    metrics = parse_metrics(Metrics().render().decode())
    fields = {"type": "final", "text": "hi", "utterance": 2, "session": 5, "site": "k"}
    payload = json.dumps({**fields, "timestamp": "1970-01-01T00:00:01.500Z"}).encode()

    # The counters of an idle service exist but have no labelled series yet: 0, not missing.
    assert (metrics.finals, metrics.events_dropped, metrics.mqtt_finals_dropped) == (0, 0, 0)
    assert read_final(payload) == BrokerFinal("k", 5, 2, "hi", 1.5)
    assert read_final(b'{"type": "final", "session": true}') is None


@pytest.mark.system
def test_a_one_minute_soak_loses_no_final_and_leaves_nothing_open(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    command = [sys.executable, "-m", "edge_asr", "bench", str(SPEECH_DIR), "--soak", "1", "--match", SOAK_CLIPS]
    result = subprocess.run(
        [*command, "--json", str(path)], cwd=REPO, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S, check=False
    )
    output = f"{result.stdout}\n{result.stderr}"
    assert path.is_file(), output
    report = json.loads(path.read_text(encoding="utf-8"))
    finals = report["finals"]

    assert report["sessions_left"] == 0, output
    assert report["tasks_left"] in (0, None), output
    assert (finals["lost_on_clients"], finals["lost_on_broker"], finals["not_on_broker"]) == (0, 0, 0), output
    assert_every_final_arrived(report)
    assert len(report["broker_restarts"]) >= 1, output
    assert report["subscriber_connects"] > len(report["broker_restarts"]), output
    assert finals["vanished_on_broker"] >= 1, output
    assert report["never_readers"]["cut_off"] >= 1, output
    assert_the_lanes_rested_for_the_reading_after_the_warm_up(report)
    assert report["service_exit_code"] == 0, output
    assert result.returncode == 0, output


def assert_the_lanes_rested_for_the_reading_after_the_warm_up(report: dict[str, Any]) -> None:
    """No client started between the end of the warm-up and the reading at rest, and clients started after it."""
    rest_ends_s = report["rss"]["warmup_s"] + REST_S
    started = [run["started_s"] for run in report["clients"]]
    assert not [at for at in started if report["rss"]["warmup_s"] <= at < rest_ends_s], started
    assert [at for at in started if at >= rest_ends_s], started


def assert_every_final_arrived(report: dict[str, Any]) -> None:
    """From the raw records, not the soak's own tally: the broker has as many distinct finals as the service made,
    every WebSocket client's finals are there, a client that read until done has every final of its session, and
    each satellite's transcripts are its sessions' texts on the broker."""
    distinct = {(f["site"], f["session"], f["utterance"]): f["text"] for f in report["broker_finals"]}
    assert len(distinct) == report["finals"]["made_by_service"] > 0
    for run in report["clients"]:
        received = {final["utterance"] for final in run["finals"]}
        if run["kind"] == "wyoming" or run["session"] is None:
            continue
        published = {
            utterance for site, session, utterance in distinct if (site, session) == (run["site"], run["session"])
        }
        assert received <= published, run
        if run["kind"] in ("websocket", "slow-reader"):
            assert received == published, run
    for site in {run["site"] for run in report["clients"] if run["kind"] == "wyoming"}:
        sessions: dict[int, list[tuple[int, str]]] = {}
        for (final_site, session, utterance), text in distinct.items():
            if final_site == site:
                sessions.setdefault(session, []).append((utterance, text))
        texts = Counter(" ".join(text for _u, text in sorted(finals) if text) for finals in sessions.values())
        transcripts = Counter(f["text"] for run in report["clients"] if run["site"] == site for f in run["finals"])
        texts.pop("", None)
        transcripts.pop("", None)
        assert texts == transcripts, site
