"""TOML configuration -> typed, frozen settings.

pydantic does the validation because it reports *every* error at once with the path of the
offending key, forbids unknown keys and freezes the result: exactly the behaviour a technician
needs from ``atmguard check-config``, in far less code than a hand-written validator.

Checks that span several sections (e.g. two roles wired to the same GPIO pin) run after the
per-key validation and are reported in the same list, each naming the key paths involved.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from atmguard.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/atmguard/atmguard.toml")
CONFIG_ENV_VAR = "ATMGUARD_CONFIG"

# BCM numbers of the 28 user GPIO lines on the 40-pin header of every Pi since the B+.
BcmPin = Annotated[int, Field(ge=0, le=27)]


def _list_to_tuple(value: Any) -> Any:
    # TOML has arrays, not tuples; strict mode would otherwise reject every [w, h] pair.
    return tuple(value) if isinstance(value, list) else value


def _size(max_width: int, max_height: int) -> Any:
    return Annotated[
        tuple[Annotated[int, Field(ge=64, le=max_width)], Annotated[int, Field(ge=64, le=max_height)]],
        BeforeValidator(_list_to_tuple),
    ]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AtmSettings(_Section):
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = "ATM-0001"
    """Identifies this ATM in journals and on the central server."""


class PathSettings(_Section):
    state_dir: str = "/var/lib/atmguard"
    """Journal, outbox and sealed snapshots."""
    models_dir: str = "/opt/atmguard/firmware_models"
    """Where the .tflite files and manifest.json live; relative paths are resolved against the config file."""


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class CardReaderSettings(_Section):
    backend: Literal["serial", "sim"] = "serial"
    """serial: a real reader on `port`; sim: the same client talking to a reader emulator on a pty."""
    protocol: Literal["sankyo", "ascii"] = "sankyo"
    """sankyo: motorized reader, framed STX/CRC protocol; ascii: swipe reader that prints track data as text lines."""
    port: Annotated[str, Field(min_length=1)] = "/dev/ttyUSB0"
    """Device path or any pyserial URL (e.g. loop://, rfc2217://host:port)."""
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 38400
    parity: Literal["auto", "N", "E", "O"] = "auto"
    """Serial parity; auto: E (8E1) for sankyo, as the readers ship, N (8N1) for ascii swipe readers."""
    response_timeout_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    """Per attempt: how long to wait for ACK and again for the response frame."""
    motion_timeout_s: Annotated[float, Field(gt=0, le=30)] = 5.0
    """How long initialise, eject and capture may take: they wait for the card transport motor."""
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    """Re-sends after a NAK or a timeout before the reader is declared unresponsive."""
    poll_interval_s: Annotated[float, Field(gt=0, le=5)] = 0.2
    """How often the reader's status is queried to notice card insertion and removal."""


class KeypadSettings(_Section):
    backend: Literal["gpio", "sim"] = "gpio"
    layout: Literal["4x3", "4x4"] = "4x3"
    row_pins: list[BcmPin] = Field(default_factory=lambda: [5, 6, 13, 19])
    column_pins: list[BcmPin] = Field(default_factory=lambda: [12, 16, 20])
    drive: Literal["rows", "columns"] = "rows"
    """Which lines are driven low one at a time; the others are read with pull-ups."""
    scan_hz: Annotated[float, Field(ge=20, le=1000)] = 100.0
    debounce_ms: Annotated[float, Field(ge=0, le=200)] = 30.0
    """A key must read the same for this long before a press or release is reported."""
    inter_key_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """PIN entry is abandoned when no key arrives for this long."""
    pin_min_digits: Annotated[int, Field(ge=4, le=12)] = 4
    pin_max_digits: Annotated[int, Field(ge=4, le=12)] = 6
    """ISO 9564 allows 4 to 12 digits."""
    pin_factory: Literal["default", "lgpio", "rpigpio", "native"] = "default"
    """gpiozero pin factory for the gpio backend; default lets gpiozero choose (lgpio on a Pi 5)."""


class ActuatorSettings(_Section):
    backend: Literal["gpio", "sim"] = "gpio"
    solenoid_pin: BcmPin = 17
    active_high: bool = True
    pulse_s: Annotated[float, Field(gt=0, le=5)] = 0.4
    """How long the solenoid is energised to divert one card."""
    max_on_s: Annotated[float, Field(gt=0, le=5)] = 1.0
    """Hard limit on continuous on-time, whatever the caller asks: protects the coil."""
    cooldown_s: Annotated[float, Field(ge=0, le=600)] = 5.0
    """Minimum time between the end of one pulse and the next one."""
    has_bin_sensor: bool = True
    """Whether a capture-bin sensor confirms that the retained card arrived in the bin."""
    bin_sensor_pin: BcmPin = 27
    """BCM pin of that sensor; ignored when has_bin_sensor is false."""
    bin_sensor_active_high: bool = False
    """False: the sensor pulls the line low when a card passes (input with pull-up)."""
    confirm_timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    pin_factory: Literal["default", "lgpio", "rpigpio", "native"] = "default"


class ReplayCameraSettings(_Section):
    path: str = ""
    """A directory of images (played in name order) or a single image file."""
    loop: bool = True


class Picamera2CameraSettings(_Section):
    camera_num: Annotated[int, Field(ge=0, le=7)] = 0
    """Which libcamera camera (a Pi 5 has two CSI ports)."""
    buffer_count: Annotated[int, Field(ge=2, le=8)] = 4
    """Request buffers libcamera cycles through; more smooths stalls at the cost of memory."""


class SimCameraSettings(_Section):
    scene_dir: str = ""
    """Directory with one sub-directory of images per scene (e.g. uncovered/, covered/, two_faces/).
    Empty: only the synthetic scenes (nobody, frozen, lost) are available."""
    initial_scene: str = "nobody"
    seed: int = 0
    """Seeds the simulated customer's movement and sensor noise, so runs are reproducible."""


class CameraSettings(_Section):
    backend: Literal["picamera2", "replay", "sim"] = "picamera2"
    lores_size: _size(1920, 1080) = (640, 360)
    """Inference stream (width, height) in pixels; keep the main stream's aspect ratio (the sensor
    scales one field of view into both, so a different ratio stretches faces)."""
    main_size: _size(4656, 3496) = (1920, 1080)
    """Evidence stream (width, height) in pixels."""
    fps: Annotated[float, Field(gt=0, le=60)] = 15.0
    picamera2: Picamera2CameraSettings = Picamera2CameraSettings()
    replay: ReplayCameraSettings = ReplayCameraSettings()
    sim: SimCameraSettings = SimCameraSettings()


class DisplaySettings(_Section):
    backend: Literal["terminal", "recording"] = "terminal"
    """terminal: prompts written to a TTY or stdout; recording: kept in memory (tests, harness)."""
    device: str = "-"
    """terminal backend: a TTY device path, or - for standard output."""


class VisionSettings(_Section):
    face_score_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.6
    """Detector confidence for a face. Above MediaPipe's 0.5 because a fixed ATM camera sees the same
    background every frame, so a false face there would repeat on every frame."""
    face_nms_iou: Annotated[float, Field(gt=0, lt=1)] = 0.3
    """Overlap above which two detections are merged into one face."""
    num_threads: Annotated[int, Field(ge=1, le=4)] = 1
    """Interpreter threads per model; one leaves the other core to the daemon."""
    covered_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.3
    """Covering probability at or above which a frame's face counts as covered (model card)."""
    min_face_px: Annotated[float, Field(ge=0, le=1000)] = 40.0
    """A primary face whose box is shorter than this (pixels, lores frame) is too small to judge
    and counts as no face."""
    max_faces_judged: Annotated[int, Field(ge=1, le=8)] = 3
    """How many of the largest faces get a covering verdict (the rest are only counted)."""
    evidence_margin: Annotated[float, Field(ge=0, le=2)] = 0.25
    """Margin around the face box in the evidence crop, as a fraction of the box size."""
    tracker_window_frames: Annotated[int, Field(ge=3, le=256)] = 10
    """Frames the tracker remembers."""
    tracker_uncover_frames: Annotated[int, Field(ge=2, le=255)] = 7
    """Uncovered frames within the window needed before the face counts as UNCOVERED."""
    tracker_cover_frames: Annotated[int, Field(ge=2, le=256)] = 3
    """Covered frames within the window that turn the state to COVERED."""
    tracker_no_face_frames: Annotated[int, Field(ge=2, le=1000)] = 5
    """Consecutive frames without a judgeable face that turn the state to NO_FACE."""
    tracker_face_count_frames: Annotated[int, Field(ge=1, le=256)] = 3
    """Frames over which the number of faces is smoothed (shoulder-surfing warning)."""
    tracker_stale_after_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    """A gap between frames longer than this resets the tracker to NO_FACE."""


class JournalSettings(_Section):
    synced_retention_days: Annotated[float, Field(gt=0, le=3650)] = 30.0
    """Records already on the central server are purged locally after this many days."""
    disk_high_watermark_percent: Annotated[float, Field(ge=50, le=99)] = 85.0
    """Above this use of the state directory's file system, the oldest synced records are purged
    early and, if that is not enough, an alarm is raised. Unsynced fraud evidence is never purged."""
    emergency_reserve_mib: Annotated[float, Field(ge=0, le=1024)] = 4.0
    """Disk space held back for fraud evidence and for the bookkeeping that frees space (marking
    records synced, purging), so a disk filled with unsynced evidence can still recover."""
    snapshot_jpeg_quality: Annotated[int, Field(ge=50, le=95)] = 85
    bank_public_key_file: str = "/etc/atmguard/bank_snapshot_public.key"
    """The bank's X25519 public key: snapshots are sealed to it, and this ATM cannot open them."""


class CentralSettings(_Section):
    enabled: bool = True
    """false: journal only (nothing is synced; decisions that need the server fail closed)."""
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 3306
    database: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")] = "atmguard"
    user: Annotated[str, Field(min_length=1, max_length=80)] = "atm"
    password_credential: Annotated[str, Field(min_length=1)] = "central-password"
    """Name of the systemd credential (LoadCredential=) holding the password, read from
    $CREDENTIALS_DIRECTORY; used when password_file is empty."""
    password_file: str = ""
    """A file holding the password (mode 0600). Passwords never go in this config file."""
    pin_pepper_credential: Annotated[str, Field(min_length=1)] = "pin-pepper"
    """systemd credential with the fleet secret mixed into every PIN derivation (>= 16 bytes)."""
    pin_pepper_file: str = ""
    """Or a file (mode 0600) holding it."""
    pan_key_credential: Annotated[str, Field(min_length=1)] = "pan-hmac-key"
    """systemd credential with the bank key that turns a PAN into its keyed hash (>= 16 bytes)."""
    pan_key_file: str = ""
    """Or a file (mode 0600) holding it."""
    tls_ca_file: str = ""
    """CA certificate that signed the server's certificate. Empty: no TLS (only for a server on
    the same host); when set, the certificate and host name are verified."""
    tls_cert_file: str = ""
    """Optional client certificate for mutual TLS."""
    tls_key_file: str = ""
    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    write_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0


class SyncSettings(_Section):
    batch_size: Annotated[int, Field(ge=1, le=5000)] = 200
    """Journal events sent to the central server per transaction."""
    snapshot_batch_mib: Annotated[float, Field(gt=0, le=256)] = 4.0
    """At most this much sealed snapshot data is held in memory and sent per transaction."""
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    """Pause between drains when the outbox is empty."""
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    """Retries while the server is unreachable wait a random time (full jitter) up to an
    exponentially growing cap, never more than this."""


class SessionSettings(_Section):
    """The bank's fraud policy and the customer-facing timeouts of one card session."""

    uncover_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    """A face still covered (or no face at all) this long after the prompt: deny, eject, journal
    an incident with a snapshot. Covering alone never retains the card."""
    card_take_timeout_s: Annotated[float, Field(gt=0, le=300)] = 30.0
    """An ejected card not taken within this time is retained (a forgotten card)."""
    camera_timeout_s: Annotated[float, Field(gt=0, le=2)] = 2.0
    """No camera frame for this long: the ATM goes out of service until frames come back."""
    session_timeout_s: Annotated[float, Field(gt=0, le=1800)] = 180.0
    """Hard limit on one session from card insertion to decision: deny and eject."""
    retain_hot_listed: bool = True
    """Retain a hot-listed card (with an evidence snapshot even if the face is covered); false: eject it."""
    retain_pin_exhausted: bool = True
    """Retain the card when the server reports the PIN attempts exhausted; false: eject it."""
    retain_forgotten_card: bool = True
    """Retain a card left in the slot after `card_take_timeout_s`; false: leave it at the gate."""
    pause_pin_on_multiple_faces: bool = False
    """Several faces at the screen during PIN entry always show a warning; true also ignores keys
    until only one face is left (shoulder surfing)."""


class VerificationSettings(_Section):
    """Face verification against the account holder's enrolled template (issue 7)."""

    enabled: bool = True
    """Compare the uncovered face with the card's enrolled template. Needs the `face_embedder` model."""
    match_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.54
    """Cosine score at or above which the face MATCHes (model card: FAR 0.1% with a margin)."""
    mismatch_threshold: Annotated[float, Field(ge=-1, le=1)] = -0.10
    """Below this the face is a confident MISMATCH: fraud, the card is retained with evidence. Set
    far below the genuine scores (model card): retaining a genuine customer's card is the failure
    to avoid. Between the thresholds the face is UNSURE: asked to look at the camera again."""
    frames: Annotated[int, Field(ge=1, le=30)] = 3
    """Good (aligned, sharp, frontal) frames averaged for one verdict."""
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 4.0
    """No good frames within this time: UNSURE."""
    attempts: Annotated[int, Field(ge=1, le=10)] = 3
    """UNSURE verdicts before the transaction is declined (the card is returned, never retained)."""
    require_template: bool = False
    """An account without an enrolled template: false serves it on card, PIN and an uncovered
    face; true declines it (`not_enrolled`)."""
    retain_mismatch: bool = True
    """Retain the card on a MISMATCH; false: decline and return it (the evidence is kept either way)."""

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> VerificationSettings:
        if not self.mismatch_threshold < self.match_threshold:
            raise ValueError("mismatch_threshold must be below match_threshold")
        return self


class DaemonSettings(_Section):
    """`atmguard run`: the service process."""

    host_socket_path: str = "/run/atmguard/host.sock"
    """UNIX socket where the ATM host software reads decisions as JSON lines (empty: none)."""
    host_socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    """Permissions of the host socket (the host software's user must be in atmguard's group)."""
    idle_fps: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Vision rate with nobody in a session; during a session it runs at camera.fps."""
    tick_interval_s: Annotated[float, Field(ge=0.01, le=1)] = 0.1
    """How often the controller checks the session's timeouts."""
    shutdown_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """On SIGTERM, the longest wait for the current card to be ejected before exiting anyway."""
    purge_interval_s: Annotated[float, Field(gt=0, le=86400)] = 600.0
    """How often synced journal records past their retention are purged."""
    sim_control_socket: str = ""
    """UNIX socket through which a test harness drives the simulated hardware (insert a card, type
    keys, change the camera scene). Refused unless every hardware role uses its sim backend."""
    status_socket_path: str = "/run/atmguard/status.sock"
    """Read-only UNIX socket where `atmguard status` and `atmguard diag` ask the running daemon for
    its state, hardware health, last events and outbox (empty: none)."""
    status_socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    """Permissions of the status socket (technicians' accounts in atmguard's group may read it)."""
    status_recent_events: Annotated[int, Field(ge=1, le=500)] = 20
    """How many recent decisions and service status changes the status socket reports."""


class Settings(_Section):
    atm: AtmSettings = AtmSettings()
    paths: PathSettings = PathSettings()
    logging: LoggingSettings = LoggingSettings()
    card_reader: CardReaderSettings = CardReaderSettings()
    keypad: KeypadSettings = KeypadSettings()
    actuator: ActuatorSettings = ActuatorSettings()
    camera: CameraSettings = CameraSettings()
    display: DisplaySettings = DisplaySettings()
    vision: VisionSettings = VisionSettings()
    journal: JournalSettings = JournalSettings()
    central: CentralSettings = CentralSettings()
    sync: SyncSettings = SyncSettings()
    session: SessionSettings = SessionSettings()
    verification: VerificationSettings = VerificationSettings()
    daemon: DaemonSettings = DaemonSettings()

    source: str = Field(default="<defaults>", exclude=True)
    """Where these settings were read from (not a TOML key)."""


def _format_loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def _cross_section_issues(settings: Settings) -> list[tuple[list[str], str]]:
    """Problems no single key shows: pin collisions and keypad geometry.

    Each issue is (key paths involved, message); the first path is the one reported.
    """
    issues: list[tuple[list[str], str]] = []
    keypad = settings.keypad
    expected_columns = 3 if keypad.layout == "4x3" else 4
    if len(keypad.row_pins) != 4:
        issues.append(
            (
                ["keypad.row_pins", "keypad.layout"],
                f"layout {keypad.layout} needs 4 row pins, got {len(keypad.row_pins)}",
            )
        )
    if len(keypad.column_pins) != expected_columns:
        issues.append(
            (
                ["keypad.column_pins", "keypad.layout"],
                f"layout {keypad.layout} needs {expected_columns} column pins, got {len(keypad.column_pins)}",
            )
        )
    if keypad.pin_min_digits > keypad.pin_max_digits:
        issues.append(
            (["keypad.pin_min_digits", "keypad.pin_max_digits"], "must not exceed keypad.pin_max_digits")
        )
    actuator = settings.actuator
    if actuator.pulse_s > actuator.max_on_s:
        issues.append((["actuator.pulse_s", "actuator.max_on_s"], "must not exceed actuator.max_on_s"))

    users: dict[int, list[str]] = {}
    for i, pin in enumerate(keypad.row_pins):
        users.setdefault(pin, []).append(f"keypad.row_pins[{i}]")
    for i, pin in enumerate(keypad.column_pins):
        users.setdefault(pin, []).append(f"keypad.column_pins[{i}]")
    users.setdefault(actuator.solenoid_pin, []).append("actuator.solenoid_pin")
    if actuator.has_bin_sensor:
        users.setdefault(actuator.bin_sensor_pin, []).append("actuator.bin_sensor_pin")
    for pin, paths in sorted(users.items()):
        if len(paths) > 1:
            issues.append((paths, f"GPIO{pin} is also used by {', '.join(paths[1:])}"))

    vision = settings.vision
    if vision.tracker_uncover_frames >= vision.tracker_window_frames:
        issues.append(
            (
                ["vision.tracker_uncover_frames", "vision.tracker_window_frames"],
                "must be less than vision.tracker_window_frames",
            )
        )
    for name in ("tracker_cover_frames", "tracker_face_count_frames"):
        if getattr(vision, name) > vision.tracker_window_frames:
            issues.append(
                (
                    [f"vision.{name}", "vision.tracker_window_frames"],
                    "must not exceed vision.tracker_window_frames",
                )
            )
    if settings.sync.backoff_initial_s > settings.sync.backoff_max_s:
        issues.append(
            (["sync.backoff_initial_s", "sync.backoff_max_s"], "must not exceed sync.backoff_max_s")
        )
    central = settings.central
    if bool(central.tls_cert_file) != bool(central.tls_key_file):
        issues.append(
            (["central.tls_cert_file", "central.tls_key_file"], "client certificate and key go together")
        )
    if settings.camera.backend == "replay" and not settings.camera.replay.path:
        issues.append((["camera.replay.path", "camera.backend"], "required when camera.backend is 'replay'"))
    return issues


def _without(data: Mapping[str, Any], loc: tuple[int | str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with the key at ``loc`` removed (indices stop the descent: the whole list goes)."""
    copy = dict(data)
    key = loc[0]
    if len(loc) > 1 and isinstance(loc[1], str) and isinstance(copy.get(key), Mapping):
        copy[key] = _without(copy[key], loc[1:])
    else:
        copy.pop(key, None)
    return copy


def _key_path(loc: tuple[int | str, ...]) -> str:
    """The dotted path of the TOML key an error location falls in (list indices dropped)."""
    return ".".join(str(part) for part in loc if isinstance(part, str))


def settings_from_mapping(data: Mapping[str, Any], *, source: str = "<mapping>") -> Settings:
    """Validate an already-parsed TOML document; raise ConfigError listing every problem.

    Keys that fail validation are set aside and the rest validated again, so the cross-section
    checks still run on what was valid and a technician sees every problem in one pass.
    """
    if "source" in data:
        raise ConfigError(source, [f"{source}: source: unknown key"])
    issues: list[str] = []
    failed_keys: set[str] = set()
    remaining: dict[str, Any] = dict(data)
    for _ in range(
        64
    ):  # each round removes at least one key, so this ends; the bound guards against surprises
        try:
            settings = Settings.model_validate({**remaining, "source": source})
            break
        except ValidationError as exc:
            for err in exc.errors():
                issues.append(f"{source}: {_format_loc(err['loc'])}: {err['msg']}")
                failed_keys.add(_key_path(err["loc"]))
                remaining = _without(remaining, err["loc"])
    else:  # pragma: no cover - would need a pathological document
        raise ConfigError(source, issues)
    for paths, message in _cross_section_issues(settings):
        # A check that involves a key already reported would be judged on its default: skip it.
        if not any(_key_path_of(path) in failed_keys for path in paths):
            issues.append(f"{source}: {paths[0]}: {message}")
    if issues:
        raise ConfigError(source, issues)
    return settings


def _key_path_of(path: str) -> str:
    return path.split("[", 1)[0]


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate one TOML file."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"{source}: invalid TOML: {exc}"]) from None
    return settings_from_mapping(data, source=source)


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """--config wins over $ATMGUARD_CONFIG, which wins over the default path."""
    if cli_path:
        return Path(cli_path)
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR])
    return DEFAULT_CONFIG_PATH


def relative_to_config(settings: Settings, value: str) -> Path:
    """Resolve a path from the config against the config file's directory."""
    path = Path(value).expanduser()
    if path.is_absolute() or settings.source.startswith("<"):
        return path
    return Path(settings.source).resolve().parent / path
