"""Protocol adapters that drive the edge-asr engine: WebSocket/HTTP (and later Wyoming, MQTT)."""
