"""Home Assistant adapter: the names of the entities exposed to Assist, their aliases, areas and floors, kept fresh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from edge_asr.api import SpeechEngine, is_text
from edge_asr.config import HomeAssistantSettings, Settings
from edge_asr.vocabulary import MAX_NAME_CHARS, MAX_NAMES

_LOGGER = logging.getLogger(__name__)
# websockets logs every frame at DEBUG, and these frames carry the token and the household's names: its logger for
# this client stays at INFO whatever the service's log level.
_FRAMES_LOGGER = logging.getLogger(f"{__name__}.websocket")
_FRAMES_LOGGER.setLevel(logging.INFO)

COMPONENT = "homeassistant"
SOURCE = "homeassistant"
# Connecting, authenticating and each command's answer must each finish this soon.
WAIT_S = 20.0
# A registry change comes as a burst of events (an integration reloading updates each of its entities): the
# names are fetched once, this long after the first event of the burst.
DEBOUNCE_S = 2.0
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
# get_states is the largest answer: 2 to 4 MB in a home of 2,000 entities. At most MAX_QUEUED messages wait
# to be read, so a Home Assistant that floods the connection holds little memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_QUEUED = 2
# Closing waits this long for Home Assistant's close frame, so stop() is prompt against one that never answers.
CLOSE_WAIT_S = 1.0
# stop() cancels the connection task again after this long if a cancellation was swallowed.
STOP_RETRY_S = 1.0
# Device renames change the friendly names of their entities, so they count as changes too.
CHANGE_EVENTS = (
    "entity_registry_updated",
    "area_registry_updated",
    "floor_registry_updated",
    "device_registry_updated",
)


class _Unavailable(Exception):
    """Home Assistant could not be asked, or its answer cannot be used; the message says why (never the token)."""


class _Refused(_Unavailable):
    """Home Assistant refused the token, or what its user may do."""


def websocket_url(url: str) -> str:
    """Home Assistant's WebSocket API under `url` (http → ws, https → wss)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/api/websocket"):
        path += "/api/websocket"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _where(url: str) -> str:
    """The WebSocket URL as it may be logged: without a user name or password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _clean(value: object) -> str:
    """A name as it is used: whitespace runs made one space; "" for anything else than a string of usable length."""
    if not is_text(value):
        return ""
    name = " ".join(value.split())
    return name if len(name) <= MAX_NAME_CHARS else ""


def _aliases(item: Mapping[str, Any]) -> list[str]:
    # Home Assistant keeps aliases in a set: sorted, they come in the same order on every fetch.
    aliases = item.get("aliases")
    if not isinstance(aliases, list):
        return []
    return sorted((alias for alias in aliases if is_text(alias)), key=str.casefold)


def household_names(
    exposed: Iterable[str],
    entries: Mapping[str, Any],
    friendly_names: Mapping[str, str],
    areas: Sequence[Any],
    floors: Sequence[Any],
) -> list[str]:
    """The names of the exposed entities (name, then aliases, in entity id order), areas and floors, deduplicated."""
    candidates: list[object] = []
    for entity_id in sorted(exposed):
        entry = entries.get(entity_id)
        entry = entry if isinstance(entry, dict) else {}
        if entry.get("disabled_by") is not None:  # a disabled entity has no state: Assist cannot reach it
            continue
        # The registry name is what the user gave; the friendly name includes the device's name where the
        # integration composes it; the original name is the integration's own, a last resort.
        name = _clean(entry.get("name")) or _clean(friendly_names.get(entity_id)) or entry.get("original_name")
        candidates += [name, *_aliases(entry)]
    for item in (*areas, *floors):
        if isinstance(item, dict):
            candidates += [item.get("name"), *_aliases(item)]
    names: dict[str, str] = {}
    for candidate in candidates:
        if name := _clean(candidate):
            names.setdefault(name.casefold(), name)
    return list(names.values())


def _reason(err: Exception, wait_s: float, max_message_bytes: int) -> str:
    """Why a connection failed, for /health and the log."""
    if isinstance(err, _Unavailable):
        return str(err)
    if isinstance(err, asyncio.TimeoutError):
        return f"cannot connect: no answer within {wait_s:g} s"
    if isinstance(err, InvalidStatus):
        return f"cannot connect: HTTP {err.response.status_code} instead of a WebSocket (is this Home Assistant?)"
    if isinstance(err, InvalidURI):  # its message holds the URL, with a password if the URL has one
        return "cannot connect: homeassistant.url does not make a WebSocket URL"
    if isinstance(err, InvalidHandshake):
        return f"cannot connect: {err}"
    if isinstance(err, ConnectionClosed):
        if err.sent is not None and err.sent.code == 1009:
            return f"Home Assistant sent a message larger than {max_message_bytes:,} bytes"
        return "Home Assistant closed the connection"
    if isinstance(err, OSError):
        return f"cannot connect: {err.strerror or str(err) or type(err).__name__}"
    where = traceback.extract_tb(err.__traceback__)[-1]
    # The exception's message could hold a name from Home Assistant's answer: only its type and place.
    return f"unexpected {type(err).__name__} at {where.filename}:{where.lineno}"


class _Connection:
    """One authenticated WebSocket connection: commands with their answers, and the change events in between."""

    def __init__(self, websocket: ClientConnection, wait_s: float, debounce_s: float) -> None:
        self._websocket = websocket
        self._wait_s = wait_s
        self._debounce_s = debounce_s
        self._loop = asyncio.get_running_loop()
        self._last_id = 0
        # When the names are due to be fetched again because Home Assistant reported a change (loop time).
        self.change_due: float | None = None

    async def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None when none came by `deadline` (loop time)."""
        try:
            raw = await asyncio.wait_for(self._websocket.recv(), max(0.0, deadline - self._loop.time()))
        except asyncio.TimeoutError:
            return None
        if not isinstance(raw, str):
            raise _Unavailable("Home Assistant sent a binary message")
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep for the parser
            raise _Unavailable("Home Assistant sent a message that is not JSON") from None
        if not isinstance(message, dict):
            raise _Unavailable("Home Assistant sent a message that is not a JSON object")
        if message.get("type") == "event" and self.change_due is None:
            self.change_due = self._loop.time() + self._debounce_s
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; a Home Assistant that does not take it in time is given up."""
        try:
            await asyncio.wait_for(self._websocket.send(json.dumps(message)), self._wait_s)
        except asyncio.TimeoutError:
            raise _Unavailable(f"Home Assistant took no message for {self._wait_s:g} s") from None

    async def authenticate(self, token: str) -> None:
        """auth_required → auth → auth_ok; raises _Refused for auth_invalid."""
        first = await self._expect("the greeting")
        if first.get("type") != "auth_required":
            raise _Unavailable("Home Assistant did not ask for a token (is this its WebSocket API?)")
        await self.send({"type": "auth", "access_token": token})
        answer = await self._expect("the token")
        if answer.get("type") == "auth_invalid":
            raise _Refused("invalid token")
        if answer.get("type") != "auth_ok":
            raise _Unavailable("Home Assistant answered the token with neither auth_ok nor auth_invalid")

    async def _expect(self, what: str) -> dict[str, Any]:
        message = await self.receive(self._loop.time() + self._wait_s)
        if message is None:
            raise _Unavailable(f"no answer to {what} within {self._wait_s:g} s")
        return message

    async def command(self, kind: str, **fields: Any) -> tuple[bool, Any]:
        """(True, result), or (False, error code) when Home Assistant answers with an error."""
        self._last_id += 1
        ident = self._last_id
        await self.send({"id": ident, "type": kind, **fields})
        # One deadline for the whole wait: unrelated messages in between do not extend it.
        deadline = self._loop.time() + self._wait_s
        while True:
            message = await self.receive(deadline)
            if message is None:
                raise _Unavailable(f"no answer to {kind} within {self._wait_s:g} s")
            if message.get("id") != ident or message.get("type") != "result":
                continue
            if message.get("success") is True:
                return True, message.get("result")
            error = message.get("error")
            return False, error.get("code") if isinstance(error, dict) else None

    async def result(self, kind: str, shape: type, **fields: Any) -> Any:
        """The result of a command that must succeed, of the type `shape`."""
        ok, result = await self.command(kind, **fields)
        if not ok:
            if result == "unauthorized":
                raise _Refused(f"{kind} needs an administrator's token")
            raise _Unavailable(f"Home Assistant answered {kind} with the error {result!r}")
        if not isinstance(result, shape):
            raise _Unavailable(f"Home Assistant answered {kind} with something else than a {shape.__name__}")
        return result


class HomeAssistantAdapter:
    """Takes the household's names from Home Assistant at start-up and whenever they change, in the background."""

    name = "homeassistant"

    def __init__(
        self,
        engine: SpeechEngine,
        settings: Settings,
        *,
        wait_s: float = WAIT_S,
        debounce_s: float = DEBOUNCE_S,
        retry_min_s: float = RETRY_MIN_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._engine = engine
        self._settings: HomeAssistantSettings = settings.homeassistant
        self._url = websocket_url(self._settings.url)
        self._where = _where(self._url)
        self._wait_s = wait_s
        self._debounce_s = debounce_s
        self._retry_min_s = retry_min_s
        self._max_message_bytes = max_message_bytes
        self._state = ""
        # How many names the last good fetch gave (None: none yet); the engine keeps them while Home Assistant is away.
        self._kept: int | None = None
        self._fetches = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Connect in the background: start-up never waits for Home Assistant."""
        self._set_state("connecting", logging.INFO, f"Home Assistant: connecting to {self._where}")
        self._task = asyncio.create_task(self._run(), name="homeassistant")

    async def stop(self) -> None:
        """Stop asking Home Assistant; the names fetched last stay with the engine."""
        self._stopping.set()
        if self._task is not None:
            # On Python 3.11 asyncio.wait_for may swallow a cancellation that meets a result (and the connection
            # library may too, while it closes): a task that goes on is cancelled again rather than awaited for
            # as long as its refresh period. wait() rather than awaiting the task: its CancelledError is not
            # stop()'s own cancellation.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=STOP_RETRY_S)
            self._task = None
        self._engine.set_component(COMPONENT, "stopped", False)

    def _set_state(self, state: str, level: int, message: str) -> None:
        """Record the state for /health and log it once per change."""
        if state == self._state:
            return
        self._state = state
        self._engine.set_component(COMPONENT, state, state.startswith("connected"))
        _LOGGER.log(level, "%s", message)

    async def _run(self) -> None:
        """Connect, fetch and follow the changes; on any failure keep the names and retry with backoff."""
        delay = self._retry_min_s
        while True:
            fetches_before = self._fetches
            try:
                await self._session()
            except _Refused as err:
                self._set_state(
                    f"refused: {err}",
                    logging.ERROR,
                    f"Home Assistant at {self._where} refused: {err} (homeassistant.token_file holds a long-lived "
                    f"access token of an administrator); {self._keeping()}",
                )
            except Exception as err:  # whatever goes wrong, speech goes on and the names are asked for again
                reason = _reason(err, self._wait_s, self._max_message_bytes)
                self._set_state(
                    f"disconnected: {reason}",
                    logging.WARNING,
                    f"Home Assistant at {self._where}: {reason}; {self._keeping()}",
                )
            if self._fetches != fetches_before:  # it worked for a while: Home Assistant restarted, say
                delay = self._retry_min_s
            # The connection library may swallow a cancellation while it closes: stop() also sets this.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            delay = min(delay * 2, RETRY_MAX_S)

    def _keeping(self) -> str:
        if self._kept is None:
            return "no names from it yet; retrying"
        return f"keeping the last {self._kept} names; retrying"

    async def _session(self) -> None:
        """One connection: authenticate, subscribe to changes, fetch; fetch again on a change and every refresh_s."""
        async with connect(
            self._url,
            open_timeout=self._wait_s,
            close_timeout=CLOSE_WAIT_S,
            max_size=self._max_message_bytes,
            max_queue=MAX_QUEUED,
            logger=_FRAMES_LOGGER,
        ) as websocket:
            connection = _Connection(websocket, self._wait_s, self._debounce_s)
            await connection.authenticate(self._settings.token)
            # Subscribed before the first fetch, so that no change between the two goes unnoticed. A refused
            # subscription leaves the periodic refresh.
            for event_type in CHANGE_EVENTS:
                await connection.command("subscribe_events", event_type=event_type)
            loop = asyncio.get_running_loop()
            while True:
                connection.change_due = None
                await self._fetch(connection)
                refresh_due = loop.time() + self._settings.refresh_s
                while connection.change_due is None or loop.time() < connection.change_due:
                    due = refresh_due if connection.change_due is None else min(refresh_due, connection.change_due)
                    if await connection.receive(due) is None and loop.time() >= refresh_due:
                        break

    async def _fetch(self, connection: _Connection) -> None:
        """Ask for everything the names come from, build them and hand them to the engine."""
        exposed_settings = (await connection.result("homeassistant/expose_entity/list", dict)).get("exposed_entities")
        if not isinstance(exposed_settings, dict):
            raise _Unavailable("Home Assistant answered homeassistant/expose_entity/list without exposed_entities")
        exposed = sorted(
            entity_id
            for entity_id, assistants in exposed_settings.items()
            if isinstance(assistants, dict) and assistants.get("conversation") is True
        )
        # Only get_entries carries the aliases (config/entity_registry/list does not).
        entries = (
            await connection.result("config/entity_registry/get_entries", dict, entity_ids=exposed) if exposed else {}
        )
        states = await connection.result("get_states", list)
        areas = await connection.result("config/area_registry/list", list)
        # A Home Assistant older than 2024.4 has no floors and answers unknown_command.
        has_floors, floors = await connection.command("config/floor_registry/list")
        friendly_names = {
            state["entity_id"]: state["attributes"]["friendly_name"]
            for state in states
            if isinstance(state, dict)
            and isinstance(state.get("entity_id"), str)
            and isinstance(state.get("attributes"), dict)
            and isinstance(state["attributes"].get("friendly_name"), str)
        }
        names = household_names(
            exposed, entries, friendly_names, areas, floors if has_floors and isinstance(floors, list) else []
        )
        self._engine.set_names(SOURCE, tuple(names[:MAX_NAMES]))
        self._kept = min(len(names), MAX_NAMES)
        self._fetches += 1
        if len(names) > MAX_NAMES:
            self._set_state(
                f"connected ({MAX_NAMES} of {len(names)} names)",
                logging.WARNING,
                f"Home Assistant at {self._where}: {len(names)} names, only the first {MAX_NAMES} are used",
            )
        else:
            self._set_state(
                f"connected ({len(names)} names)", logging.INFO, f"Home Assistant at {self._where}: {len(names)} names"
            )
