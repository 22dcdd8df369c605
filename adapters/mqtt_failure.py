"""Why a connection to the MQTT broker failed, in the words of the OS or OpenSSL, and the settings to check."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

_AUTH_REASONS = ("Not authorized", "Bad user name or password")
# paho says why a socket failed only in its log (e.g. the TLS alert of a broker that wants a client certificate).
_PAHO_SOCKET_ERROR = re.compile(r"(?:failed to receive on|timeout on) socket: (.+)")
# The codes around the words of an OSError or OpenSSL error: "[Errno 111] ", "[SSL: X] ", " (_ssl.c:1006)".
_ERROR_NOISE = re.compile(r"^\[(?:SSL(?:: \w+)?|Errno -?\d+)\]\s*|\s*\(_ssl\.c:\d+\)$")
# Why a broker closes a TLS session before it answers CONNECT, as a rule: our certificate, or its absence.
TLS_CLOSED = "the broker closed the connection during TLS set-up (does it want a client certificate?)"


@dataclass(frozen=True)
class ConnectionFailure:
    """Why a connection to the broker failed, in the words of the OS or OpenSSL (`detail` when `reason` sums
    them up), and whether TLS failed."""

    reason: str
    tls: bool = False
    detail: str = ""

    @classmethod
    def from_error(cls, error: BaseException) -> ConnectionFailure:
        """The failure an exception of a connection attempt describes."""
        return cls(_ERROR_NOISE.sub("", str(error)) or type(error).__name__, isinstance(error, ssl.SSLError))

    def as_tls_closed(self) -> ConnectionFailure:
        """This failure, seen as the broker ending a TLS session before it answered CONNECT. Whether OpenSSL reports
        the broker's alert or a bare EOF is a race within the broker: one reason for both, theirs as the detail."""
        return ConnectionFailure(TLS_CLOSED, tls=True, detail=self.reason)

    def describe(self, where: str) -> str:
        """What failed, for a log line or an error message: e.g. `cannot reach the broker at host:1883: ...`."""
        if not self.tls:
            return f"cannot reach the broker at {where}: {self.reason}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"TLS with the broker at {where} failed: {self.reason}{detail}; {self.hint}"

    @property
    def hint(self) -> str:
        """The settings to check, for a TLS failure ("" for others)."""
        if not self.tls:
            return ""
        if "verify failed" in self.reason:
            return "check mqtt.ca_file, the CA that signed the broker's certificate, and mqtt.host, a name it is for"
        if self.reason == TLS_CLOSED or "certificate" in self.reason or "unknown ca" in self.reason:
            return "check mqtt.cert_file and mqtt.key_file: a client certificate signed by a CA the broker trusts"
        return "check mqtt.tls and the TLS settings of the broker's listener"


def refusal_hint(reason: str) -> str:
    """The settings to check when the broker refuses CONNECT with `reason`, as " (check ...)", or ""."""
    return " (check mqtt.username and mqtt.password or mqtt.password_file)" if reason in _AUTH_REASONS else ""


def socket_failure(message: str) -> ConnectionFailure | None:
    """The socket error a line of paho's error log reports, or None for any other line."""
    found = _PAHO_SOCKET_ERROR.fullmatch(message)
    if found is None:
        return None
    text = found.group(1)
    return ConnectionFailure(_ERROR_NOISE.sub("", text) or text, text.startswith("[SSL") or "(_ssl.c:" in text)
