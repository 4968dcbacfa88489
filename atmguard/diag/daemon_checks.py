"""The daemon's rows: is it running and healthy, and - while it owns the devices - the hardware rows
as it sees them (from its status socket), so ``atmguard diag`` never has to open a device the daemon
holds.
"""

from __future__ import annotations

from typing import Any

from atmguard.diag.model import CheckResult, Status
from atmguard.hardware.ownership import Holder
from atmguard.service.statuslink import StatusUnavailable

OWNED = "owned by the running daemon"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def daemon_row(
    answer: dict[str, Any] | None, unavailable: StatusUnavailable | None, holder: Holder | None
) -> CheckResult:
    """PASS: running and in service; FAIL: out of service, stuck, or unreachable; WARN: not running."""
    if answer is None:
        assert unavailable is not None
        if unavailable.reason == "denied":
            return CheckResult(
                "daemon",
                Status.FAIL,
                f"cannot ask it: {unavailable}",
                "run as root or from an account in group atmguard",
                "daemon",
            )
        if holder is not None and holder.is_daemon:
            return CheckResult(
                "daemon",
                Status.WARN,
                f"running ({holder.describe()}) but its status socket does not answer: {unavailable}",
                "set daemon.status_socket_path (default /run/atmguard/status.sock) and restart it",
                "daemon",
            )
        return CheckResult(
            "daemon",
            Status.WARN,
            f"not running ({unavailable}): this ATM is not protected",
            "start it when the work is done: sudo systemctl start atmguard",
            "daemon",
        )
    uptime = _duration(float(answer.get("uptime_s") or 0))
    head = f"pid {answer.get('pid')}, atmguard {answer.get('version')}, up {uptime}"
    watchdog = answer.get("watchdog") or {}
    ping_age = watchdog.get("last_ping_age_s")
    interval = watchdog.get("interval_s")
    ping = "" if ping_age is None else f", controller pinged {ping_age:.1f} s ago"
    if not answer.get("in_service"):
        faults = answer.get("faults") or {}
        why = "; ".join(f"{name}: {reason}" for name, reason in sorted(faults.items())) or answer.get(
            "phase", "?"
        )
        return CheckResult(
            "daemon",
            Status.FAIL,
            f"{head}: OUT OF SERVICE ({why})",
            "see the rows of the failing parts and `journalctl -u atmguard`",
            "daemon",
        )
    if interval and ping_age is not None and ping_age > interval:
        return CheckResult(
            "daemon",
            Status.FAIL,
            f"{head}: the controller has not pinged the watchdog for {ping_age:.1f} s (interval {interval:g} s)",
            "systemd restarts a hung daemon; if it keeps happening, `journalctl -u atmguard` says why",
            "daemon",
        )
    return CheckResult(
        "daemon", Status.PASS, f"{head}, in service ({answer.get('phase')}){ping}", "", "daemon"
    )


def _role_row(name: str, area: str, role: dict[str, Any] | None, detail: str | None = None) -> CheckResult:
    if role is None:
        return CheckResult(name, Status.SKIP, f"{OWNED}: not reported", "", area)
    ok = role.get("ok")
    text = f"{OWNED}: {detail or role.get('detail', '')}"
    if ok is None:
        return CheckResult(name, Status.SKIP, text, "", area)
    if ok:
        return CheckResult(name, Status.PASS, text, "", area)
    return CheckResult(
        name,
        Status.FAIL,
        text,
        "the daemon reports this part faulty: `journalctl -u atmguard` says since when and why",
        area,
    )


def hardware_rows_from_daemon(answer: dict[str, Any]) -> list[CheckResult]:
    """The hardware rows as the running daemon sees them (no device is opened)."""
    hardware = answer.get("hardware") or {}
    camera = hardware.get("camera")
    rows: list[CheckResult] = []
    if camera is not None:
        fps = camera.get("fps_measured")
        age = camera.get("last_frame_age_s")
        fps_text = (
            "rate not measured yet"
            if fps is None
            else f"camera {fps:.1f} fps (configured {camera.get('fps_configured'):g})"
        )
        age_text = "no frame yet" if age is None else f"last frame {age:.1f} s ago"
        rows.append(
            _role_row(
                "camera frames", "camera", camera, f"{fps_text}, {age_text}" if camera.get("ok") else None
            )
        )
    else:
        rows.append(_role_row("camera frames", "camera", None))
    face = answer.get("face") or {}
    rows.append(
        CheckResult(
            "camera face",
            Status.PASS if face.get("state") == "uncovered" else Status.SKIP,
            f"{OWNED}: tracker says {face.get('state', '?')}, {face.get('count', 0)} face(s)",
            "",
            "camera",
        )
    )
    rows.append(_role_row("card reader", "card reader", hardware.get("card_reader")))
    rows.append(_role_row("keypad", "keypad", hardware.get("keypad")))
    rows.append(_role_row("display", "display", hardware.get("display")))
    actuator = hardware.get("actuator")
    rows.append(_role_row("bin sensor", "actuator", actuator))
    rows.append(
        CheckResult(
            "actuator",
            Status.SKIP,
            f"{OWNED}: not fired (stop the daemon, then `atmguard diag --fire`)",
            "",
            "actuator",
        )
    )
    return rows


def hardware_rows_not_checked(
    names: list[tuple[str, str]], why: str, status: Status, fix: str
) -> list[CheckResult]:
    """The hardware rows when they cannot be checked at all (lock held elsewhere, lock unusable)."""
    return [CheckResult(name, status, why, fix, area) for name, area in names]
