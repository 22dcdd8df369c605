"""The bench's command-line flags, kept free of the bench's own imports so `edge-asr serve` starts lean."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

# Real and synthetic speech shipped with the package, the bench's default corpus (its README names sources
# and licences).
SHIPPED_CORPUS = Path(__file__).resolve().parent / "speech"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def _node_urls(text: str) -> tuple[str, ...]:
    nodes = tuple(item.strip().rstrip("/") for item in text.split(",") if item.strip())
    if not nodes:
        raise argparse.ArgumentTypeError("no node given")
    for node in nodes:
        parts = urlsplit(node)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise argparse.ArgumentTypeError(f"not a node's base URL (http://HOST:PORT): {node!r}")
    if len(set(nodes)) < len(nodes):
        raise argparse.ArgumentTypeError(f"a node is listed twice: {text!r}")
    return nodes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's flags and its CORPUS argument."""
    parser.add_argument(
        "corpus",
        type=Path,
        nargs="?",
        default=SHIPPED_CORPUS,
        metavar="CORPUS",
        help="directory of 16 kHz mono .wav + .txt pairs (default: the corpus shipped with edge-asr)",
    )
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--url", help="replay through a running server, e.g. ws://127.0.0.1:8787/ws/stream")
    server.add_argument("--wyoming", metavar="URI", help="replay through a Wyoming STT server, e.g. tcp://HOST:10300")
    parser.add_argument(
        "--pid", type=int, help="with --url or --wyoming: the server's process id, to measure its CPU and RSS"
    )
    parser.add_argument(
        "--nodes",
        type=_node_urls,
        metavar="URLS",
        help="with --url or --wyoming through a balancer: the nodes behind it, e.g. http://NODE1:8787,http://NODE2:8787;"
        " their /metrics are read before and after the run, and the sessions each opened are reported (other"
        " clients' sessions in that time count too)",
    )
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="K", help="speakers at once (1)")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible instead of in real time")
    parser.add_argument(
        "--trailing-silence",
        type=_non_negative_float,
        default=0.5,
        metavar="S",
        help="seconds of digital silence after each clip, before the end signal (0.5)",
    )
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N clips (by name)")
    parser.add_argument("--match", metavar="GLOB", help="only clips whose name matches, e.g. 'cmd_*'")
    parser.add_argument(
        "--vocabulary",
        type=Path,
        metavar="FILE",
        help="the household's names, one a line ('#' comments): sent with every request, the offline row's prompt,"
        " and scored as names right",
    )
    parser.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode each clip whole with the same local model, once (default; --no-offline skips it)",
    )
    parser.add_argument(
        "--runs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="replay the corpus N times: a row per run, their median and how often a clip's final text held (1)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' prints it on stdout)")
    endpointing = parser.add_argument_group(
        "endpointing",
        "--endpointing replays each clip through --wyoming as a satellite that never sends audio-stop: as it is, with"
        " a 0.3 s and a 0.5 s pause put between two words, and under room noise at 5 dB SNR; after the clip it sends"
        " silence (or the noise) until the transcript comes. It reports speech end → transcript, commands cut (a"
        " transcript before the speech ended), empty and missing transcripts, and the WER of the transcripts.",
    )
    endpointing.add_argument(
        "--endpointing", action="store_true", help="measure how the --wyoming server ends commands by itself"
    )
    endpointing.add_argument(
        "--endpoint-wait",
        type=_positive_float,
        default=20.0,
        metavar="S",
        help="with --endpointing: seconds of audio a satellite sends at most before it gives up (20)",
    )
    soak = parser.add_argument_group(
        "soak",
        "--soak starts mosquitto and `edge-asr serve` itself (with --config, --model, --threads, --set) and runs"
        " Wyoming satellites, WebSocket speakers, clients that vanish mid-utterance, read late or never read, with"
        " the broker restarted at 1/3 and 2/3 of the run. Exit code 1 when a target is missed: RSS growth after"
        " the warm-up (the first sixth, at least 30 s) over the limit, a session or event-loop task left over, a"
        " final lost on a client that stayed connected or on the broker, a never-reading client not cut off, a"
        " non-zero exit on SIGTERM. --url, --wyoming, --nodes, --pid, --fast, --runs, --concurrency and --vocabulary"
        " do not apply.",
    )
    soak.add_argument(
        "--soak",
        type=_positive_float,
        metavar="MINUTES",
        help="run the client mix against a service of its own for this long (1 for CI, 30 for a release)",
    )
    soak.add_argument(
        "--max-rss-growth-mb",
        type=_non_negative_float,
        metavar="MB",
        help="with --soak: RSS growth allowed after the warm-up (default 20 for runs under 10 minutes, 5 up to 30"
        " minutes, 5 per 30 minutes for longer runs)",
    )
