"""Test certificates made with the `openssl` command: a CA, and server or client certificates it signs, or
self-signed ones (for any TLS listener a test starts: mosquitto, HTTPS)."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
# Short-lived: nothing outlives the test run, and a certificate valid from "now" works at once.
DAYS = "2"
# EC keys are made in milliseconds where RSA takes a noticeable share of a test's time on a slow machine.
KEY_ALGORITHM = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PEM private key."""

    cert: Path
    key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run([OPENSSL, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"openssl {' '.join(map(str, args))} failed:\n{result.stderr}"


def _subject_alt_names(hosts: tuple[str, ...]) -> str:
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.append(f"DNS:{host}")
        else:
            names.append(f"IP:{host}")
    return ",".join(names)


def make_ca(directory: Path, name: str = "ca") -> KeyPair:
    """A self-signed CA certificate (with the extensions strict verification wants) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *KEY_ALGORITHM, "-nodes", "-days", DAYS,
        "-subj", f"/CN=edge-asr test {name}",
        "-keyout", pair.key, "-out", pair.cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=directory,
    )  # fmt: skip
    return pair


def make_certificate(
    directory: Path,
    name: str,
    ca: KeyPair | None,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client: bool = False,
) -> KeyPair:
    """A certificate for `hosts` (in its subjectAltName; the first is its CN) signed by `ca`, or self-signed
    when `ca` is None; a client certificate when `client`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    extensions = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
        f"subjectAltName={_subject_alt_names(hosts)}",
        "subjectKeyIdentifier=hash",
    ]
    subject = f"/CN={hosts[0]}"
    if ca is None:
        added = [arg for extension in extensions for arg in ("-addext", extension)]
        _openssl(
            "req", "-x509", *KEY_ALGORITHM, "-nodes", "-days", DAYS, "-subj", subject,
            "-keyout", pair.key, "-out", pair.cert, *added,
            cwd=directory,
        )  # fmt: skip
        return pair
    request = directory / f"{name}.csr"
    extension_file = directory / f"{name}.ext"
    extension_file.write_text("\n".join([*extensions, "authorityKeyIdentifier=keyid"]) + "\n")
    _openssl(
        "req", "-new", *KEY_ALGORITHM, "-nodes", "-subj", subject, "-keyout", pair.key, "-out", request,
        cwd=directory,
    )  # fmt: skip
    # A random serial: OpenSSL's own would need a serial file kept next to the CA.
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", f"0x{secrets.token_hex(8)}",
        "-days", DAYS, "-extfile", extension_file, "-out", pair.cert,
        cwd=directory,
    )  # fmt: skip
    return pair


@dataclass(frozen=True)
class Pki:
    """A CA with a server certificate for 127.0.0.1 and a client certificate it signed, and a second CA that
    signed neither (the wrong CA for a client to trust)."""

    ca: KeyPair
    server: KeyPair
    client: KeyPair
    other_ca: KeyPair


def make_pki(directory: Path) -> Pki:
    """Everything a mutual-TLS test needs, in `directory`."""
    ca = make_ca(directory, "ca")
    return Pki(
        ca=ca,
        server=make_certificate(directory, "server", ca),
        client=make_certificate(directory, "client", ca, hosts=("edge-asr-test-client",), client=True),
        other_ca=make_ca(directory, "other-ca"),
    )
