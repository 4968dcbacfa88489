"""Checks that need no ATM hardware: config, models, journal, outbox, disk, central server, clock.

Each function returns the row(s) of one check; :mod:`atmguard.diag.full` wraps them in time-bounded
:class:`~atmguard.diag.model.Check` objects. Every one is safe while the daemon runs (read-only
journal access, a separate database connection, no device opened).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atmguard.config import Settings, relative_to_config
from atmguard.diag.model import CheckResult, Status
from atmguard.errors import ConfigError

logger = logging.getLogger(__name__)

INFERENCE_RUNS = 5
"""Timed runs per model (after one warm-up); the median is reported."""
DISK_WARN_MARGIN_PERCENT = 5.0
"""WARN this close below the journal's disk watermark."""
OUTBOX_WARN_AGE_S = 3600.0
"""WARN when the oldest unsynced record is older than this (the central server is not keeping up)."""
CLOCK_COMMAND_TIMEOUT_S = 3.0
VERIFY_PROGRESS_MIN_EVENTS = 10_000
ATM_PROCEDURES = (
    "atm_chain_head",
    "face_template",
    "hot_list_status",
    "ingest_event",
    "ingest_snapshot",
    "pin_salt",
    "schema_version",
    "verify_pin",
)
"""The stored procedures an ATM account may use (sql/grants/atm.sql): those
:class:`~atmguard.store.central.CentralStore` calls, and ``schema_version`` for this check."""

_MODELS_FIX = "reinstall the models: firmware_models/fetch.py --models-dir <paths.models_dir> (make models)"


# --- config ----------------------------------------------------------------------------------------


def check_config(path: Path, settings: Settings | None, error: ConfigError | None) -> CheckResult:
    """The config as the command loaded it (``settings``) or why it could not (``error``)."""
    if error is not None:
        first = error.issues[0] if error.issues else str(error)
        return CheckResult(
            "config",
            Status.FAIL,
            f"{len(error.issues)} error(s); first: {first}",
            f"atmguard check-config {path} lists every error with its key path",
            "config",
        )
    assert settings is not None
    roles = ", ".join(
        f"{role}={getattr(settings, role).backend}"
        for role in ("card_reader", "keypad", "actuator", "camera", "display")
    )
    if settings.source.startswith("<"):
        return CheckResult(
            "config",
            Status.WARN,
            f"no config file at {path}: built-in defaults ({roles})",
            f"install the site config as {path} (deploy/atmguard.example.toml) or pass --config",
            "config",
        )
    return CheckResult(
        "config", Status.PASS, f"{settings.source}: valid (atm {settings.atm.id}; {roles})", "", "config"
    )


# --- models ----------------------------------------------------------------------------------------


def check_models(settings: Settings) -> list[CheckResult]:
    """Manifest present, each model's sha256 as pinned, both loadable, and their inference time."""
    from atmguard.vision.models import load_manifest, models_dir_from_settings, verify_model
    from atmguard.vision.runtime import ModelError

    models_dir = models_dir_from_settings(settings)
    try:
        specs = load_manifest(models_dir)
    except ModelError as exc:
        return [CheckResult("models", Status.FAIL, str(exc), _MODELS_FIX, "models")]
    rows: list[CheckResult] = []
    for role, spec in sorted(specs.items()):
        try:
            verify_model(spec)
        except ModelError as exc:
            rows.append(CheckResult(f"model {role}", Status.FAIL, str(exc), _MODELS_FIX, "models"))
            continue
        rows.append(
            CheckResult(
                f"model {role}",
                Status.PASS,
                f"{spec.name}: {spec.size_bytes} bytes, sha256 {spec.sha256[:12]}... as the manifest pins",
                "",
                "models",
            )
        )
    if any(row.status is Status.FAIL for row in rows):
        rows.append(
            CheckResult(
                "vision inference", Status.SKIP, "not loaded: a model failed its check", _MODELS_FIX, "models"
            )
        )
        return rows
    rows.append(_check_inference(settings))
    return rows


def _median_ms(run: Callable[[], object], runs: int = INFERENCE_RUNS) -> float:
    run()  # warm-up: the first call allocates the interpreter's tensors
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return float(np.median(samples))


def _check_inference(settings: Settings) -> CheckResult:
    from atmguard.vision.detector import Face
    from atmguard.vision.pipeline import VisionPipeline
    from atmguard.vision.runtime import ModelError, runtime_info

    width, height = settings.camera.lores_size
    # A fixed noise frame: the detector's cost does not depend on the content, and the classifier
    # is timed on a face-sized box in the middle, as for a customer at the keypad.
    frame = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    side = 0.45 * height
    cx, cy = width / 2, height / 2
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    keypoints = np.array(
        [[cx - side * 0.2, cy - side * 0.1], [cx + side * 0.2, cy - side * 0.1], [cx, cy + side * 0.05],
         [cx, cy + side * 0.25], [cx - side * 0.45, cy], [cx + side * 0.45, cy]],
        dtype=np.float32,
    )  # fmt: skip
    face = Face(box=box, keypoints=keypoints, score=0.9)
    pipeline = VisionPipeline.from_settings(settings)
    try:
        pipeline.open()
        detector_ms = _median_ms(lambda: pipeline.detector.detect(frame))
        covering_ms = _median_ms(lambda: pipeline.classifier.covered_probability(frame, face))
    except ModelError as exc:
        return CheckResult(
            "vision inference", Status.FAIL, f"cannot load or run: {exc}", _MODELS_FIX, "models"
        )
    finally:
        pipeline.close()
    total_ms = detector_ms + covering_ms
    budget_ms = 1000.0 / settings.camera.fps
    measured = (
        f"{runtime_info().name}: detector {detector_ms:.1f} ms + covering {covering_ms:.1f} ms = {total_ms:.1f} ms"
        f" per frame (median of {INFERENCE_RUNS}, {width}x{height}); budget {budget_ms:.0f} ms at {settings.camera.fps:g} fps"
    )
    if total_ms > budget_ms:
        return CheckResult(
            "vision inference",
            Status.WARN,
            measured,
            "too slow for camera.fps: lower camera.fps or camera.lores_size, or give vision.num_threads 2",
            "models",
        )
    return CheckResult("vision inference", Status.PASS, measured, "", "models")


# --- journal, outbox and disk --------------------------------------------------------------------


def journal_path(settings: Settings) -> Path:
    from atmguard.store.journal import JOURNAL_FILENAME

    return relative_to_config(settings, settings.paths.state_dir) / JOURNAL_FILENAME


def check_journal(settings: Settings, *, progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Hash-chain integrity (read-only, safe while the daemon writes) and size on disk."""
    from atmguard.store.journal import JournalError, verify_journal

    path = journal_path(settings)
    if not path.is_file():
        return CheckResult(
            "journal",
            Status.WARN,
            f"{path}: no journal yet",
            "the daemon creates it at its first start; check paths.state_dir if it has run before",
            "journal",
        )
    try:
        report = verify_journal(path, progress=progress)
    except JournalError as exc:
        return CheckResult(
            "journal",
            Status.FAIL,
            str(exc),
            "check the file's owner and mode (atmguard, 0600) and the disk",
            "journal",
        )
    size_mb = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()) / 1e6
    if not report.ok:
        return CheckResult(
            "journal",
            Status.FAIL,
            f"hash chain BROKEN: {report.problem_count} problem(s), first: {report.problems[0]}; {size_mb:.1f} MB",
            "keep the file as evidence (do not delete it); `atmguard journal verify` lists every problem; tell the bank",
            "journal",
        )
    return CheckResult(
        "journal",
        Status.PASS,
        f"hash chain intact: {report.events_checked} events, {report.snapshots_checked} snapshots; {size_mb:.1f} MB",
        "",
        "journal",
    )


def check_outbox(settings: Settings) -> CheckResult:
    """What waits for the central server, and dead letters that need a technician."""
    from atmguard.store.journal import Journal, JournalError

    path = journal_path(settings)
    if not path.is_file():
        return CheckResult("outbox", Status.SKIP, "no journal yet", "", "journal")
    reader = Journal(path, atm_id=None, read_only=True)
    try:
        reader.open()
        stats = reader.outbox_stats()
    except JournalError as exc:
        return CheckResult(
            "outbox", Status.FAIL, str(exc), "check the journal file's owner and mode", "journal"
        )
    finally:
        reader.close()
    dead = stats.dead_events + stats.dead_snapshots
    age = stats.oldest_pending_age_s
    measured = (
        f"{stats.pending_events} events and {stats.pending_snapshots} snapshots pending"
        f" (oldest {'-' if age is None else f'{age:.0f} s'}), {dead} dead letter(s)"
    )
    if dead:
        return CheckResult(
            "outbox",
            Status.WARN,
            measured,
            "`atmguard outbox` shows each dead letter and why; fix, then --requeue",
            "journal",
        )
    if settings.central.enabled and age is not None and age > OUTBOX_WARN_AGE_S:
        return CheckResult(
            "outbox",
            Status.WARN,
            measured,
            "the central server is not keeping up: see the central rows; `atmguard sync --once` drains now",
            "journal",
        )
    return CheckResult("outbox", Status.PASS, measured, "", "journal")


def check_disk(settings: Settings, *, disk_usage: Callable[[str], Any] = shutil.disk_usage) -> CheckResult:
    """Use of the state directory's file system against ``journal.disk_high_watermark_percent``."""
    state_dir = relative_to_config(settings, settings.paths.state_dir)
    where = state_dir
    while not where.exists() and where != where.parent:
        where = where.parent  # not created yet: judge the file system it will be created on
    usage = disk_usage(str(where))
    used_percent = 100.0 * (usage.total - usage.free) / usage.total if usage.total else 100.0
    watermark = settings.journal.disk_high_watermark_percent
    reserve_bytes = settings.journal.emergency_reserve_mib * 1024 * 1024
    measured = (
        f"{where}: {used_percent:.1f}% used, {usage.free / 2**30:.2f} GiB free;"
        f" watermark {watermark:g}% (journal.disk_high_watermark_percent)"
    )
    fix = (
        "free space on that file system, or sync the backlog (`atmguard sync --once`) so the journal can"
        " purge synced records; never delete the journal"
    )
    if used_percent >= watermark or usage.free < reserve_bytes:
        return CheckResult("disk", Status.FAIL, measured + ": above the watermark", fix, "disk")
    if used_percent >= watermark - DISK_WARN_MARGIN_PERCENT:
        return CheckResult("disk", Status.WARN, measured + ": close to the watermark", fix, "disk")
    return CheckResult("disk", Status.PASS, measured, "", "disk")


# --- central server ------------------------------------------------------------------------------


def expected_schema_version() -> int | None:
    """The newest migration this code ships (None when sql/ is not installed alongside it)."""
    from atmguard.store.migrate import DEFAULT_SQL_DIR, MigrationError, discover

    try:
        migrations = discover(DEFAULT_SQL_DIR)
    except (MigrationError, OSError):
        return None
    return max((m.version for m in migrations), default=None)


def check_central(settings: Settings) -> list[CheckResult]:
    """Connect as the ATM with the configured TLS; then the schema version and the procedures."""
    from atmguard.store.central import (
        CentralAccessDeniedError,
        CentralTlsError,
        CentralUnavailableError,
        connect,
    )
    from atmguard.store.credentials import CredentialError

    central = settings.central
    if not central.enabled:
        return [
            CheckResult(
                "central",
                Status.SKIP,
                "central.enabled = false: journal only, nothing is synced",
                "",
                "central",
            )
        ]
    where = f"{central.user}@{central.host}:{central.port}/{central.database}"
    started = time.monotonic()
    try:
        conn = connect(settings)
    except CentralTlsError as exc:
        fix = "central.tls_ca_file must be the CA that signed the server's certificate, and central.host its name"
        return [
            CheckResult("central connection", Status.FAIL, f"{where}: TLS refused: {exc}", fix, "central")
        ]
    except CentralAccessDeniedError as exc:
        fix = "check the password credential (central.password_*) and that the bank ran `atmguard db add-atm`"
        return [CheckResult("central connection", Status.FAIL, f"{where}: {exc}", fix, "central")]
    except CentralUnavailableError as exc:
        fix = (
            "check the network, central.host/port and that the server runs; meanwhile the ATM journals locally"
            " and syncs later (transactions are declined while the bank is unreachable)"
        )
        return [CheckResult("central connection", Status.FAIL, f"{where}: {exc}", fix, "central")]
    except (CredentialError, ConfigError) as exc:
        return [
            CheckResult(
                "central connection",
                Status.FAIL,
                str(exc),
                "fix the [central] settings / credential files",
                "central",
            )
        ]
    connect_ms = (time.monotonic() - started) * 1e3
    try:
        tls = _tls_description(conn, settings)
        rows = [_connection_row(settings, where, connect_ms, tls)]
        rows.append(_schema_row(conn))
    finally:
        conn.close()
    return rows


def _tls_description(conn: Any, settings: Settings) -> str | None:
    if not settings.central.tls_ca_file:
        return None
    sock = getattr(conn, "_sock", None)
    version = sock.version() if hasattr(sock, "version") else None
    cipher = sock.cipher()[0] if hasattr(sock, "cipher") and sock.cipher() else None
    parts = [p for p in (version, cipher) if p]
    return "TLS verified (certificate and host name" + (f"; {', '.join(parts)})" if parts else ")")


def _connection_row(settings: Settings, where: str, connect_ms: float, tls: str | None) -> CheckResult:
    measured = f"{where}: connected in {connect_ms:.0f} ms, " + (
        tls or "no TLS (central.tls_ca_file is empty)"
    )
    if tls is None and settings.central.host not in ("127.0.0.1", "::1", "localhost"):
        return CheckResult(
            "central connection",
            Status.WARN,
            measured,
            "a remote server must be reached over TLS: set central.tls_ca_file (and the client certificate)",
            "central",
        )
    return CheckResult("central connection", Status.PASS, measured, "", "central")


ER_SP_DOES_NOT_EXIST = 1305
ER_PROCACCESS_DENIED_ERROR = 1370
_GRANTS_FIX = (
    "the bank's DBA runs `atmguard db migrate`; when nothing is pending, `atmguard db add-atm` for this"
    " ATM again (it re-grants the procedures)"
)


def _schema_row(conn: Any) -> CheckResult:
    """The server's migration (via ``schema_version()``) against this code's, then the procedures."""
    import pymysql

    expected = expected_schema_version()
    needs = f"this version needs {expected:04d}" if expected else "this install ships no sql/ to compare"
    migrate_fix = "the bank's DBA runs `atmguard db migrate` (then `db status` shows every migration applied)"
    try:
        with conn.cursor() as cursor:
            cursor.execute("CALL schema_version()")
            row = cursor.fetchone()
        server = int(row[0])
    except pymysql.err.MySQLError as exc:
        if exc.args and exc.args[0] in (ER_SP_DOES_NOT_EXIST, ER_PROCACCESS_DENIED_ERROR):
            # The server answers "denied" for a procedure that does not exist as well: to this
            # account an old server and missing grants look the same.
            measured = (
                "this account cannot call schema_version(): the server predates migration 0005 or"
                f" this ATM's grants are out of date; {needs}"
            )
            return CheckResult("central schema", Status.FAIL, measured, _GRANTS_FIX, "central")
        return CheckResult(
            "central schema", Status.FAIL, f"CALL schema_version() failed: {exc}", "", "central"
        )
    if expected is not None and server < expected:
        measured = f"server at migration {server:04d}, {needs}"
        return CheckResult("central schema", Status.FAIL, measured, migrate_fix, "central")
    if expected is not None and server > expected:
        return CheckResult(
            "central schema",
            Status.WARN,
            f"server at migration {server:04d}, newer than this version knows ({expected:04d})",
            "update atmguard on this ATM",
            "central",
        )
    missing = _missing_procedures(conn)
    if missing:
        return CheckResult(
            "central schema",
            Status.FAIL,
            f"server at migration {server:04d}; procedures missing or not granted to this account:"
            f" {', '.join(missing)}",
            _GRANTS_FIX,
            "central",
        )
    as_expected = "as this version expects" if expected is not None else needs
    return CheckResult(
        "central schema",
        Status.PASS,
        f"server at migration {server:04d}, {as_expected}; all {len(ATM_PROCEDURES)} procedures granted",
        "",
        "central",
    )


def _missing_procedures(conn: Any) -> list[str]:
    """ATM procedures this account cannot see (information_schema lists only the granted ones)."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT ROUTINE_NAME FROM information_schema.ROUTINES"
            " WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_TYPE = 'PROCEDURE'"
        )
        visible = {str(row[0]) for row in cursor.fetchall()}
    return [name for name in ATM_PROCEDURES if name not in visible]


# --- clock -----------------------------------------------------------------------------------------


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (Linux), with room to spare for fields added later."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 32),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


def kernel_clock_state() -> tuple[bool, float, float]:
    """(synchronised, estimated error s, maximum error s) from adjtimex(2) in read-only mode."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    timex = _Timex()  # modes = 0: read only, allowed without privileges
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        raise OSError(ctypes.get_errno(), "adjtimex failed")
    synchronised = state != _TIME_ERROR and not timex.status & _STA_UNSYNC
    return synchronised, timex.esterror / 1e6, timex.maxerror / 1e6


def check_clock(
    *,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    kernel_state: Callable[[], tuple[bool, float, float]] = kernel_clock_state,
) -> CheckResult:
    """``timedatectl show`` when systemd answers, else the kernel's adjtimex state."""
    fix = "enable time synchronisation (systemd-timesyncd or chrony) and check the NTP server is reachable"
    values = _timedatectl(run)
    if values is not None and "NTPSynchronized" in values:
        measured = f"timedatectl: NTPSynchronized={values['NTPSynchronized']}, NTP={values.get('NTP', '?')}"
        if values["NTPSynchronized"] == "yes":
            return CheckResult("clock", Status.PASS, measured, "", "clock")
        return CheckResult("clock", Status.WARN, measured + ": evidence timestamps may drift", fix, "clock")
    try:
        synchronised, est_s, max_s = kernel_state()
    except OSError as exc:
        return CheckResult("clock", Status.WARN, f"cannot read the clock state: {exc}", fix, "clock")
    if synchronised:
        return CheckResult(
            "clock",
            Status.PASS,
            f"kernel adjtimex: synchronised, estimated error {est_s * 1e3:.1f} ms, maximum {max_s * 1e3:.0f} ms",
            "",
            "clock",
        )
    return CheckResult(
        "clock",
        Status.WARN,
        f"kernel adjtimex: NOT synchronised (maximum error {max_s:.1f} s; timedatectl unavailable):"
        " evidence timestamps may drift",
        fix,
        "clock",
    )


def _timedatectl(run: Callable[..., subprocess.CompletedProcess[str]]) -> dict[str, str] | None:
    executable = shutil.which("timedatectl")
    if executable is None:
        return None
    try:
        done = run(
            [executable, "show"], capture_output=True, text=True, timeout=CLOCK_COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None  # e.g. no systemd as PID 1 (a container): fall back to the kernel's view
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values
