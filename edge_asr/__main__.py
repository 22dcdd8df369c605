"""The `edge-asr` command: `serve`, `bench`, `mqtt forget-site` and `--version`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    INSTALLED_CONFIG_PATH,
    ConfigError,
    Settings,
    load_settings,
    parse_assignments,
)
from .memory import limit_malloc_arenas

_LOGGER = logging.getLogger(__name__)
# The exit status of a start-up that configuration must fix (systemd's RestartPreventExitStatus=).
EXIT_CONFIG = 2
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _add_config_flags(parser: argparse.ArgumentParser, listeners: bool) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"YAML file (default: ${ENV_PREFIX}CONFIG, ./{DEFAULT_CONFIG_PATH}, then {INSTALLED_CONFIG_PATH})",
    )
    parser.add_argument("--model", help="model name (tiny.en = bundled), faster-whisper size name or directory")
    parser.add_argument("--threads", type=int, help="CTranslate2/BLAS threads (0 = half the cores)")
    if listeners:
        parser.add_argument("--host", help="HTTP/WebSocket host")
        parser.add_argument("--port", type=int, help="HTTP/WebSocket port")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any other setting")


def _pin_thread_pools(argv: list[str] | None) -> None:
    """Set the OpenMP/OpenBLAS/MKL pool sizes before numpy or CTranslate2 load and read them."""
    early = argparse.ArgumentParser(add_help=False)
    _add_config_flags(early, listeners=False)
    args, _rest = early.parse_known_args(argv)
    try:
        threads = settings_from_args(args).model.effective_threads
    except ConfigError:  # reported by the full parse
        return
    for variable in _THREAD_VARIABLES:
        os.environ.setdefault(variable, str(threads))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    from adapters.mqtt_admin import add_forget_site_arguments

    from .bench.arguments import add_arguments as add_bench_arguments

    parser = argparse.ArgumentParser(
        prog="edge-asr", description="Real-time streaming speech-to-text for the smart-home edge"
    )
    parser.add_argument("--version", action="version", version=f"edge-asr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    _add_config_flags(serve, listeners=True)
    bench_parser = commands.add_parser("bench", help="replay WAV+TXT pairs and report latency, WER and cost")
    _add_config_flags(bench_parser, listeners=False)
    add_bench_arguments(bench_parser)
    mqtt_parser = commands.add_parser("mqtt", help="manage what the service keeps on the MQTT broker")
    mqtt_commands = mqtt_parser.add_subparsers(dest="mqtt_command", metavar="COMMAND", required=True)
    forget_site = mqtt_commands.add_parser(
        "forget-site", help="remove a site's Home Assistant entities: clear its retained discovery on the broker"
    )
    _add_config_flags(forget_site, listeners=False)
    add_forget_site_arguments(forget_site)
    return parser


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None or os.environ.get(f"{ENV_PREFIX}CONFIG"):
        return args.config  # type: ignore[no-any-return]
    for candidate in (DEFAULT_CONFIG_PATH, INSTALLED_CONFIG_PATH):
        if candidate.is_file():
            return candidate
    return None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults ← YAML ← environment ← flags."""
    cli: dict[str, Any] = parse_assignments(args.set)
    for flag, section, key in (
        ("model", "model", "name"),
        ("threads", "model", "threads"),
        ("host", "http", "host"),
        ("port", "http", "port"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            cli.setdefault(section, {})[key] = value
    if args.log_level:
        cli["log_level"] = args.log_level
    if getattr(args, "command", None) == "mqtt":
        # The password file and TLS files are read for an enabled adapter only; the broker wants them all the same.
        cli.setdefault("mqtt", {})["enabled"] = True
    return load_settings(_config_path(args), cli_layer=cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    limit_malloc_arenas()  # before numpy and CTranslate2 start their threads
    _pin_thread_pools(argv)
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as err:
        print(f"edge-asr: invalid configuration: {err}", file=sys.stderr)
        return EXIT_CONFIG
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    logging.basicConfig(
        level=settings.log_level,
        format="%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # faster-whisper logs every decode at INFO: several lines a second per speaker.
    logging.getLogger("faster_whisper").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    if args.command == "mqtt":
        from adapters.mqtt_admin import run as run_mqtt

        return run_mqtt(args, settings)
    if args.command == "bench":
        from .bench.command import run as run_bench

        return run_bench(args, settings)
    # Imported only now: the thread pools above must be pinned before numpy and CTranslate2 load.
    from .model import ModelError
    from .service import serve

    try:
        return asyncio.run(serve(settings))
    except (ConfigError, ModelError) as err:
        # Found while starting (a model that cannot load, a port in use, a model.language the model does not
        # speak): fixing it takes a person, so exit 2, which the unit does not restart.
        print(f"edge-asr: cannot start: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # anything else at start-up ends in one clear line
        _LOGGER.error("edge-asr cannot start: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
