"""The deployment files: the systemd unit as systemd itself reads it, the exposure it leaves, the
install/uninstall scripts' dry runs, the udev rule as udev parses it, and the claim that
MemoryDenyWriteExecute= leaves the shipped TFLite models (XNNPACK) working."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
UNIT = DEPLOY / "atmguard.service"
RULE = DEPLOY / "99-atmguard-cardreader.rules"
INSTALL = DEPLOY / "install.sh"
UNINSTALL = DEPLOY / "uninstall.sh"
MODELS_DIR = REPO_ROOT / "firmware_models"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SHELLCHECK = shutil.which("shellcheck")
UDEVADM = shutil.which("udevadm")
UNSHARE = shutil.which("unshare")
MAX_EXPOSURE = 3.5
INSTALLED_EXEC = "/opt/atmguard/venv/bin/atmguard"

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order."""
    section = ""
    out: list[tuple[str, str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service_values(key: str) -> list[str]:
    return [v for s, k, v in unit_directives(UNIT.read_text()) if s == "Service" and k == key]


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit with only ExecStart's executable moved to where this checkout's ``atmguard`` is.

    systemd-analyze verify checks that every Exec*= program exists, and /opt/atmguard/venv does not
    on a development machine; this venv's console script is the same program with the same
    arguments. The copy keeps its name (verify derives the unit name from the file name).
    """
    local_exec = Path(sys.prefix) / "bin" / "atmguard"
    if not local_exec.exists():
        pytest.skip(f"{local_exec} not installed (pip install -e .)")
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_EXEC} ") == 1, "ExecStart= no longer starts the installed venv"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={local_exec} "))
    return copy


# --- (a) systemd-analyze verify ---------------------------------------------------------------------


@needs_systemd_analyze
def test_unit_verifies_without_any_message(tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    # --man=no: Documentation= points at the installed DEPLOY.md, not a man page to look up.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misplaced key (the classic StartLimitIntervalSec= in [Service])."""
    copy = verifiable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("[Service]\n", "[Service]\nStartLimitIntervalSec=0\n", 1))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'StartLimitIntervalSec' in section [Service]" in result.stderr


def test_unit_runs_the_daemon_as_the_lead_specified() -> None:
    assert service_values("ExecStart") == [f"{INSTALLED_EXEC} --config /etc/atmguard/atmguard.toml run"]
    assert service_values("Type") == ["notify"]
    assert service_values("NotifyAccess") == ["main"]
    assert service_values("WatchdogSec") == ["10s"]
    assert service_values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service_values("User") == ["atmguard"] and service_values("Group") == ["atmguard"]
    assert service_values("StateDirectory") == ["atmguard"]
    assert service_values("StateDirectoryMode") == ["0700"]
    assert service_values("RuntimeDirectory") == ["atmguard"]
    # Every credential name the config's defaults read must be loaded from the root-only directory.
    from atmguard.config import CentralSettings

    central = CentralSettings()
    names = {central.password_credential, central.pin_pepper_credential, central.pan_key_credential}
    assert sorted(service_values("LoadCredential")) == sorted(
        f"{name}:/etc/atmguard/credentials/{name}" for name in names
    )


# --- (b) systemd-analyze security -------------------------------------------------------------------


@needs_systemd_analyze
def test_security_exposure_is_at_most_3_5() -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for atmguard\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# --- (c) install.sh / uninstall.sh ------------------------------------------------------------------


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_script_parses_and_is_strict(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script: Path) -> None:
    result = subprocess.run([SHELLCHECK, str(script)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "")


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120)


# Paths a real install creates; a dry run must leave every one of them as it found it.
INSTALLED_PATHS = [
    Path("/opt/atmguard"),
    Path("/etc/atmguard"),
    Path("/etc/systemd/system/atmguard.service"),
    Path("/etc/udev/rules.d/99-atmguard-cardreader.rules"),
    Path("/etc/modules-load.d/atmguard.conf"),
]


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_install_dry_run_lists_every_change_and_makes_none() -> None:
    before = {path: path.exists() for path in INSTALLED_PATHS}
    had_user = user_exists("atmguard")
    result = run_script(INSTALL, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if not before[Path("/etc/systemd/system/atmguard.service")]:
        assert f"install -D -m 0644 -o root -g root {UNIT} /etc/systemd/system/atmguard.service" in out
    if not before[Path("/etc/udev/rules.d/99-atmguard-cardreader.rules")]:
        assert "would write: /etc/udev/rules.d/99-atmguard-cardreader.rules" in out
        assert 'SYMLINK+="atm-cardreader"' in out
    if had_user:
        assert "user atmguard exists" in out
    else:
        assert re.search(r"would run: useradd --system .*--home-dir /nonexistent .*atmguard$", out, re.M)
    assert "would run: python3 -m venv --system-site-packages /opt/atmguard/venv" in out or (
        "venv /opt/atmguard/venv exists" in out
    )
    assert "fetch.py --models-dir /opt/atmguard/firmware_models --check" in out
    assert "would run: systemctl enable atmguard.service" in out
    assert "systemctl restart" not in out  # only with --now
    # Secrets are listed for the operator, never made up.
    for name in ("central-password", "pin-pepper", "pan-hmac-key"):
        if not Path("/etc/atmguard/credentials", name).exists():
            assert name in result.stderr
    assert not re.search(r"would (run|write):.*credentials/(central-password|pin-pepper|pan-hmac-key)", out)
    assert {path: path.exists() for path in INSTALLED_PATHS} == before
    assert user_exists("atmguard") == had_user


def test_install_now_adds_the_restart_only_with_the_flag() -> None:
    result = run_script(INSTALL, "--dry-run", "--now")
    if Path("/etc/atmguard/credentials/pin-pepper").exists():
        pytest.skip("this machine has atmguard credentials installed")
    # Without credentials --now refuses to start the service rather than fail at the first customer.
    assert result.returncode == 1
    assert "not starting atmguard" in result.stderr
    assert "systemctl restart" not in result.stdout


def test_install_refuses_a_non_usb_card_reader_port() -> None:
    if UDEVADM is None:
        pytest.skip("udevadm not installed (Debian package: udev)")
    result = run_script(INSTALL, "--dry-run", "--cardreader", "/dev/null")
    assert result.returncode == 1
    assert "/dev/null is not a USB serial adapter" in result.stderr


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_scripts_reject_unknown_options(script: Path) -> None:
    result = run_script(script, "--dry-run", "--frobnicate")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def run_unprivileged(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run as an ordinary user: as nobody when the tests run as root (needs a world-readable checkout)."""
    as_nobody = {"user": "nobody", "group": "nogroup", "extra_groups": []} if os.geteuid() == 0 else {}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=120, cwd="/", **as_nobody
    )


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_scripts_refuse_to_run_for_real_without_root(script: Path) -> None:
    result = run_unprivileged(script)
    assert result.returncode == 1 and "must run as root" in result.stderr
    # ... while the dry run needs no root: it only reads.
    dry = run_unprivileged(script, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run done, nothing changed" in dry.stdout


def test_uninstall_dry_run_keeps_the_evidence_without_purge() -> None:
    before = {path: path.exists() for path in [*INSTALLED_PATHS, Path("/var/lib/atmguard")]}
    result = run_script(UNINSTALL, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "kept: /var/lib/atmguard (evidence journal)" in result.stdout
    assert "rm -rf /var/lib/atmguard" not in result.stdout
    if before[Path("/etc/systemd/system/atmguard.service")]:
        assert "would run: systemctl disable --now atmguard.service" in result.stdout
    assert {path: path.exists() for path in before} == before


# --- (d) the udev rule ----------------------------------------------------------------------------------

# udev's rule syntax (udev(7)): KEY[{attr}] OP "value", comma separated; matches use == or !=,
# assignments = += -= :=. Only keys this rule needs are listed; a typo is not one of them.
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL", "KERNELS", "ATTRS", "ENV"}
ASSIGN_KEYS = {"SYMLINK", "GROUP", "MODE", "OWNER", "TAG", "ENV"}
TOKEN = re.compile(r'\s*([A-Z]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def parse_rule_lines(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens, pos = [], 0
        while pos < len(line):
            match = TOKEN.match(line, pos)
            assert match, f"cannot parse udev rule at: {line[pos:]!r}"
            tokens.append(match.groups())
            pos = match.end()
        rules.append(tokens)
    return rules


def test_udev_rule_names_the_reader_for_the_daemon_only() -> None:
    (rule,) = parse_rule_lines(RULE.read_text())
    for key, _attr, op, _value in rule:
        allowed = MATCH_KEYS if op in ("==", "!=") else ASSIGN_KEYS
        assert key in allowed, f"{key}{op}: not a udev key for this operator"
    values = {(key, attr, op): value for key, attr, op, value in rule}
    assert values[("SUBSYSTEM", None, "==")] == "tty"
    assert re.fullmatch(r"[0-9a-f]{4}", values[("ATTRS", "idVendor", "==")])
    assert re.fullmatch(r"[0-9a-f]{4}", values[("ATTRS", "idProduct", "==")])
    assert values[("SYMLINK", None, "+=")] == "atm-cardreader"
    assert values[("GROUP", None, "=")] == "dialout"
    assert values[("MODE", None, "=")] == "0660"
    # The daemon reaches the port through this group: the unit must grant it.
    assert "dialout" in service_values("SupplementaryGroups")[0].split()


def test_udev_rule_parser_rejects_a_malformed_line() -> None:
    with pytest.raises(AssertionError, match="cannot parse"):
        parse_rule_lines('SUBSYSTEM=="tty", SYMLINK+=atm-cardreader')


def udevadm_parse_messages(rules_dir: Path, tmp_path: Path) -> str:
    """udevadm's own rule parser, in a private mount namespace so only ``rules_dir`` is read there.

    /run/udev is replaced by an empty tmp directory (rules.d inside it), so nothing of the host's
    udev state is read or written. Skips when unshare is not permitted (non-root, containers).
    """
    if UDEVADM is None or UNSHARE is None:
        pytest.skip("udevadm/unshare not installed (Debian packages: udev, util-linux)")
    fake_run = tmp_path / "run-udev"
    shutil.copytree(rules_dir, fake_run / "rules.d")
    script = f'mount --bind "{fake_run}" /run/udev && exec "{UDEVADM}" test /sys/class/tty/ptmx'
    result = subprocess.run(
        [UNSHARE, "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    if "Reading rules file: /run/udev/rules.d/" not in result.stdout + result.stderr:
        pytest.skip(f"cannot run udevadm test in a private mount namespace here: {result.stderr[-300:]}")
    return result.stdout + result.stderr


def test_udevadm_parses_the_rule_without_complaint(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULE, rules / RULE.name)
    messages = udevadm_parse_messages(rules, tmp_path)
    assert f"Reading rules file: /run/udev/rules.d/{RULE.name}" in messages
    complaints = [
        line for line in messages.splitlines() if line.startswith(f"/run/udev/rules.d/{RULE.name}:")
    ]
    assert complaints == []


def test_udevadm_check_does_catch_a_typo(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / RULE.name).write_text(RULE.read_text().replace("SYMLINK+=", "SYMLNK+="))
    messages = udevadm_parse_messages(rules, tmp_path)
    assert f"/run/udev/rules.d/{RULE.name}:" in messages and "SYMLNK" in messages


# --- MemoryDenyWriteExecute= and the models ---------------------------------------------------------

# systemd's MemoryDenyWriteExecute=yes (seccomp_memory_deny_write_execute() in systemd's
# src/shared/seccomp-util.c), rebuilt with libseccomp through ctypes: EPERM for mmap() of memory
# both writable and executable, for mprotect()/pkey_mprotect() adding PROT_EXEC and for shmat()
# with SHM_EXEC. The child then loads both shipped models (XNNPACK delegate included) and runs them.
MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, errno, sys
    import numpy as np

    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    SCMP_ACT_ALLOW, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 7
    SCMP_ACT_EPERM = 0x00050000 | errno.EPERM
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    for name, mask in (("mmap", PROT_WRITE | PROT_EXEC), ("mprotect", PROT_EXEC),
                       ("pkey_mprotect", PROT_EXEC), ("shmat", SHM_EXEC)):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        cmp = ArgCmp(2, SCMP_CMP_MASKED_EQ, mask, mask)
        assert lib.seccomp_rule_add_array(ctx, SCMP_ACT_EPERM, nr, 1, ctypes.byref(cmp)) == 0, name
    assert lib.seccomp_load(ctx) == 0

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    MAP_PRIVATE_ANON = 0x22
    address = libc.mmap(None, 4096, 1 | PROT_WRITE | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0)
    print("wx-mmap", "refused" if address in (None, ctypes.c_void_p(-1).value) else "allowed",
          errno.errorcode.get(ctypes.get_errno()))

    from atmguard.config import settings_from_mapping
    from atmguard.vision.detector import Face
    from atmguard.vision.pipeline import VisionPipeline
    from atmguard.vision.runtime import runtime_info

    settings = settings_from_mapping({"paths": {"models_dir": sys.argv[1]}})
    pipeline = VisionPipeline.from_settings(settings)
    pipeline.open()
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(360, 640, 3), dtype=np.uint8)
    faces = pipeline.detector.detect(frame)
    keypoints = np.array([[280, 150], [360, 150], [320, 190], [320, 230], [250, 170], [390, 170]], float)
    face = Face(box=(240.0, 100.0, 400.0, 280.0), keypoints=keypoints, score=0.9)
    probability = pipeline.classifier.covered_probability(frame, face)
    pipeline.close()
    from atmguard.vision.embedder import FaceEmbedder

    embedder = FaceEmbedder.from_settings(settings)
    embedding = embedder.embed(rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8))
    embedder.close()
    print("embedding-norm", round(float(np.linalg.norm(embedding)), 3))
    print("runtime", runtime_info())
    print("detector-ran", len(faces))
    print("covering-probability", probability)
    """
)


def test_memory_deny_write_execute_leaves_the_models_working() -> None:
    if service_values("MemoryDenyWriteExecute") != ["yes"]:
        pytest.skip("the unit does not set MemoryDenyWriteExecute=yes")
    if not (MODELS_DIR / "third_party" / "face_detection_short_range.tflite").is_file():
        pytest.skip("third-party models not fetched (make models)")
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp not installed (Debian package: libseccomp2)")
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE, str(MODELS_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    # The filter is really in force (the probe itself is refused W+X memory) ...
    assert lines["wx-mmap"] == "refused EPERM"
    # ... and both models still load and run under it.
    assert "detector-ran" in lines
    assert lines["embedding-norm"] == "1.0"  # the face embedder too
    assert 0.0 <= float(lines["covering-probability"]) <= 1.0
    # The runtime took the XNNPACK path, the one whose code generation MDWE could have broken.
    assert "XNNPACK delegate" in result.stderr
