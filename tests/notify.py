"""A datagram socket standing in for systemd's NOTIFY_SOCKET, read by a thread as systemd would."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, read by a thread as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            with contextlib.suppress(TimeoutError):
                self.messages.append(self._sock.recv(4096).decode())

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in message for message in self.messages):
                return True
            time.sleep(0.02)
        return False

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self._sock.close()
