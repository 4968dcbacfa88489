from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from atmguard.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    Settings,
    load_settings,
    relative_to_config,
    resolve_config_path,
    settings_from_mapping,
)
from atmguard.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "atmguard.example.toml"


def _leaf_paths(model: object, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, field in type(model).model_fields.items():
        if field.exclude:
            continue
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if hasattr(type(value), "model_fields"):
            paths |= _leaf_paths(value, f"{path}.")
        else:
            paths.add(path)
    return paths


def _toml_paths(table: dict, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            paths |= _toml_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def test_example_config_is_valid_and_documents_every_key_at_its_default():
    settings = load_settings(EXAMPLE)
    documented = _toml_paths(tomllib.loads(EXAMPLE.read_text()))
    assert documented == _leaf_paths(Settings())
    # The example promises "every key, at its default value": hold it to that.
    assert settings.model_dump() == Settings().model_dump()


def test_example_config_has_a_comment_before_every_key():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"line {i + 1} has no comment: {line}"


def _errors(data: dict, source: str = "test.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, source=source)
    return info.value.issues


def test_every_error_is_reported_at_once_with_file_and_key_path():
    issues = _errors(
        {
            "atm": {"id": "bad id!", "colour": "red"},
            "card_reader": {"baudrate": 12345, "retries": "3"},
            "camera": {"fps": 0, "lores_size": [640]},
            "nonsense": {},
        }
    )
    joined = "\n".join(issues)
    for path in (
        "atm.id",
        "atm.colour",
        "card_reader.baudrate",
        "card_reader.retries",
        "camera.fps",
        "camera.lores_size",
        "nonsense",
    ):
        assert f"test.toml: {path}" in joined, path
    assert len(issues) == 7


def test_wrong_types_are_not_coerced():
    issues = _errors({"keypad": {"scan_hz": "100"}, "actuator": {"active_high": 1}})
    assert any(i.startswith("test.toml: keypad.scan_hz:") for i in issues)
    assert any(i.startswith("test.toml: actuator.active_high:") for i in issues)


def test_list_index_is_part_of_the_path():
    issues = _errors({"keypad": {"column_pins": [12, 16, 99]}})
    assert issues == ["test.toml: keypad.column_pins[2]: Input should be less than or equal to 27"]


def test_gpio_pin_used_twice_names_both_keys():
    issues = _errors({"actuator": {"solenoid_pin": 13}})
    assert issues == ["test.toml: keypad.row_pins[2]: GPIO13 is also used by actuator.solenoid_pin"]


def test_cross_checks_run_alongside_per_key_errors():
    issues = _errors({"atm": {"id": ""}, "keypad": {"layout": "4x4"}, "actuator": {"pulse_s": 2.0}})
    assert any(i.startswith("test.toml: atm.id:") for i in issues)
    assert "test.toml: keypad.column_pins: layout 4x4 needs 4 column pins, got 3" in issues
    assert "test.toml: actuator.pulse_s: must not exceed actuator.max_on_s" in issues


def test_cross_check_is_not_judged_on_a_default_that_replaced_an_invalid_key():
    # column_pins is invalid; its default (12, 16, 20) must not produce a bogus collision with 12.
    issues = _errors({"keypad": {"column_pins": "12,16,20"}, "actuator": {"solenoid_pin": 12}})
    assert len(issues) == 1 and issues[0].startswith("test.toml: keypad.column_pins:")


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.atm.id = "X"  # type: ignore[misc]


def test_4x4_layout_and_absent_bin_sensor_free_its_pin():
    settings = settings_from_mapping(
        {
            "keypad": {"layout": "4x4", "column_pins": [12, 16, 20, 21]},
            "actuator": {"has_bin_sensor": False, "bin_sensor_pin": 21},
        }
    )
    assert settings.keypad.column_pins == [12, 16, 20, 21]
    assert settings.actuator.has_bin_sensor is False
    issues = _errors(
        {"keypad": {"layout": "4x4", "column_pins": [12, 16, 20, 21]}, "actuator": {"bin_sensor_pin": 21}}
    )
    assert issues == ["test.toml: keypad.column_pins[3]: GPIO21 is also used by actuator.bin_sensor_pin"]


def test_unreadable_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[atm\nid = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_settings(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(binary)


def test_config_path_precedence():
    assert resolve_config_path("a.toml", {CONFIG_ENV_VAR: "b.toml"}) == Path("a.toml")
    assert resolve_config_path(None, {CONFIG_ENV_VAR: "b.toml"}) == Path("b.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path):
    path = tmp_path / "atm.toml"
    path.write_text('[camera.replay]\npath = "frames"\n[camera]\nbackend = "replay"\n')
    settings = load_settings(path)
    assert relative_to_config(settings, settings.camera.replay.path) == tmp_path / "frames"
    assert relative_to_config(settings, "/abs") == Path("/abs")


def test_tracker_geometry_is_checked_and_reaches_the_tracker():
    from atmguard.vision.tracker import FaceTracker

    issues = _errors(
        {"vision": {"tracker_window_frames": 5, "tracker_uncover_frames": 5, "tracker_cover_frames": 6}}
    )
    assert (
        "test.toml: vision.tracker_uncover_frames: must be less than vision.tracker_window_frames" in issues
    )
    assert "test.toml: vision.tracker_cover_frames: must not exceed vision.tracker_window_frames" in issues
    settings = settings_from_mapping({"vision": {"tracker_window_frames": 12, "covered_threshold": 0.4}})
    tracker = FaceTracker.from_settings(settings)
    assert (tracker.window_frames, tracker.covered_threshold) == (12, 0.4)


def test_verification_defaults_are_the_model_cards_thresholds() -> None:
    # config.py cannot import the embedder (numpy at import); the two must still agree.
    from atmguard.config import VerificationSettings
    from atmguard.vision.embedder import DEFAULT_MATCH_THRESHOLD, DEFAULT_MISMATCH_THRESHOLD

    defaults = VerificationSettings()
    assert (defaults.match_threshold, defaults.mismatch_threshold) == (
        DEFAULT_MATCH_THRESHOLD,
        DEFAULT_MISMATCH_THRESHOLD,
    )
    with pytest.raises(ValueError, match="mismatch_threshold must be below match_threshold"):
        VerificationSettings(match_threshold=0.1, mismatch_threshold=0.2)
