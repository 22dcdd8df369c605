"""Composition root: settings → engine → enabled adapters, and the service's life until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from adapters import Adapter
from adapters.homeassistant import HomeAssistantAdapter
from adapters.http import HttpAdapter
from adapters.mqtt import MqttAdapter
from adapters.wyoming import WyomingAdapter

from .config import Settings
from .engine import Engine
from .systemd import Notifier
from .transcript import Transcriber

_LOGGER = logging.getLogger(__name__)

# What is still open after the drain is finalised within this.
FINISH_ON_STOP_S = 5.0


async def serve(settings: Settings, transcriber_factory: Callable[[], Transcriber] | None = None) -> int:
    """Listen first (so /health says 503 and Wyoming answers describe while loading), warm the model,
    tell systemd READY, and run until SIGTERM/SIGINT, then drain; a second signal exits at once.

    `transcriber_factory` replaces the Whisper model (tests of the service's life use a fake one).
    """
    started = time.monotonic()
    notifier = Notifier()
    engine = Engine(settings, transcriber_factory)
    adapters: list[Adapter] = []
    # MQTT starts first and, stopping in reverse order, stops last: it delivers every other adapter's finals.
    if settings.mqtt.enabled:
        adapters.append(MqttAdapter(engine, settings))
    if settings.homeassistant.url:
        adapters.append(HomeAssistantAdapter(engine, settings))
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
    try:
        await stop.wait()
        notifier.notify("STOPPING=1\nSTATUS=Draining")
        await _drain(engine, settings)
        await _stop(running, engine)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


async def _drain(engine: Engine, settings: Settings) -> None:
    """Let people finish their sentence: not-ready at once, new sessions still taken for `drain_accept_s` (a
    balancer's checks notice meanwhile), then refused; open utterances end by themselves within
    `drain_timeout_s`; what is still open then is finalised, so its final is delivered before the exit."""
    service = settings.service
    engine.drain()
    _LOGGER.info("Draining: taking new sessions for %g s more", service.drain_accept_s)
    await asyncio.sleep(service.drain_accept_s)
    engine.refuse_sessions()
    if not await engine.settle(service.drain_timeout_s):
        _LOGGER.warning(
            "%d utterance(s) still open after %g s: finalising them", engine.open_utterances, service.drain_timeout_s
        )
        await engine.finish_all(FINISH_ON_STOP_S)
    # The last finals are on their way: let the writers take them before the connections close.
    await engine.delivered(settings.limits.send_timeout_s)
    _LOGGER.info("Stopping")


async def _stop(adapters: list[Adapter], engine: Engine) -> None:
    """Stop the adapters in the reverse order of their start, then the engine; a failing stop is logged
    and the others still run."""
    for adapter in reversed(adapters):
        try:
            await adapter.stop()
        except Exception:
            _LOGGER.exception("Stopping the %s adapter failed", adapter.name)
    try:
        await engine.stop()
    except Exception:
        _LOGGER.exception("Stopping the engine failed")


async def _feed_watchdog(engine: Engine, notifier: Notifier, interval_s: float) -> None:
    """WATCHDOG=1 every half period while decoding is alive; systemd restarts a stuck or failing service."""
    while True:
        if engine.decoding_alive():
            notifier.notify("WATCHDOG=1")
        else:
            _LOGGER.error("Decoding is stuck or failing: not feeding the systemd watchdog")
        await asyncio.sleep(interval_s)
