"""Scenario files: a timeline of what the customer and the world do, and what the ATM must do.

The format is documented for people in ``atmguard/harness/scenarios/README.md``; this module
parses and checks it. A file with a mistake is refused as a whole, every mistake listed with its
key path (``step 3: 'insert' names card 'bob', which [cards] does not define``), before any daemon
starts.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atmguard.errors import AtmguardError

DEFAULT_WAIT_S = 15.0
TYPING_INTERVAL_S = 0.35
"""Realistic key-down spacing of a customer typing a PIN (a quick typist is ~0.2 s)."""
ACTIONS = (
    "show",
    "insert",
    "insert_raw",
    "keys",
    "take_card",
    "wait_s",
    "wait_prompt",
    "wait_decision",
    "wait_face",
    "wait_faces",
    "wait_in_service",
    "cut_camera",
    "stop_central",
    "start_central",
    "stop_daemon",
)


class ScenarioError(AtmguardError, ValueError):
    """A scenario file cannot be read or does not follow the format; ``issues`` lists every problem."""

    def __init__(self, path: Path, issues: list[str]) -> None:
        self.path = path
        self.issues = issues
        super().__init__(f"{path}: " + "; ".join(issues))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardStatusAtBank(StrEnum):
    ACTIVE = "active"
    HOT_LISTED = "hot_listed"
    CLOSED = "closed"
    UNKNOWN = "unknown"  # never provisioned: the bank does not know the card


class Card(_Strict):
    """A card the customer carries; the bank knows it unless ``status = "unknown"``."""

    pin: Annotated[str, Field(pattern=r"^[0-9]{4,12}$")] = "739184"
    status: CardStatusAtBank = CardStatusAtBank.ACTIVE
    max_pin_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    expiry: Annotated[str | None, Field(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")] = None
    """``YYYY-MM``; default two years from today. A past month makes an expired card."""
    luhn_valid: bool = True
    """False: the PAN's check digit is wrong (the reader's Luhn check refuses it)."""
    enrolled: str | None = None
    """Folder under the datasets directory with photos of the account holder: the bank enrols
    them as the card's face template (its first photos, which scenes show, are left out)."""


class Step(_Strict):
    """One thing that happens; exactly one action key per step."""

    show: str | None = None
    """Scene before the camera (``uncovered``, ``covered``, ``two_faces``, ``nobody``, or [scenes])."""
    insert: str | None = None
    """Name of a card in [cards]: insert it once the slot is open, and wait for its session."""
    insert_raw: str | None = None
    """Raw track 2 text, e.g. garbage: a card nobody can read."""
    keys: str | None = None
    """Keys typed on the keypad. ``{pin}`` is the inserted card's PIN, ``{wrong_pin}`` a wrong one."""
    interval_s: Annotated[float, Field(gt=0.08, le=5.0)] = TYPING_INTERVAL_S
    take_card: bool | None = None
    """Wait for the card at the gate and take it."""
    wait_s: Annotated[float | None, Field(gt=0, le=600)] = None
    wait_prompt: str | None = None
    """Wait until the display shows this text."""
    wait_decision: bool | None = None
    wait_face: Literal["no_face", "covered", "uncovered"] | None = None
    """Wait until the tracker reports this state of the main face."""
    wait_faces: Annotated[int | None, Field(ge=0, le=10)] = None
    """Wait until the camera sees this many faces."""
    wait_in_service: bool | None = None
    """Wait until the ATM is back in service (card slot open, no faults)."""
    cut_camera: bool | None = None
    """The camera stops delivering frames (show a scene to bring it back)."""
    stop_central: bool | None = None
    start_central: bool | None = None
    stop_daemon: bool | None = None
    """SIGTERM the daemon, as ``systemctl stop`` would; it must exit 0."""
    timeout_s: Annotated[float, Field(gt=0, le=600)] = DEFAULT_WAIT_S
    """How long a waiting action may wait before the scenario fails."""

    @model_validator(mode="after")
    def _exactly_one_action(self) -> Step:
        given = [name for name in ACTIONS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"a step needs exactly one action of {', '.join(ACTIONS)}; got {given or 'none'}"
            )
        return self

    @property
    def action(self) -> str:
        return next(name for name in ACTIONS if getattr(self, name) not in (None, False))

    def describe(self) -> str:
        value = getattr(self, self.action)
        return self.action if value is True else f"{self.action} {value}"


Outcome = Literal["approve", "deny", "retain"]


class Expect(_Strict):
    """What must be true when the timeline has run."""

    outcome: Outcome | None = None
    reason: str | None = None
    card: Literal["returned", "retained"] | None = None
    """``returned``: ejected and taken by the customer; ``retained``: captured into the bin."""
    prompts: list[str] = []
    """Texts the display must have shown, in this order (each a substring of one screen)."""
    never_prompts: list[str] = []
    journaled: list[str] = []
    """Journal event kinds the session must have recorded."""
    evidence: bool | None = None
    """At least one sealed snapshot journaled for the session (True), or none (False)."""
    synced: bool = False
    """Every journal record of the session reaches the central database."""
    out_of_service: bool | None = None
    """Whether the host was told ``out_of_service`` during the scenario."""
    daemon_exit: int | None = None


class Meta(_Strict):
    title: str
    rule: str = ""
    """The session-engine rule this scenario demonstrates, in a few words."""
    central: bool = True
    """Needs the central server (bank). Without one the runner reports the scenario as skipped."""


class Scenario(_Strict):
    scenario: Meta
    config: dict[str, dict[str, Any]] = {}
    """Overrides of the harness configuration, by section (e.g. ``[config.session]``)."""
    scenes: dict[str, str] = {}
    """Extra camera scenes: name -> folder under the datasets directory."""
    cards: dict[str, Card] = {}
    step: list[Step]
    expect: Expect = Expect()

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        problems = []
        for number, step in enumerate(self.step, start=1):
            if step.insert is not None and step.insert not in self.cards:
                problems.append(
                    f"step {number}: 'insert' names card {step.insert!r}, which [cards] does not define"
                )
        if not self.step:
            problems.append("a scenario needs at least one [[step]]")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def name(self) -> str:
        return self.scenario.title

    @property
    def needs_datasets(self) -> bool:
        """Extra scenes and enrolments are made of dataset photos (no fallback portrait for them)."""
        return bool(self.scenes) or any(card.enrolled for card in self.cards.values())

    def config_key(self) -> str:
        """Scenarios with the same key can share one daemon."""
        return repr(sorted((section, sorted(values.items())) for section, values in self.config.items()))


def load_scenario(path: Path) -> Scenario:
    """Read and check one scenario file; ScenarioError lists every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(path, [f"not valid TOML: {exc}"]) from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(path, [_describe(error) for error in exc.errors()]) from None


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if location.startswith("step."):  # "step.2.keys" -> "step 3: keys" (people count from 1)
        _, index, *rest = location.split(".")
        location = f"step {int(index) + 1}" + (f": {'.'.join(rest)}" if rest else "")
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def library_dir() -> Path:
    """The scenario library shipped with atmguard (one file per session-engine rule)."""
    return Path(__file__).resolve().parent / "scenarios"


def library() -> list[Path]:
    return sorted(library_dir().glob("*.toml"))
