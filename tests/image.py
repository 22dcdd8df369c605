"""Container images for the tests, built and run with buildah alone: no image registry, no daemon.

The base is a Debian bookworm root file system that `mmdebstrap` builds from the Debian archive (through the
host's own apt sources), imported as `localhost/edge-asr-test-base:bookworm` and passed as `BUILD_FROM`, so
the Dockerfile is built exactly as on a Docker host, from a base of the same release. Images are built with
`buildah build --isolation chroot --format docker` (the OCI format drops `HEALTHCHECK`) and run with
`buildah run --isolation chroot --network host`, as the image's own user, entrypoint and command: the runtimes
that set resource limits (podman, docker) cannot run on CI's machine.

`buildah run` does not forward signals (a SIGTERM to it kills the command), so `RunningImage` signals the
image's process itself: the child of buildah's chroot helper, in the host's PID namespace (its root is the
container's root file system). Its exit status is the one `buildah run` reports. Every container started is
listed in `RUNNING`; a fixture in conftest stops and removes those a test leaves behind.

The base image is kept between runs (a second run builds only what changed): `buildah rmi
localhost/edge-asr-test-base:bookworm` makes the next run take a fresh one from the archive.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_IMAGE = "localhost/edge-asr-test-base:bookworm"
SERVICE_IMAGE = "localhost/edge-asr:test"
SUITE = "bookworm"
# Working containers are named after the test process, so leftovers of a killed run can be told from the
# containers of another test run going on at the same time.
CONTAINER_PREFIX = "edge-asr-test-"
# The host's CA bundle, mounted into builds for pip: a proxy that inspects TLS is trusted as on the host.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_BUNDLE = "/etc/ssl/edge-asr-build-ca.crt"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# As Debian's slim images: no manual pages, documents (but their copyright) or translations.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
_LOCK = Path(tempfile.gettempdir()) / "edge-asr-test-images.lock"
# Where a container's output goes when the test names no directory (one file per container name).
LOG_DIR = Path(tempfile.gettempdir()) / "edge-asr-image-logs"
BUILD_TIMEOUT_S = 1500.0
# The names Go gives the signals `buildah run` reports ("subprocess exited on terminated").
_SIGNAL_NAMES = {
    "terminated": signal.SIGTERM,
    "killed": signal.SIGKILL,
    "interrupt": signal.SIGINT,
    "hangup": signal.SIGHUP,
    "aborted": signal.SIGABRT,
    "segmentation fault": signal.SIGSEGV,
}


class ImageError(AssertionError):
    """A buildah or mmdebstrap command failed; the message holds its output."""


def buildah(*args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `buildah ARGS`; with `check`, raise ImageError with its output when it fails."""
    result = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise ImageError(f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def _images_lock() -> Iterator[None]:
    """One test run at a time builds the base (another engineer's run may want the same image)."""
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def image_exists(image: str) -> bool:
    """Whether local storage holds `image`."""
    return buildah("inspect", "--type", "image", image, check=False).returncode == 0


def apt_sources() -> list[Path]:
    """The host's apt source files for Debian (one-line .list or deb822 .sources), for mmdebstrap. Without them
    mmdebstrap would read sources from its standard input, or need a mirror named here."""
    candidates: list[Path] = []
    for location in APT_SOURCES:
        if location.is_file():
            candidates.append(location)
        elif location.is_dir():
            candidates += sorted(p for p in location.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    found = [path for path in candidates if re.search(r"/debian\b", path.read_text(errors="replace"))]
    if not found:
        raise ImageError(f"no Debian apt sources in {', '.join(map(str, APT_SOURCES))} for mmdebstrap")
    return found


def base_image(work: Path) -> str:
    """The bookworm base as a local image: reused when present, else built with mmdebstrap (minbase, documents
    left out as in Debian's slim images) into a tarball under `work` and committed from a scratch container."""
    with _images_lock():
        if image_exists(BASE_IMAGE):
            return BASE_IMAGE
        rootfs = work / f"{SUITE}-rootfs.tar"
        command = ["mmdebstrap", "--variant=minbase", *(f"--dpkgopt={option}" for option in _DPKG_EXCLUDES)]
        command += [SUITE, str(rootfs), *map(str, apt_sources())]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise ImageError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        container = buildah("from", "scratch").stdout.strip()
        try:
            buildah("add", container, str(rootfs), "/", timeout_s=600)
            buildah("config", "--cmd", "/bin/bash", container)
            buildah("commit", "--quiet", "--format", "docker", container, BASE_IMAGE, timeout_s=600)
        finally:
            buildah("rm", container, check=False)
            rootfs.unlink(missing_ok=True)
        return BASE_IMAGE


def build_image(context: Path, tag: str, build_args: Mapping[str, str], dockerfile: Path | None = None) -> str:
    """Build `context` (its Dockerfile, or `dockerfile`) as `tag` in the docker format, reusing cached layers.
    pip in the build trusts the host's CAs (PIP_CERT, unless `build_args` names one)."""
    command = ["build", "--isolation", "chroot", "--format", "docker", "--layers", "--force-rm", "--tag", tag]
    if "PIP_CERT" not in build_args and HOST_CA_BUNDLE.is_file():
        command += ["--volume", f"{HOST_CA_BUNDLE}:{BUILD_CA_BUNDLE}:ro", "--build-arg", f"PIP_CERT={BUILD_CA_BUNDLE}"]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    if dockerfile is not None:
        command += ["--file", str(dockerfile)]
    buildah(*command, str(context), timeout_s=BUILD_TIMEOUT_S)
    return tag


@dataclass(frozen=True)
class ImageConfig:
    """What an image runs, and how, as `buildah inspect` shows its docker configuration."""

    user: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]
    exposed_ports: frozenset[str]
    healthcheck: tuple[str, ...]
    labels: dict[str, str]
    working_dir: str
    stop_signal: str
    healthcheck_timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def command(self) -> tuple[str, ...]:
        """What a runtime starts: the entrypoint with the command as its arguments."""
        return self.entrypoint + self.cmd


def image_config(image: str) -> ImageConfig:
    """The configuration of a local image."""
    inspected = json.loads(buildah("inspect", "--type", "image", image).stdout)
    config: dict[str, Any] = inspected["Docker"].get("config") or inspected["OCIv1"].get("config") or {}
    healthcheck: dict[str, Any] = config.get("Healthcheck") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    timing: dict[str, float] = {
        key: healthcheck[key] / 1e9 for key in ("Interval", "Timeout", "StartPeriod") if key in healthcheck
    }
    if "Retries" in healthcheck:
        timing["Retries"] = float(healthcheck["Retries"])
    return ImageConfig(
        user=config.get("User") or "",
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        env=env,
        exposed_ports=frozenset(config.get("ExposedPorts") or {}),
        healthcheck=tuple(healthcheck.get("Test") or ()),
        labels=dict(config.get("Labels") or {}),
        working_dir=config.get("WorkingDir") or "",
        stop_signal=config.get("StopSignal") or "",
        healthcheck_timing_s=timing,
    )


@contextlib.contextmanager
def mounted(image: str) -> Iterator[Path]:
    """The root file system of a working container of `image`, mounted on the host, to read files from."""
    container = buildah("from", "--pull=never", image).stdout.strip()
    try:
        yield Path(buildah("mount", container).stdout.strip())
    finally:
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)


def user_ids(image: str, user: str) -> tuple[int, int]:
    """The uid and gid the image's /etc/passwd gives `user` (a name, or uid[:gid] as is)."""
    name, _, group = user.partition(":")
    if name.isdigit():
        return int(name), int(group) if group.isdigit() else int(name)
    with mounted(image) as root:
        for line in (root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
    raise ImageError(f"{image} has no user {name!r}")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    return children


def process_ids(pid: int) -> tuple[int, int]:
    """The real uid and gid of a process, from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    gid = re.search(r"^Gid:\s+(\d+)", status, re.MULTILINE)
    if uid is None or gid is None:
        raise ImageError(f"no Uid/Gid in /proc/{pid}/status:\n{status}")
    return int(uid.group(1)), int(gid.group(1))


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def contained_process(root_pid: int) -> int | None:
    """The command `buildah run` started below `root_pid`: the child of buildah's chroot helper
    (buildah-chroot-exec, which runs from a memfd). None while there is none (yet)."""
    children = _children()
    queue = list(children.get(root_pid, []))
    while queue:
        pid = queue.pop(0)
        if _argv0(pid) == "buildah-chroot-exec":
            found = children.get(pid, [])
            return found[0] if found else None
        queue += children.get(pid, [])
    return None


_counter = itertools.count(1)


@dataclass
class RunningImage:
    """An image's command running under `buildah run` in a working container of its own."""

    image: str
    container: str
    user: str
    command: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    offline: bool = False
    process: subprocess.Popen[str] | None = None
    removed: bool = False
    _status: int | None = None

    def start(self, volumes: Mapping[Path, str]) -> None:
        """Start the command (once)."""
        # Offline: buildah in a network namespace of its own, with nothing but a loopback that is down (a chroot
        # has the network of whoever starts it).
        args = ["unshare", "--net"] if self.offline else []
        args += ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", self.user]
        for host, inside in volumes.items():
            args += ["--volume", f"{host}:{inside}"]
        for name, value in self.env.items():
            args += ["--env", f"{name}={value}"]
        args += [self.container, "--", *self.command]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )

    def logs(self) -> str:
        """Everything the command (and buildah) wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pid(self, timeout_s: float = 30.0) -> int:
        """The host's process id of the command (the container's PID 1 under a runtime)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = contained_process(self.process.pid)
            if found is not None:
                return found
            if self.process.poll() is not None:
                raise ImageError(f"{self.command} exited with {self.exit_status()}:\n{self.logs()}")
            time.sleep(0.05)
        raise ImageError(f"no process of {self.container} under buildah after {timeout_s} s:\n{self.logs()}")

    def exit_status(self) -> int:
        """The command's exit status once `buildah run` has ended: what buildah reports ("subprocess exited with
        status N"), or minus the signal number when a signal ended it (as subprocess does)."""
        assert self.process is not None
        returncode = self.process.wait()
        if self._status is None:
            self._status = returncode
            reported = re.findall(r"subprocess exited (?:with status (\d+)|on (.+))$", self.logs(), re.MULTILINE)
            if reported:
                status, name = reported[0]
                self._status = int(status) if status else -int(_SIGNAL_NAMES.get(name.strip(), signal.SIGKILL))
            elif returncode != 0:
                self._status = returncode
        return self._status

    def wait(self, timeout_s: float) -> int:
        """Wait for the command to end by itself; its exit status."""
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise ImageError(f"{self.container} still running after {timeout_s} s:\n{self.logs()}") from err
        return self.exit_status()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the command itself, as a runtime does to PID 1 on `stop`."""
        os.kill(self.pid(), signum)

    def wait_ready(self, port: int, timeout_s: float = 120.0, path: str = "/health/ready") -> None:
        """Wait for `path` on the loopback `port` to answer 200; fails with the log when the command exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise ImageError(f"{self.command} exited with {self.exit_status()}:\n{self.logs()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise ImageError(f"{path} on port {port} not 200 after {timeout_s} s:\n{self.logs()}")

    def exec(
        self, command: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run another command in the same container, beside the running one (as `docker exec`, though in a
        chroot of its own on the same root file system and network), with the container's environment."""
        args = ["run", "--isolation", "chroot", "--network", "host", "--user", user or self.user]
        for name, value in {**self.env, **(env or {})}.items():
            args += ["--env", f"{name}={value}"]
        return buildah(*args, self.container, "--", *command, timeout_s=60, check=False)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the command, wait up to `timeout_s` for it (SIGKILL after), remove the container; the
        command's exit status."""
        try:
            if self.process is None:
                return 0
            if self.running():
                with contextlib.suppress(ImageError, ProcessLookupError):
                    self.signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.kill()
            return self.exit_status()
        finally:
            self.remove()

    def kill(self) -> None:
        """SIGKILL the command and buildah."""
        assert self.process is not None
        pid = contained_process(self.process.pid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def remove(self) -> None:
        """Remove the working container (once the command has ended)."""
        if self.running():
            self.kill()
        if not self.removed:
            buildah("rm", self.container, check=False)
            self.removed = True


# Every container the tests started, so that one whose test failed half way is still stopped (conftest).
RUNNING: list[RunningImage] = []


def run_image(
    image: str,
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Mapping[Path, str] | None = None,
    args: Sequence[str] | None = None,
    log_dir: Path | None = None,
    offline: bool = False,
) -> RunningImage:
    """Start the image as a runtime would: its entrypoint with `args` (else its command), as its user (or
    `user`), with its environment plus `env`, `volumes` mounted (host path: container path[:options]), on the
    host's network (`offline`: on none at all). Returns at once; see `RunningImage.wait_ready`."""
    config = image_config(image)
    name = f"{CONTAINER_PREFIX}{os.getpid()}-{next(_counter)}"
    container = buildah("from", "--pull=never", "--name", name, image).stdout.strip()
    directory = log_dir or LOG_DIR
    directory.mkdir(parents=True, exist_ok=True)
    running = RunningImage(
        image=image,
        container=container,
        user=user or config.user or "root",
        command=config.entrypoint + tuple(config.cmd if args is None else args),
        env=dict(env or {}),
        log_path=directory / f"{name}.log",
        offline=offline,
    )
    RUNNING.append(running)
    running.start(volumes or {})
    return running


def remove_stale_containers() -> None:
    """Remove the working containers of test runs that are gone (killed before they could clean up)."""
    listed = buildah("containers", "--format", "{{.ContainerName}}", check=False).stdout.split()
    for name in listed:
        match = re.fullmatch(rf"{re.escape(CONTAINER_PREFIX)}(\d+)-\d+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            buildah("rm", name, check=False)


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """A Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined and comments left out; one
    list per stage (each FROM starts one), the ARGs before the first FROM in a list of their own."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1].rstrip() + " "
            continue
        instruction, _, arguments = (logical + stripped).partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def final_stage(path: Path) -> dict[str, list[str]]:
    """The arguments of each instruction of a Dockerfile's last stage, in order."""
    found: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_stages(path)[-1]:
        found.setdefault(instruction, []).append(arguments)
    return found


def poll(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Wait until `condition` holds; the seconds it took. Fails naming `what` after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


def http_status(url: str) -> int:
    """The status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0
