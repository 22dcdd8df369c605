"""`edge-asr bench --endpointing` against the real service: satellites that never send audio-stop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edge_asr.bench import command
from edge_asr.bench.arguments import add_arguments
from edge_asr.bench.processes import Service
from edge_asr.bench.scoring import score_words
from edge_asr.config import build_settings

from .speech import reference

CLIPS = ("cmd_piper_joe_01", "cmd_piper_joe_05")


def bench_args(*argv: str) -> argparse.Namespace:
    """The bench's flags as its command line would give them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_endpointing_bench_reports_each_kind_of_clip(service: Service, tmp_path: Path) -> None:
    report_path = tmp_path / "endpointing.json"
    args = bench_args(
        "--endpointing",
        "--wyoming",
        service.wyoming_uri,
        "--match",
        "cmd_piper_joe_0[15]",
        "--endpoint-wait",
        "10",
        "--json",
        str(report_path),
    )

    assert command.run(args, build_settings({"model": {"threads": 1}})) == 0

    report = json.loads(report_path.read_text(encoding="utf-8"))
    trials = report["trials"]
    assert {(trial["clip"], trial["kind"]) for trial in trials} == {
        (clip, kind) for clip in CLIPS for kind in ("short", "pause300", "pause500", "noise5")
    }
    for trial in trials:
        assert trial["text"] is not None, trial
        assert trial["whole_text"], trial
    short = [trial for trial in trials if trial["kind"] == "short"]
    # A clip that starts with its first word may lose it, in the whole-clip decode too: a word at most.
    assert all(score_words(reference(trial["clip"]), trial["text"]).errors <= 1 for trial in short), short
    assert all(0 <= trial["latency_s"] < 2.0 for trial in short)
    kinds = {summary["kind"]: summary for summary in report["summaries"]}
    assert kinds["short"]["trials"] == 2
    assert kinds["short"]["cut"] == 0
    assert kinds["short"]["missing"] == 0


def test_the_endpointing_bench_needs_a_wyoming_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(bench_args("--endpointing"), build_settings({})) == 1
    assert "--endpointing needs --wyoming" in capsys.readouterr().err
