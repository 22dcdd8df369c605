"""Composition root: settings → engine → enabled adapters, and the service's life until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from adapters.http import HttpAdapter
from adapters.mqtt import MqttAdapter
from adapters.wyoming import WyomingAdapter

from .config import Settings
from .engine import Engine

_LOGGER = logging.getLogger(__name__)


async def serve(settings: Settings) -> int:
    """Listen first (so /health says 503 and Wyoming answers describe while loading), warm the model,
    and run until SIGTERM/SIGINT."""
    started = time.monotonic()
    engine = Engine(settings)
    adapters: list[HttpAdapter | WyomingAdapter | MqttAdapter] = []
    if settings.mqtt.enabled:
        adapters.append(MqttAdapter(engine, settings))
    if settings.http.enabled:
        adapters.append(HttpAdapter(engine, settings))
    if settings.wyoming.enabled:
        adapters.append(WyomingAdapter(engine, settings))
    for adapter in adapters:
        await adapter.start()
    await engine.start()
    _LOGGER.info("Ready in %.0f ms", (time.monotonic() - started) * 1000)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    _LOGGER.info("Stopping")
    for adapter in adapters:
        await adapter.stop()
    await engine.stop()
    return 0
