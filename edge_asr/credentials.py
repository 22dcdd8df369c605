"""The files settings name (secrets, TLS certificates and keys), found and read so that a bad one stops start-up."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping

# systemd's LoadCredential= puts a service's credentials here; relative credential-file paths are looked up in it.
_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


# Here rather than in edge_asr.config (which exports it), so that the checks of this module can raise it.
class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


def credential_path(path: str, environ: Mapping[str, str]) -> str:
    """`path`, or when it is relative and systemd passed credentials, that credential's file ("" stays "")."""
    directory = environ.get(_CREDENTIALS_DIRECTORY)
    if directory and path and not os.path.isabs(path):
        return os.path.join(directory, path)
    return path


def secret(key: str, inline: str, path: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """The secret and its file: the first line of the file when one is named (found as credential_path finds it)."""
    path = credential_path(path, environ)
    return (_read_secret(key, path) if path else inline), path


def _read_secret(key: str, path: str) -> str:
    """The first line of a secret file, stripped; an unreadable or empty file is a ConfigError naming `key`."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline().strip()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not line:
        raise ConfigError(f"{key}: {path} is empty (its first line must hold the secret)")
    return line


def check_ssl(key: str, path: str, problem: str, load: Callable[[], object]) -> None:
    """Run an `ssl` load of `path`; its failure is a ConfigError naming `key`."""
    try:
        load()
    except ssl.SSLError as err:  # an OSError too, but one about the content, not the file
        reason = str(err.strerror or err).partition(" (_ssl.c:")[0]
        raise ConfigError(f"{key}: {path} {problem}: {reason}") from None
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror or err}") from None
