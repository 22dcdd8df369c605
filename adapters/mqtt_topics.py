"""What the MQTT adapter publishes where: node names and client ids, topics, event payloads and Home Assistant
discovery, the same from every node."""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime, timezone
from typing import Any

from edge_asr import __version__
from edge_asr.config import ConfigError, MqttSettings
from edge_asr.events import Final, Partial, SessionInfo

SENSOR_MAX_CHARS = 255
# The Home Assistant entities of a site, by discovery component.
DISCOVERY_COMPONENTS = ("event", "sensor")
# The client id every node had before ids came from the host name: entities are still named after it, so that
# they keep their ids and are the same from every node.
ENTITY_BASE = "edge-asr"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Home Assistant's event entity needs `event_type` in the JSON it reads; the rest become attributes.
_EVENT_TEMPLATE = (
    "{{ {'event_type': 'final', 'text': value_json.text, 'site': value_json.site, "
    "'session': value_json.session, 'utterance': value_json.utterance, 'adapter': value_json.adapter, "
    "'language': value_json.language, 'timestamp': value_json.timestamp} | to_json }}"
)


def topic_safe(name: str, default: str) -> str:
    """`name` with anything outside [A-Za-z0-9_-] replaced by `_`; `default` when it is empty."""
    return _UNSAFE.sub("_", name) or default


def utc_timestamp() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. `2026-01-31T12:00:00.123Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_payload(info: SessionInfo, site: str, event: Partial | Final) -> str:
    """The JSON of `<prefix>/<site>/partial` or `/final`: the event's wire form, whose session it is (a final's own
    language before the session's), and when it was published (for a final queued while the broker was away, when
    it was made)."""
    facts = info.to_dict()
    if isinstance(event, Final) and event.language:
        facts["language"] = event.language  # the one heard, for a session that detects it
    return json.dumps({**event.to_dict(), **facts, "site": site, "timestamp": utc_timestamp()})


def node_name(settings: MqttSettings) -> str:
    """This node's name: `mqtt.node`, else the host name (made topic-safe)."""
    return settings.node or topic_safe(socket.gethostname(), "localhost")


def client_id(settings: MqttSettings) -> str:
    """The client id this node connects under: `mqtt.client_id`, else `edge-asr-<node name>`, so that nodes sharing
    a broker (which disconnects the older of two connections with one id) never share one."""
    return settings.client_id or f"edge-asr-{topic_safe(node_name(settings), 'localhost')}"


def checked_node(settings: MqttSettings) -> str:
    """This node's name; a ConfigError naming `mqtt.node` when `mqtt.nodes` is set and does not list it."""
    node = node_name(settings)
    if settings.nodes and node not in settings.nodes:
        which = f"{node!r}" if settings.node else f"unset, and this host's name {node!r}"
        raise ConfigError(
            f"mqtt.node: {which} is not one of mqtt.nodes ({', '.join(settings.nodes)}): set it to this node's name"
        )
    return node


def site_topic(settings: MqttSettings, site: str, kind: str) -> str:
    """`<prefix>/<site>/<kind>`: a site's `partial` or `final` topic, or with `#` all of them."""
    return f"{settings.topic_prefix}/{site}/{kind}"


def status_topic(settings: MqttSettings, node: str) -> str:
    """The retained `online`/`offline` of `node`: `<prefix>/status` for a single node, else
    `<prefix>/node/<node>/status`."""
    prefix = settings.topic_prefix
    return f"{prefix}/node/{node}/status" if settings.nodes else f"{prefix}/status"


def discovery_availability(settings: MqttSettings, node: str) -> dict[str, Any]:
    """The availability part of every discovery config: this node's status topic, or with `mqtt.nodes` every
    node's, any of which `online` makes the entities available (identical from every node)."""
    if not settings.nodes:
        return {
            "availability_topic": status_topic(settings, node),
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    return {
        "availability": [
            {"topic": status_topic(settings, name), "payload_available": "online", "payload_not_available": "offline"}
            for name in settings.nodes
        ],
        "availability_mode": "any",
    }


def object_id(settings: MqttSettings, site: str) -> str:
    """The Home Assistant object id of a site's entities, the same from every node: `mqtt.client_id` when set
    (as always), else `edge-asr`, and the site."""
    return f"{topic_safe(settings.client_id, ENTITY_BASE)}_{site}"


def discovery_topics(settings: MqttSettings, site: str) -> dict[str, str]:
    """The retained Home Assistant discovery topic of each of a site's entities, by component: where the
    adapter announces the site and `edge-asr mqtt forget-site` clears it."""
    return {
        component: f"{settings.discovery_prefix}/{component}/{object_id(settings, site)}/config"
        for component in DISCOVERY_COMPONENTS
    }


def discovery_payloads(settings: MqttSettings, node: str, model: str, site: str) -> dict[str, str]:
    """The JSON of each of a site's discovery topics, by component: an event entity and a last-transcript sensor
    of the device `edge-asr` running `model`."""
    final_topic = site_topic(settings, site, "final")
    entity_id = object_id(settings, site)
    common = {
        "state_topic": final_topic,
        **discovery_availability(settings, node),
        "device": {
            "identifiers": [f"edge_asr_{settings.client_id or ENTITY_BASE}"],
            "name": "edge-asr",
            "manufacturer": "edge-asr",
            "model": model,
            "sw_version": __version__,
        },
    }
    configs = {
        "event": {
            **common,
            "name": f"{site} transcript",
            "unique_id": f"{entity_id}_final",
            "event_types": ["final"],
            "value_template": _EVENT_TEMPLATE,
        },
        "sensor": {
            **common,
            "name": f"{site} last transcript",
            "unique_id": f"{entity_id}_transcript",
            "value_template": f"{{{{ value_json.text[:{SENSOR_MAX_CHARS}] }}}}",
            "json_attributes_topic": final_topic,
            "icon": "mdi:microphone-message",
        },
    }
    return {component: json.dumps(config) for component, config in configs.items()}
