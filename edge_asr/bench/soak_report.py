"""The soak's findings: finals matched between the clients and the broker, memory, sessions and tasks left, the
targets, and the report as a few lines of text and as JSON."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .output import json_text
from .soak_clients import ClientKind, ClientRun
from .soak_mqtt import BrokerFinal

KINDS: tuple[ClientKind, ...] = ("wyoming", "websocket", "vanishing", "slow-reader", "never-reader")
# Clients that read until their `done` (or transcript): every final of their session must reach them.
STAYERS: frozenset[ClientKind] = frozenset({"wyoming", "websocket", "slow-reader"})
# Lost finals named one by one in the report (the counts are always complete).
MAX_NAMED_LOST = 20


@dataclass(frozen=True)
class KindTally:
    """The finals of one kind of client: received by the clients, on the broker, and lost on either side."""

    kind: ClientKind
    clients: int
    finals_received: int
    finals_on_broker: int
    lost_on_clients: int
    lost_on_broker: int
    errors: int


@dataclass(frozen=True)
class FinalsTally:
    """Every final, counted at the service, at the clients and at the broker.

    `made_by_service` is the service's own `edge_asr_events_total{type="final"}` over the run (None when it does
    not expose it); `not_on_broker` is how many of those the broker never delivered, attributed or not.
    `vanished_on_broker` counts finals of vanished clients' sessions that reached the broker after they left;
    `vanished_owed` the vanished clients that had seen a partial of the utterance they left (its final is owed:
    one missing on the broker is in `lost_on_broker`).
    """

    made_by_service: int | None
    on_broker: int
    broker_duplicates: int
    unattributed_on_broker: int
    received_by_clients: int
    lost_on_clients: int
    lost_on_broker: int
    not_on_broker: int | None
    vanished_on_broker: int
    vanished_owed: int
    lost: tuple[str, ...]
    kinds: tuple[KindTally, ...]


class _Counts:
    """A kind's running counts while the finals are matched."""

    def __init__(self) -> None:
        self.clients = self.received = self.on_broker = self.lost_on_clients = self.lost_on_broker = self.errors = 0


def _distinct(finals: Sequence[BrokerFinal]) -> dict[tuple[str, int], dict[int, str]]:
    """The broker's finals by (site, session), then by utterance; a duplicate delivery counts once."""
    sessions: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
    for final in finals:
        sessions[(final.site, final.session)].setdefault(final.utterance, final.text)
    return sessions


def account(clients: Sequence[ClientRun], broker: Sequence[BrokerFinal], made_by_service: int | None) -> FinalsTally:
    """Match what the clients received with what the broker delivered.

    WebSocket clients know their session (`ready`), so finals match by (site, session, utterance): a client that
    read until `done` must have every final the broker has of its session and every utterance it saw partials of;
    the broker must have every final a client received, every utterance a client left before its final, and a
    final of each never-reading client that spoke words. A Wyoming request's transcript is the text of its
    session's finals: per site, the transcripts and the broker's session texts (empty ones aside) must be the
    same multiset.
    """
    sessions = _distinct(broker)
    on_broker = sum(len(utterances) for utterances in sessions.values())
    counts = {kind: _Counts() for kind in KINDS}
    lost: list[str] = []
    vanished_on_broker = 0
    known: set[tuple[str, int]] = set()
    for run in clients:
        tally = counts[run.kind]
        tally.clients += 1
        tally.errors += bool(run.errors)
        tally.received += len(run.finals)
        if run.kind == "wyoming" or run.session is None:
            continue
        known.add((run.site, run.session))
        published = sessions.get((run.site, run.session), {})
        tally.on_broker += len(published)
        received = {final.utterance for final in run.finals}
        owed = set(run.owed)
        who = f"{run.kind} {run.site} session {run.session} ({run.clip}, at {run.started_s:.0f} s)"
        if run.kind in STAYERS:
            for utterance in sorted((set(published) | owed) - received):
                tally.lost_on_clients += 1
                lost.append(f"{who}: final of utterance {utterance} not received by the client")
        for utterance in sorted((received | owed) - set(published)):
            tally.lost_on_broker += 1
            lost.append(f"{who}: final of utterance {utterance} not on the broker")
        if run.spoke_unread and not published:
            tally.lost_on_broker += 1
            lost.append(f"{who}: no final on the broker for the clip it spoke")
        if run.kind == "vanishing":
            vanished_on_broker += len(set(published) - received)
    wyoming = counts["wyoming"]
    for site in sorted({run.site for run in clients if run.kind == "wyoming"}):
        transcripts = Counter(
            final.text for run in clients if run.kind == "wyoming" and run.site == site for final in run.finals
        )
        texts = Counter(
            " ".join(text for _utterance, text in sorted(utterances.items()) if text)
            for (final_site, _session), utterances in sessions.items()
            if final_site == site
        )
        known.update(key for key in sessions if key[0] == site)
        transcripts.pop("", None)
        texts.pop("", None)
        wyoming.on_broker += sum(texts.values())
        for text, count in (texts - transcripts).items():
            wyoming.lost_on_clients += count
            lost.append(f"wyoming {site}: transcript {text!r} on the broker but not received by the satellite")
        for text, count in (transcripts - texts).items():
            wyoming.lost_on_broker += count
            lost.append(f"wyoming {site}: transcript {text!r} received by the satellite but not on the broker")
    kinds = tuple(
        KindTally(kind, c.clients, c.received, c.on_broker, c.lost_on_clients, c.lost_on_broker, c.errors)
        for kind, c in counts.items()
    )
    return FinalsTally(
        made_by_service=made_by_service,
        on_broker=on_broker,
        broker_duplicates=len(broker) - on_broker,
        unattributed_on_broker=sum(len(u) for key, u in sessions.items() if key not in known),
        received_by_clients=sum(kind.finals_received for kind in kinds),
        lost_on_clients=sum(kind.lost_on_clients for kind in kinds),
        lost_on_broker=sum(kind.lost_on_broker for kind in kinds),
        not_on_broker=None if made_by_service is None else max(0, made_by_service - on_broker),
        vanished_on_broker=vanished_on_broker,
        vanished_owed=sum(1 for run in clients if run.kind == "vanishing" and run.owed),
        lost=tuple(lost[:MAX_NAMED_LOST]),
        kinds=kinds,
    )


@dataclass(frozen=True)
class RssTally:
    """The service's resident memory in MiB: at rest after the warm-up and at the end (every client gone), the
    growth between them against its limit, the peak, the trend after the warm-up, and (seconds into the soak, MiB)
    samples."""

    warmup_s: float
    after_warmup_mb: float
    end_mb: float
    growth_mb: float
    limit_mb: float
    peak_mb: float
    trend_mb_per_min: float | None
    timeline: tuple[tuple[float, float], ...]


def rss_tally(
    samples: Sequence[tuple[float, float]],
    warmup_s: float,
    after_warmup_mb: float,
    end_mb: float,
    limit_mb: float,
    step_s: float,
) -> RssTally:
    """Summarise RSS samples (seconds into the soak, MiB) around the two readings at rest; the timeline keeps one
    sample per `step_s`."""
    later = [(at, mb) for at, mb in samples if at >= warmup_s]
    trend = None
    if len(later) >= 2 and later[0][0] != later[-1][0]:
        trend = 60 * statistics.linear_regression([at for at, _ in later], [mb for _, mb in later]).slope
    timeline: list[tuple[float, float]] = []
    for at, mb in samples:
        if not timeline or at >= timeline[-1][0] + step_s:
            timeline.append((at, mb))
    return RssTally(
        warmup_s=warmup_s,
        after_warmup_mb=after_warmup_mb,
        end_mb=end_mb,
        growth_mb=end_mb - after_warmup_mb,
        limit_mb=limit_mb,
        peak_mb=max([end_mb, *(mb for _, mb in samples)]),
        trend_mb_per_min=trend,
        timeline=tuple(timeline),
    )


@dataclass(frozen=True)
class NeverReaderTally:
    """The never-reading clients: how many the service cut off, after how long (connect → closed), how many it
    did not cut off before the soak gave up on them, and how many were still connected when the run ended."""

    started: int
    cut_off: int
    cut_off_after_s: tuple[float, ...]
    not_cut_off: int
    open_at_end: int


def never_reader_tally(clients: Sequence[ClientRun]) -> NeverReaderTally:
    """Count the never-reading clients by how they ended."""
    runs = [run for run in clients if run.kind == "never-reader"]
    return NeverReaderTally(
        started=len(runs),
        cut_off=sum(1 for run in runs if run.ended == "cut off"),
        cut_off_after_s=tuple(sorted(run.cut_off_after_s for run in runs if run.cut_off_after_s is not None)),
        not_cut_off=sum(1 for run in runs if run.ended == "gave up"),
        open_at_end=sum(1 for run in runs if run.ended == "run ended"),
    )


@dataclass(frozen=True)
class BrokerRestart:
    """The broker was stopped `at_s` seconds into the soak and took connections again `down_s` later;
    `finals_while_down` of the finals it delivered were made meanwhile (the service queued them)."""

    at_s: float
    down_s: float
    finals_while_down: int


def broker_restart(at_s: float, down: tuple[float, float], finals: Sequence[BrokerFinal]) -> BrokerRestart:
    """A restart whose outage ran over `down` (seconds since the epoch), with the finals made meanwhile."""
    made = {
        (f.site, f.session, f.utterance) for f in finals if f.made_at is not None and down[0] <= f.made_at <= down[1]
    }
    return BrokerRestart(at_s, down[1] - down[0], len(made))


@dataclass(frozen=True)
class SoakReport:
    """Everything `edge-asr bench --soak` found; `misses` names each target missed (none: exit code 0)."""

    corpus: str
    clips: int
    minutes: float
    service_pid: int
    send_timeout_s: float
    rss: RssTally
    sessions_left: int | None
    event_loop_tasks_before: int | None
    event_loop_tasks_after: int | None
    finals: FinalsTally
    never_readers: NeverReaderTally
    broker_restarts: tuple[BrokerRestart, ...]
    subscriber_connects: int
    unreadable_on_broker: int
    cpu_s: float
    audio_s: float
    events_dropped: int | None
    mqtt_finals_dropped: int | None
    errors: dict[str, int]
    service_exit_code: int | None
    service_log_problems: tuple[str, ...]
    misses: tuple[str, ...]
    clients: tuple[ClientRun, ...]
    broker_finals: tuple[BrokerFinal, ...]

    @property
    def tasks_left(self) -> int | None:
        """Event-loop tasks at the end beyond those before the first client (None: no such gauge)."""
        if self.event_loop_tasks_before is None or self.event_loop_tasks_after is None:
            return None
        return max(0, self.event_loop_tasks_after - self.event_loop_tasks_before)


def error_counts(clients: Sequence[ClientRun]) -> dict[str, int]:
    """The clients' errors by code (the text before the first colon), most frequent first."""
    counts = Counter(error.split(":", 1)[0] for run in clients for error in run.errors)
    return dict(counts.most_common())


def missed_targets(report: SoakReport) -> tuple[str, ...]:
    """Each target the soak missed, in words."""
    misses: list[str] = []
    rss, finals = report.rss, report.finals
    if rss.growth_mb > rss.limit_mb:
        misses.append(f"RSS grew {rss.growth_mb:.1f} MB after the warm-up (limit {rss.limit_mb:g} MB)")
    if report.sessions_left != 0:
        left = "unknown (no /health)" if report.sessions_left is None else report.sessions_left
        misses.append(f"sessions left open at the end: {left}")
    if report.tasks_left:
        misses.append(f"{report.tasks_left} event-loop task(s) left over")
    if finals.on_broker == 0:
        misses.append("no final reached the broker")
    if finals.lost_on_clients:
        misses.append(f"{finals.lost_on_clients} final(s) lost on clients that stayed connected")
    if finals.lost_on_broker:
        misses.append(f"{finals.lost_on_broker} final(s) lost on the broker")
    if finals.not_on_broker:
        misses.append(f"{finals.not_on_broker} final(s) the service made never reached the broker")
    if report.never_readers.not_cut_off:
        misses.append(f"{report.never_readers.not_cut_off} never-reading client(s) not cut off by the service")
    if report.service_exit_code != 0:
        misses.append(f"the service exited with {report.service_exit_code} on SIGTERM (expected 0)")
    return tuple(misses)


def _optional(value: float | None, spec: str = "g", missing: str = "n/a") -> str:
    return missing if value is None else f"{value:{spec}}"


def _cells(*values: object) -> list[str]:
    return [str(value) for value in values]


def format_soak(report: SoakReport) -> str:
    """The report as a table of the clients' finals and a few lines on memory, sessions, CPU and the targets."""
    finals, rss, never = report.finals, report.rss, report.never_readers
    restarts = (
        ", ".join(
            f"{r.at_s:.0f} s ({r.down_s:.1f} s down, {r.finals_while_down} finals made meanwhile)"
            for r in report.broker_restarts
        )
        or "none"
    )
    headers = ["client", "runs", "finals got", "on broker", "lost on client", "lost on broker", "with errors"]
    rows = [headers]
    for kind in finals.kinds:
        lost_on_client = kind.lost_on_clients if kind.kind in STAYERS else "-"
        rows.append(
            _cells(
                kind.kind,
                kind.clients,
                kind.finals_received,
                kind.finals_on_broker,
                lost_on_client,
                kind.lost_on_broker,
                kind.errors,
            )
        )
    clients, errors = sum(k.clients for k in finals.kinds), sum(k.errors for k in finals.kinds)
    rows.append(
        _cells(
            "total",
            clients,
            finals.received_by_clients,
            finals.on_broker,
            finals.lost_on_clients,
            finals.lost_on_broker,
            errors,
        )
    )
    widths = [max(len(row[column]) for row in rows) for column in range(len(headers))]
    table = [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
        for row in rows
    ]
    cut_after = never.cut_off_after_s
    cut_off = f"{never.cut_off} cut off" + (f" after {min(cut_after):.1f}-{max(cut_after):.1f} s" if cut_after else "")
    tasks = (
        "no event-loop task gauge in /metrics"
        if report.event_loop_tasks_before is None
        else f"event-loop tasks {report.event_loop_tasks_before} before the clients,"
        f" {_optional(report.event_loop_tasks_after)} after"
    )
    error_codes = ", ".join(f"{code} {count}" for code, count in report.errors.items()) or "none"
    lines = [
        f"edge-asr soak: {report.minutes:g} min, {report.corpus} ({report.clips} clips), service pid"
        f" {report.service_pid}, broker restarted at {restarts}",
        *table,
        f"finals: the service made {_optional(finals.made_by_service)}, the broker got {finals.on_broker}"
        f" ({finals.broker_duplicates} duplicate deliveries, {finals.unattributed_on_broker} unattributed),"
        f" {_optional(finals.not_on_broker)} never reached it; vanished clients' finals on the broker:"
        f" {finals.vanished_on_broker} ({finals.vanished_owed} owed after a partial)",
        f"never-reading clients: {never.started}, {cut_off} (limits.send_timeout_s {report.send_timeout_s:g} s),"
        f" {never.not_cut_off} not cut off, {never.open_at_end} still connected when the run ended",
        f"RSS at rest: {rss.after_warmup_mb:.1f} MB after the warm-up ({rss.warmup_s:.0f} s), {rss.end_mb:.1f} MB at"
        f" the end: {rss.growth_mb:+.1f} MB (limit {rss.limit_mb:g} MB); peak under load {rss.peak_mb:.1f} MB;"
        f" trend {_optional(rss.trend_mb_per_min, '+.2f')} MB/min",
        f"sessions left open: {_optional(report.sessions_left)}; {tasks}",
        f"CPU: {report.cpu_s:.1f} s for {report.audio_s:.1f} s of audio sent;"
        f" events dropped {_optional(report.events_dropped)},"
        f" MQTT finals dropped {_optional(report.mqtt_finals_dropped)}",
        f"client errors: {error_codes}; service log problems: {len(report.service_log_problems)};"
        f" service exit code {_optional(report.service_exit_code)}",
        *(f"  lost: {line}" for line in finals.lost),
        *(f"  service log: {line}" for line in report.service_log_problems),
        "targets: all met" if not report.misses else "targets missed: " + "; ".join(report.misses),
    ]
    return "\n".join(lines)


def soak_json(report: SoakReport) -> str:
    """The report as indented JSON (floats rounded to 3 decimals), with `passed` and `tasks_left`."""
    data = {"passed": not report.misses, "tasks_left": report.tasks_left, **dataclasses.asdict(report)}
    return json_text(data, 3)
