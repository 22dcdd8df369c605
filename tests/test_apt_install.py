"""`script/apt-install`, which `script/test` installs Debian packages with: it waits for another package manager."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .speech import REPO

APT_INSTALL = REPO / "script" / "apt-install"
# dpkg's own lock; apt-get, dpkg and unattended-upgrades take it while they work.
DPKG_LOCK = "/var/lib/dpkg/lock-frontend"
# A package every machine that runs these tests has installed: installing it again changes nothing.
INSTALLED_PACKAGE = "mosquitto"


@contextmanager
def dpkg_lock_held(seconds: float) -> Iterator[None]:
    """Hold dpkg's lock, as another apt-get would, for `seconds` (in a thread), and release it at the end anyway."""
    descriptor = os.open(DPKG_LOCK, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(descriptor, fcntl.LOCK_EX)
    released = threading.Event()

    def release() -> None:
        released.wait(seconds)
        fcntl.lockf(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)

    holder = threading.Thread(target=release)
    holder.start()
    try:
        yield
    finally:
        released.set()
        holder.join()


def _apt_install(wait_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(APT_INSTALL), INSTALLED_PACKAGE],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EDGE_ASR_APT_WAIT_S": str(wait_s)},
        stdin=subprocess.DEVNULL,
    )


def test_it_waits_while_another_package_manager_holds_the_lock_then_installs() -> None:
    started = time.monotonic()
    with dpkg_lock_held(4.0):
        result = _apt_install(wait_s=120)

    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 4.0
    assert f"another package manager holds {DPKG_LOCK}; waiting up to 120 s" in result.stderr
    assert "the lock is free after" in result.stderr
    listed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", INSTALLED_PACKAGE], capture_output=True, text=True)
    assert listed.stdout == "install ok installed"


def test_it_gives_up_with_a_message_once_its_bound_is_spent() -> None:
    with dpkg_lock_held(30.0):
        started = time.monotonic()
        result = _apt_install(wait_s=2)
        waited = time.monotonic() - started

    assert result.returncode == 100
    assert f"{DPKG_LOCK} is still held after 2 s" in result.stderr
    # The script counts whole seconds (bash's SECONDS): its bound is kept to within one.
    assert 1.0 <= waited < 30.0
