"""systemd's notify protocol (READY, WATCHDOG, STOPPING, STATUS) in a few lines of standard library."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

_LOGGER = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to the socket systemd names in NOTIFY_SOCKET; does nothing without one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@"; the kernel wants a NUL byte there.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval_s = _watchdog_interval(environ)

    def notify(self, state: str) -> None:
        """Send one or more `KEY=value` lines; a failure is logged, never raised."""
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the event loop on a reader that does not keep up.
                sock.setblocking(False)
                sock.sendto(state.encode(), self._address)
        except OSError as err:
            _LOGGER.warning("Cannot notify systemd (%s): %s", state.split("\n")[0], err)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000
