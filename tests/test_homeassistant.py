"""The Home Assistant adapter against a local WebSocket server that answers like Home Assistant, with a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from adapters.homeassistant import SOURCE, HomeAssistantAdapter, household_names, websocket_url
from edge_asr.bench.processes import free_port
from edge_asr.config import HomeAssistantSettings, Settings, build_settings
from edge_asr.model import ModelError
from edge_asr.service import serve as serve_service

from .fakes import FakeEngine
from .waiting import eventually as eventually_within

pytestmark = pytest.mark.fast

TOKEN = "eyJhbGciOiJIUzI1NiJ9.long-lived-token-of-the-household"
HA_VERSION = "2025.6.0"
WAIT_S = 5.0
# The adapter answers a fake Home Assistant on loopback: what it should do is done within WAIT_S.
eventually = functools.partial(eventually_within, timeout_s=WAIT_S)
# The fake server's own log shows the frames it gets (the token among them): it is not the service's log.
SERVER_LOGGER = "tests.fake_homeassistant"
SECRET_NAMES = ("Secret Power Meter", "Garage Switch", "Front Door")
EXPECTED = (
    "Hallway Thermostat",
    "thermostat",
    "Blind",
    "Quillo fan",
    "Elowen's fan",
    "Kitchen Light",
    "Cooking light",
    "Porch lamp",
    "Kitchen",
    "Cookhouse",
    "Living Room",
    "Lounge",
    "Hallway",
    "Ground Floor",
    "Downstairs",
    "Upstairs",
)
FLOOR_NAMES = ("Ground Floor", "Downstairs", "Upstairs")


def entry(
    entity_id: str,
    name: str | None = None,
    original_name: str | None = None,
    aliases: tuple[str, ...] = (),
    disabled_by: str | None = None,
) -> dict[str, Any]:
    """An entity registry entry as config/entity_registry/get_entries gives it (the extended form)."""
    return {
        "aliases": list(aliases),
        "area_id": None,
        "categories": {},
        "capabilities": None,
        "config_entry_id": "01JCONFIGENTRY",
        "device_class": None,
        "device_id": None,
        "disabled_by": disabled_by,
        "entity_category": None,
        "entity_id": entity_id,
        "has_entity_name": name is None,
        "hidden_by": None,
        "icon": None,
        "id": f"id-{entity_id}",
        "labels": [],
        "name": name,
        "options": {"conversation": {"should_expose": True}},
        "original_device_class": None,
        "original_icon": None,
        "original_name": original_name,
        "platform": "demo",
        "translation_key": None,
        "unique_id": f"unique-{entity_id}",
    }


def area(area_id: str, name: str, aliases: tuple[str, ...] = (), floor_id: str | None = None) -> dict[str, Any]:
    """An area as config/area_registry/list gives it."""
    return {
        "aliases": list(aliases),
        "area_id": area_id,
        "floor_id": floor_id,
        "humidity_entity_id": None,
        "icon": None,
        "labels": [],
        "name": name,
        "picture": None,
        "temperature_entity_id": None,
        "created_at": 0.0,
        "modified_at": 0.0,
    }


def floor(floor_id: str, name: str, aliases: tuple[str, ...] = (), level: int = 0) -> dict[str, Any]:
    """A floor as config/floor_registry/list gives it."""
    return {
        "aliases": list(aliases),
        "created_at": 0.0,
        "floor_id": floor_id,
        "icon": None,
        "level": level,
        "modified_at": 0.0,
        "name": name,
    }


class FakeHomeAssistant:
    """A WebSocket server on a free loopback port that answers like Home Assistant's WebSocket API.

    `mode` makes it misbehave: "not_json", "binary", "not_object" (instead of auth_required), "silent" (a
    WebSocket that never says anything), "bad_result" (a list where a dict belongs), "not_admin"."""

    def __init__(self) -> None:
        self.token = TOKEN
        self.mode = "normal"
        self.exposed: dict[str, dict[str, bool]] = {
            "climate.hallway": {"conversation": True},
            "cover.blind": {"conversation": True},
            "fan.bedroom": {"conversation": True, "cloud.alexa": False},
            "light.kitchen": {"conversation": True},
            "light.porch": {"conversation": True},
            "lock.front_door": {"conversation": True},
            "sensor.power": {"conversation": False, "cloud.google_assistant": True},
            "switch.garage": {},
        }
        # Entities without an entry here (light.porch) are not in the registry: get_entries answers null.
        self.entries: dict[str, dict[str, Any]] = {
            "climate.hallway": entry("climate.hallway", aliases=("thermostat",)),
            "cover.blind": entry("cover.blind", original_name="Blind"),
            "fan.bedroom": entry("fan.bedroom", name="Quillo fan", aliases=("quillo FAN", "Elowen's fan")),
            "light.kitchen": entry("light.kitchen", aliases=("x" * 101, "  Cooking   light ", "")),
            "lock.front_door": entry("lock.front_door", name="Front Door", disabled_by="user"),
            "sensor.power": entry("sensor.power", name="Secret Power Meter"),
            "switch.garage": entry("switch.garage", original_name="Garage Switch"),
        }
        # Friendly names by entity id; cover.blind and the disabled lock have no state.
        self.friendly_names: dict[str, str] = {
            "climate.hallway": "Hallway Thermostat",
            "fan.bedroom": "Quillo fan",
            "light.kitchen": "Kitchen Light",
            "light.porch": "Porch lamp",
            "sensor.power": "Secret Power Meter",
            "switch.garage": "Garage Switch",
        }
        self.areas = [
            area("kitchen", "Kitchen", ("Cookhouse",), "ground"),
            area("living_room", "Living Room", ("Lounge", "lounge"), "ground"),
            area("hallway", "Hallway", (), "upstairs"),
        ]
        # None: a Home Assistant from before floors (2024.4), which does not know the command.
        self.floors: list[dict[str, Any]] | None = [
            floor("ground", "Ground Floor", ("Downstairs",)),
            floor("upstairs", "Upstairs", ("living room",), level=1),
        ]
        self.commands: list[str] = []
        self.connections = 0
        self.paths: list[str] = []
        self._subscriptions: dict[ServerConnection, dict[int, str]] = {}
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL, as homeassistant.url names it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the port of a previous start, if any)."""
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._check_path,
            logger=logging.getLogger(SERVER_LOGGER),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Go away: stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def fire(self, event_type: str, data: dict[str, Any]) -> None:
        """Send an event to every connection subscribed to its type."""
        for connection, subscriptions in list(self._subscriptions.items()):
            for ident, subscribed in subscriptions.items():
                if subscribed == event_type:
                    event = {
                        "event_type": event_type,
                        "data": data,
                        "origin": "LOCAL",
                        "time_fired": "2026-01-31T12:00:00.000000+00:00",
                        "context": {"id": "01JCONTEXT", "parent_id": None, "user_id": None},
                    }
                    with contextlib.suppress(ConnectionClosed):
                        await connection.send(json.dumps({"id": ident, "type": "event", "event": event}))

    def fetches(self) -> int:
        """How many times the names were fetched (get_states is asked once per fetch)."""
        return self.commands.count("get_states")

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        self.paths.append(request.path)
        if request.path != "/api/websocket":
            return connection.respond(HTTPStatus.NOT_FOUND, "404: Not Found")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        self._subscriptions[connection] = {}
        try:
            await self._converse(connection)
        except ConnectionClosed:
            pass
        finally:
            del self._subscriptions[connection]

    async def _converse(self, connection: ServerConnection) -> None:
        misbehaviour: dict[str, str | bytes] = {
            "not_json": "<html>Bad gateway",
            "binary": b"\x00\x01",
            "not_object": "[]",
        }
        if self.mode in misbehaviour:
            await connection.send(misbehaviour[self.mode])
        if self.mode != "normal" and self.mode not in ("bad_result", "not_admin"):
            await connection.wait_closed()
            return
        await connection.send(json.dumps({"type": "auth_required", "ha_version": HA_VERSION}))
        auth = json.loads(await connection.recv())
        if auth.get("type") != "auth" or auth.get("access_token") != self.token:
            await connection.send(json.dumps({"type": "auth_invalid", "message": "Invalid access token or password"}))
            return
        await connection.send(json.dumps({"type": "auth_ok", "ha_version": HA_VERSION}))
        last_id = 0
        async for raw in connection:
            message = json.loads(raw)
            ident = message["id"]
            if ident <= last_id:  # Home Assistant insists on ever greater ids
                await connection.send(json.dumps(error(ident, "id_reuse", "Identifier values have to increase.")))
                continue
            last_id = ident
            self.commands.append(message["type"])
            await connection.send(json.dumps(self._answer(connection, message)))

    def _answer(self, connection: ServerConnection, message: dict[str, Any]) -> dict[str, Any]:
        ident, kind = message["id"], message["type"]
        if kind == "subscribe_events":
            self._subscriptions[connection][ident] = message["event_type"]
            return result(ident, None)
        if kind == "homeassistant/expose_entity/list":
            if self.mode == "not_admin":
                return error(ident, "unauthorized", "Unauthorized")
            if self.mode == "bad_result":
                return result(ident, [])
            return result(ident, {"exposed_entities": self.exposed})
        if kind == "config/entity_registry/get_entries":
            return result(ident, {entity_id: self.entries.get(entity_id) for entity_id in message["entity_ids"]})
        if kind == "get_states":
            return result(ident, [state(entity_id, name) for entity_id, name in self.friendly_names.items()])
        if kind == "config/area_registry/list":
            return result(ident, self.areas)
        if kind == "config/floor_registry/list" and self.floors is not None:
            return result(ident, self.floors)
        return error(ident, "unknown_command", "Unknown command.")


def result(ident: int, value: Any) -> dict[str, Any]:
    """A command's successful answer."""
    return {"id": ident, "type": "result", "success": True, "result": value}


def error(ident: int, code: str, message: str) -> dict[str, Any]:
    """A command's error answer."""
    return {"id": ident, "type": "result", "success": False, "error": {"code": code, "message": message}}


def state(entity_id: str, friendly_name: str) -> dict[str, Any]:
    """An entity's state as get_states gives it."""
    return {
        "entity_id": entity_id,
        "state": "on",
        "attributes": {"friendly_name": friendly_name},
        "last_changed": "2026-01-31T12:00:00.000000+00:00",
        "last_reported": "2026-01-31T12:00:00.000000+00:00",
        "last_updated": "2026-01-31T12:00:00.000000+00:00",
        "context": {"id": "01JCONTEXT", "parent_id": None, "user_id": None},
    }


def component(engine: FakeEngine) -> str:
    """The adapter's state in /health."""
    found = engine.components.get("homeassistant")
    return found.state if found is not None else ""


def service_log(caplog: pytest.LogCaptureFixture) -> str:
    """Everything logged, apart from the fake server's own lines."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(SERVER_LOGGER))


@pytest.fixture
async def home_assistant() -> AsyncIterator[FakeHomeAssistant]:
    """A running fake Home Assistant."""
    server = FakeHomeAssistant()
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def running(
    url: str, refresh_s: float = 600.0, wait_s: float = 0.5, token: str = TOKEN
) -> AsyncIterator[tuple[HomeAssistantAdapter, FakeEngine]]:
    """An adapter on `url` and its fake engine, started at once and stopped promptly at the end."""
    engine = FakeEngine()
    settings = Settings(homeassistant=HomeAssistantSettings(url=url, token=token, refresh_s=refresh_s))
    adapter = HomeAssistantAdapter(engine, settings, wait_s=wait_s, debounce_s=0.2, retry_min_s=0.05)
    await asyncio.wait_for(adapter.start(), 0.5)
    try:
        yield adapter, engine
    finally:
        await asyncio.wait_for(adapter.stop(), 10.0)  # a hang detector: stop() ends in about a second
        assert component(engine) == "stopped"


async def test_the_names_of_exposed_entities_their_aliases_areas_and_floors_arrive(
    home_assistant: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)

        assert engine.names[SOURCE] == EXPECTED
        assert component(engine) == f"connected ({len(EXPECTED)} names)"
        assert engine.components["homeassistant"].healthy
        assert home_assistant.paths == ["/api/websocket"]
        assert not any(secret in engine.names[SOURCE] for secret in SECRET_NAMES)
    log = service_log(caplog)
    assert f"{len(EXPECTED)} names" in log
    assert TOKEN not in log
    assert not [name for name in EXPECTED if name in log], "names can be personal: never logged"


async def test_a_registry_event_brings_the_change(home_assistant: FakeHomeAssistant) -> None:
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)
        home_assistant.entries["fan.bedroom"] = entry("fan.bedroom", name="Quillo fan", aliases=("Windy",))
        home_assistant.areas.append(area("attic", "Elowen's den", ("Den",)))

        await home_assistant.fire("entity_registry_updated", {"action": "update", "entity_id": "fan.bedroom"})

        await eventually(lambda: "Windy" in engine.names[SOURCE])
        names = engine.names[SOURCE]
        assert "Elowen's fan" not in names
        assert names[names.index("Hallway") + 1 : names.index("Ground Floor")] == ("Elowen's den", "Den")


async def test_a_burst_of_events_is_fetched_once(home_assistant: FakeHomeAssistant) -> None:
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)
        assert home_assistant.fetches() == 1
        home_assistant.floors = [floor("ground", "Ground Floor")]

        for kind in ("area_registry_updated", "floor_registry_updated", "entity_registry_updated") * 3:
            await home_assistant.fire(kind, {"action": "update"})

        await eventually(lambda: "Downstairs" not in engine.names[SOURCE])
        # One more change, fetched a debounce period after its event: a fetch owed to the burst came before it.
        home_assistant.areas.append(area("garden", "Garden"))
        await home_assistant.fire("area_registry_updated", {"action": "create"})
        await eventually(lambda: "Garden" in engine.names[SOURCE])
        assert home_assistant.fetches() == 3


async def test_the_periodic_refresh_catches_a_change_without_event(home_assistant: FakeHomeAssistant) -> None:
    async with running(home_assistant.url, refresh_s=0.3) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)
        # A change Home Assistant reports no event for: an entity exposed that has no registry entry.
        home_assistant.exposed["switch.garage"] = {"conversation": True}

        await eventually(lambda: "Garage Switch" in engine.names[SOURCE])
        assert home_assistant.connections == 1, "refreshed on the same connection"


async def test_a_wrong_token_is_refused_retried_and_never_logged(
    home_assistant: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(home_assistant.url, token=TOKEN + "-revoked") as (_, engine):
        await eventually(lambda: home_assistant.connections >= 3)

        assert component(engine) == "refused: invalid token"
        assert not engine.components["homeassistant"].healthy
        assert SOURCE not in engine.names
    log = service_log(caplog)
    assert TOKEN not in log
    assert log.count("refused") == 1, "one line per state change, not one per attempt"


async def test_a_token_that_is_not_an_administrators_is_refused(home_assistant: FakeHomeAssistant) -> None:
    home_assistant.mode = "not_admin"
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: component(engine).startswith("refused"))

        assert "administrator" in component(engine)
        assert SOURCE not in engine.names


async def test_home_assistant_going_away_keeps_the_names_and_it_reconnects(
    home_assistant: FakeHomeAssistant,
) -> None:
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)

        await home_assistant.stop()

        await eventually(lambda: component(engine).startswith("disconnected"))
        # Several failed attempts to reconnect, counted on the port: each is accepted and closed at once.
        attempts: list[None] = []

        def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            attempts.append(None)
            writer.close()

        refuser = await asyncio.start_server(refuse, "127.0.0.1", home_assistant.port)
        await eventually(lambda: len(attempts) >= 3)
        refuser.close()
        await refuser.wait_closed()
        assert engine.names[SOURCE] == EXPECTED
        assert not engine.components["homeassistant"].healthy

        home_assistant.areas.append(area("garden", "Garden"))
        await home_assistant.start()

        await eventually(lambda: "Garden" in engine.names[SOURCE])
        assert component(engine) == f"connected ({len(EXPECTED) + 1} names)"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("not_json", "not JSON"),
        ("binary", "binary"),
        ("not_object", "not a JSON object"),
        ("silent", "no answer"),
        ("bad_result", "homeassistant/expose_entity/list"),
    ],
)
async def test_garbage_or_silence_is_reported_and_retried(
    home_assistant: FakeHomeAssistant, mode: str, reason: str
) -> None:
    home_assistant.mode = mode
    async with running(home_assistant.url, wait_s=0.3) as (_, engine):
        await eventually(lambda: component(engine).startswith("disconnected"))

        assert reason in component(engine)
        await eventually(lambda: home_assistant.connections >= 2)
        assert SOURCE not in engine.names


async def test_a_home_assistant_that_never_answers_holds_up_neither_start_nor_stop(
    home_assistant: FakeHomeAssistant,
) -> None:
    home_assistant.mode = "silent"
    # Waits far longer than the test: stop() must end the wait, not outlast it.
    async with running(home_assistant.url, wait_s=60.0) as (_, engine):
        await eventually(lambda: home_assistant.connections == 1)
        assert component(engine) == "connecting"


async def test_a_server_that_never_completes_the_handshake_holds_up_nothing() -> None:
    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running(f"http://127.0.0.1:{port}", wait_s=0.3) as (_, engine):
            await eventually(lambda: component(engine).startswith("disconnected"))

            assert "no answer" in component(engine)
    finally:
        server.close()


async def test_nothing_listening_is_reported_as_disconnected() -> None:
    async with running(f"http://127.0.0.1:{free_port()}") as (_, engine):
        await eventually(lambda: component(engine).startswith("disconnected: cannot connect"))

        assert SOURCE not in engine.names


async def test_a_path_that_is_not_the_websocket_api_is_reported(home_assistant: FakeHomeAssistant) -> None:
    async with running(f"{home_assistant.url}/other/api/websocket/x") as (_, engine):
        await eventually(lambda: component(engine).startswith("disconnected"))

        assert "HTTP 404" in component(engine)


async def test_without_floors_the_names_come_without_floors(home_assistant: FakeHomeAssistant) -> None:
    home_assistant.floors = None
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)

        assert engine.names[SOURCE] == tuple(name for name in EXPECTED if name not in FLOOR_NAMES)
        assert "config/floor_registry/list" in home_assistant.commands
        assert component(engine).startswith("connected")


async def test_at_most_1000_names_are_taken(home_assistant: FakeHomeAssistant) -> None:
    for number in range(1200):
        home_assistant.exposed[f"light.lamp_{number:04d}"] = {"conversation": True}
        home_assistant.friendly_names[f"light.lamp_{number:04d}"] = f"Lamp {number}"
    async with running(home_assistant.url) as (_, engine):
        await eventually(lambda: SOURCE in engine.names)

        names = engine.names[SOURCE]
        assert len(names) == 1000
        assert names[:3] == ("Hallway Thermostat", "thermostat", "Blind")
        assert "Kitchen" not in names, "areas come after the entities, past the cap"
        assert component(engine) == f"connected (1000 of {1200 + len(EXPECTED)} names)"


async def test_a_message_over_the_size_limit_is_refused(home_assistant: FakeHomeAssistant) -> None:
    engine = FakeEngine()
    settings = Settings(homeassistant=HomeAssistantSettings(url=home_assistant.url, token=TOKEN))
    adapter = HomeAssistantAdapter(engine, settings, wait_s=0.5, retry_min_s=0.05, max_message_bytes=1024)
    await adapter.start()
    try:
        await eventually(lambda: component(engine).startswith("disconnected"))

        assert component(engine) == "disconnected: Home Assistant sent a message larger than 1,024 bytes"
        assert SOURCE not in engine.names
    finally:
        await adapter.stop()


def test_names_are_cleaned_deduplicated_and_in_order() -> None:
    names = household_names(
        exposed=["switch.b", "light.a"],
        entries={"light.a": {"name": None, "original_name": "Orig", "aliases": [7, "A1"]}, "switch.b": None},
        friendly_names={"switch.b": "Bee\n switch", "light.a": "Ay light"},
        areas=[{"name": "ay LIGHT", "aliases": ["Room", "Hall \ud800"]}, "not an area", {"name": "n" * 101}],
        floors=[{"name": "  Room ", "aliases": None}, {"name": "Top"}, {"name": "\udcff"}],
    )

    assert names == ["Ay light", "A1", "Bee switch", "Room", "Top"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://homeassistant.local:8123", "ws://homeassistant.local:8123/api/websocket"),
        ("https://ha.example.org/", "wss://ha.example.org/api/websocket"),
        ("https://example.org/ha", "wss://example.org/ha/api/websocket"),
        ("ws://10.0.0.2:8123/api/websocket", "ws://10.0.0.2:8123/api/websocket"),
    ],
)
def test_the_websocket_url(url: str, expected: str) -> None:
    assert websocket_url(url) == expected


async def test_the_service_starts_and_stops_the_adapter(
    home_assistant: FakeHomeAssistant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = build_settings(
        {
            "model": {"name": str(tmp_path)},  # a directory without model.bin: start-up fails after the adapters
            "http": {"enabled": False},
            "wyoming": {"enabled": False},
            "homeassistant": {"url": home_assistant.url, "token_file": str(token_file)},
        }
    )

    with pytest.raises(ModelError):
        await serve_service(settings)

    assert f"Home Assistant: connecting to ws://127.0.0.1:{home_assistant.port}/api/websocket" in service_log(caplog)
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "homeassistant"], "stopped"
