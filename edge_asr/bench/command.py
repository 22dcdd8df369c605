"""`edge-asr bench`: load the corpus, replay it once per run, score it and print the report."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..config import Settings
from .corpus import load_corpus, load_vocabulary
from .endpointing import run_endpointing
from .errors import BenchError
from .nodes import read_all, sessions_during
from .output import print_report
from .report import (
    Report,
    RunResult,
    clip_result,
    format_table,
    median_of_runs,
    report_json,
    stability,
    summarize,
)
from .runner import decode_whole, replay_corpus
from .scoring import NORMALIZER
from .soak import run_soak
from .timing import speech_span


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the bench (or, with --soak, the soak); 0 when every clip of every run went through, 1 when one got an
    error or the bench could not run."""
    if args.nodes and not (args.url or args.wyoming):
        # Checked before the soak, which takes neither: it would ignore the nodes.
        print(
            "edge-asr bench: --nodes only applies with --url or --wyoming (the balancer in front of them)",
            file=sys.stderr,
        )
        return 1
    if args.soak is not None:
        return run_soak(args, settings)
    if args.endpointing:
        return run_endpointing(args, settings)
    protocol = "websocket" if args.url else "wyoming" if args.wyoming else "in-process"
    try:
        if args.max_rss_growth_mb is not None:
            raise BenchError("--max-rss-growth-mb only applies with --soak")
        if args.pid is not None and not (args.url or args.wyoming):
            raise BenchError("--pid only applies with --url or --wyoming (in-process, the bench measures itself)")
        clips = load_corpus(args.corpus, args.match, args.limit)
        names = load_vocabulary(args.vocabulary) if args.vocabulary is not None else ()
        spans = [speech_span(clip.read_pcm(), settings.stream) for clip in clips]
        before = read_all(args.nodes) if args.nodes else {}
        runs: list[RunResult] = []
        for number in range(1, args.runs + 1):
            label = f"run {number} " if args.runs > 1 else ""
            playbacks, resources = asyncio.run(replay_corpus(args, settings, clips, label, names))
            results = tuple(
                clip_result(clip, playback, span, names)
                for clip, playback, span in zip(clips, playbacks, spans, strict=True)
            )
            runs.append(RunResult(summarize(results), resources, results))
        nodes = sessions_during(args.nodes, before, protocol) if args.nodes else ()
        # The whole-clip decode has no prompt but the names and no temperature fallback: one pass serves every run.
        offline_clips, offline = decode_whole(clips, settings, names) if args.offline else ([], None)
    except BenchError as err:
        print(f"edge-asr bench: {err}", file=sys.stderr)
        return 1
    report = Report(
        corpus=str(args.corpus),
        transport=args.url or args.wyoming or "in-process",
        protocol=protocol,
        concurrency=args.concurrency,
        realtime=not args.fast,
        trailing_silence_s=args.trailing_silence,
        normalizer=NORMALIZER,
        runs=tuple(runs),
        median=median_of_runs(runs),
        stability=stability(runs),
        offline=offline,
        offline_clips=tuple(offline_clips),
        nodes=nodes,
    )
    if not print_report(format_table(report), lambda: report_json(report), args.json):
        return 1
    return 1 if report.clip_errors else 0
