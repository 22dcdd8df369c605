"""Composition root: settings → engine → enabled adapters, and the service's life until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from adapters import Adapter
from adapters.http import HttpAdapter
from adapters.mqtt import MqttAdapter
from adapters.wyoming import WyomingAdapter

from .config import Settings
from .engine import Engine
from .systemd import Notifier

_LOGGER = logging.getLogger(__name__)

# How long open utterances may take to reach their finals when the service is told to stop.
FINISH_ON_STOP_S = 5.0
# A decode running longer than this means decoding is stuck: the watchdog stops being fed.
DECODE_STALL_S = 30.0


async def serve(settings: Settings) -> int:
    """Listen first (so /health says 503 and Wyoming answers describe while loading), warm the model,
    tell systemd READY, and run until SIGTERM/SIGINT; a second signal exits at once."""
    started = time.monotonic()
    notifier = Notifier()
    engine = Engine(settings)
    adapters: list[Adapter] = []
    if settings.mqtt.enabled:
        adapters.append(MqttAdapter(engine, settings))
    if settings.http.enabled:
        adapters.append(HttpAdapter(engine, settings))
    if settings.wyoming.enabled:
        adapters.append(WyomingAdapter(engine, settings))
    running: list[Adapter] = []
    try:
        for adapter in adapters:
            await adapter.start()
            running.append(adapter)
        await engine.start()
    except BaseException:
        await _stop(running, engine)
        raise
    _LOGGER.info("Ready in %.0f ms", (time.monotonic() - started) * 1000)
    notifier.notify(f"READY=1\nSTATUS=Listening, model {settings.model.name} warm")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            _LOGGER.warning("Second signal: exiting at once")
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    watchdog = (
        asyncio.create_task(_feed_watchdog(engine, notifier, notifier.watchdog_interval_s))
        if notifier.watchdog_interval_s
        else None
    )
    await stop.wait()
    _LOGGER.info("Stopping")
    notifier.notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    await engine.finish_all(FINISH_ON_STOP_S)
    await _stop(running, engine)
    return 0


async def _stop(adapters: list[Adapter], engine: Engine) -> None:
    """Stop the adapters, then the engine; a failing stop is logged and the others still run."""
    for adapter in adapters:
        try:
            await adapter.stop()
        except Exception:
            _LOGGER.exception("Stopping the %s adapter failed", adapter.name)
    try:
        await engine.stop()
    except Exception:
        _LOGGER.exception("Stopping the engine failed")


async def _feed_watchdog(engine: Engine, notifier: Notifier, interval_s: float) -> None:
    """WATCHDOG=1 every half period while decoding is alive; systemd restarts a stuck service."""
    while True:
        if engine.decoding_alive(DECODE_STALL_S):
            notifier.notify("WATCHDOG=1")
        else:
            _LOGGER.error("Decoding looks stuck: not feeding the systemd watchdog")
        await asyncio.sleep(interval_s)
