"""`atmguard model eval DIR` and `atmguard bench`: the acceptance interfaces, on real images and the
real models; the eval's framing and decision rules; and that the commands stay light to import."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atmguard.config import CONFIG_ENV_VAR
from atmguard.datasets import shared_datasets_dir
from atmguard.vision.evaluate import ImageResult, camera_frame
from atmguard.vision.models import load_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
COVERED_DIR = shared_datasets_dir() / "faces-covered"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
EVAL_KEYS = {
    "images",
    "covered_n",
    "covered_denied",
    "uncovered_n",
    "uncovered_allowed",
    "no_face_covered",
    "no_face_uncovered",
    "balanced_accuracy",
    "face_balanced_accuracy",
    "ms_per_image_p50",
}
BENCH_KEYS = {
    "frame_ms_p50",
    "frame_ms_p95",
    "detector_ms_p50",
    "covering_ms_p50",
    "runtime",
    "threads",
    "covering_model_bytes",
    "detector_model_bytes",
}

needs_datasets = pytest.mark.skipif(not COVERED_DIR.is_dir(), reason=f"{COVERED_DIR} not available")


def _parser() -> argparse.ArgumentParser:
    from atmguard.cli.main import build_parser

    return build_parser()


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        args = _parser().parse_args(list(argv))
        code = args.handler(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Six real images per class (copied), one corrupt JPEG, one text file and one hidden file."""
    root = tmp_path / "eval"
    for label in ("covered", "uncovered"):
        (root / label).mkdir(parents=True)
        for path in sorted((COVERED_DIR / label).glob("*.jpg"))[:6]:
            shutil.copy(path, root / label / path.name)
    (root / "covered" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "uncovered" / "notes.txt").write_text("labelled by hand\n")
    (root / "uncovered" / ".DS_Store").write_bytes(b"\0\0")
    return root


# --- model eval ------------------------------------------------------------------------------------


@needs_datasets
def test_eval_json_counts_every_image_and_lists_unreadable_files(cli, small_dataset, tmp_path):
    details = tmp_path / "details.csv"
    code, out, _ = cli(
        "model",
        "eval",
        str(small_dataset),
        "--json",
        "--models-dir",
        str(MODELS_DIR),
        "--details",
        str(details),
    )
    assert code == 0
    result = json.loads(out)  # stdout is exactly one JSON object: no progress counter mixed in
    assert result.keys() >= EVAL_KEYS
    assert (result["images"], result["covered_n"], result["uncovered_n"]) == (12, 6, 6)
    assert result["unreadable_n"] == 2
    assert sorted(e.split(":")[0] for e in result["unreadable"]) == [
        "covered/broken.jpg",
        "uncovered/notes.txt",
    ]
    # decision rules: an image without a judged face is denied when covered, never allowed when uncovered
    assert result["no_face_covered"] <= result["covered_denied"] <= 6
    assert result["uncovered_allowed"] <= 6 - result["no_face_uncovered"]
    expected = (result["covered_denied"] / 6 + result["uncovered_allowed"] / 6) / 2
    assert result["balanced_accuracy"] == pytest.approx(expected, abs=1e-4)
    assert result["ms_per_image_p50"] > 0
    with details.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["label"] for r in rows} == {"covered", "uncovered"}


@needs_datasets
def test_eval_table_is_readable(cli, small_dataset):
    code, out, _ = cli("model", "eval", str(small_dataset), "--models-dir", str(MODELS_DIR))
    assert code == 0
    assert "decision balanced accuracy" in out and "classifier balanced accuracy" in out
    assert "covered/broken.jpg" in out and "unreadable files              2" in out


# The first 150 images (in name order, i.e. an arbitrary fixed sample) of each class of faces-covered,
# training images included. Shipped model: balanced accuracy 0.977, classifier alone 0.990; on the
# classifier's validation split alone (1535 images) 0.986 / 0.989.
@needs_datasets
def test_eval_on_the_shared_dataset_sample(cli):
    code, out, _ = cli(
        "model", "eval", str(COVERED_DIR), "--json", "--limit", "150", "--models-dir", str(MODELS_DIR)
    )
    assert code == 0
    result = json.loads(out)
    print(f"\n{json.dumps({k: result[k] for k in sorted(EVAL_KEYS)})}")
    assert result["images"] == 300 and result["unreadable_n"] == 0
    assert result["balanced_accuracy"] >= 0.85
    assert result["face_balanced_accuracy"] >= 0.85
    assert result["no_face_uncovered"] <= 10  # uncovered faces are found (masked ones less so)


@needs_datasets
def test_eval_threshold_changes_the_decision(cli, small_dataset):
    strict = json.loads(
        cli(
            "model",
            "eval",
            str(small_dataset),
            "--json",
            "--threshold",
            "0.01",
            "--models-dir",
            str(MODELS_DIR),
        )[1]
    )
    lax = json.loads(
        cli(
            "model",
            "eval",
            str(small_dataset),
            "--json",
            "--threshold",
            "0.99",
            "--models-dir",
            str(MODELS_DIR),
        )[1]
    )
    # near 0 almost every judged face counts as covered; near 1 almost none does
    assert strict["uncovered_allowed"] <= lax["uncovered_allowed"]
    assert strict["covered_denied"] >= lax["covered_denied"]
    assert (strict["covered_denied"], strict["uncovered_allowed"]) != (
        lax["covered_denied"],
        lax["uncovered_allowed"],
    )
    assert strict["threshold"] == 0.01 and lax["threshold"] == 0.99


def test_eval_rejects_a_folder_without_the_class_folders(cli, tmp_path):
    (tmp_path / "covered").mkdir()
    code, out, err = cli("model", "eval", str(tmp_path), "--json")
    assert code == 66 and out == ""
    assert "uncovered/" in err and "Traceback" not in err
    code, _, err = cli("model", "eval", str(tmp_path / "nope"))
    assert code == 66 and "not a directory" in err


@needs_datasets
def test_eval_without_the_covering_model_fails_with_a_clear_message(cli, small_dataset, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "third_party", models / "third_party")
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    manifest["models"] = [m for m in manifest["models"] if m["role"] == "face_detector"]
    (models / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli("model", "eval", str(small_dataset), "--json", "--models-dir", str(models))
    assert code == 69 and out == ""
    assert "covering_classifier" in err


def test_model_without_subcommand_prints_usage(cli):
    code, out, _ = cli("model")
    assert code == 64 and "eval" in out


# --- eval framing and decision rules ---------------------------------------------------------------


def test_camera_frame_adds_a_replicated_margin_and_only_ever_shrinks():
    crop = np.zeros((100, 80, 3), np.uint8)
    crop[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :]  # a horizontal ramp
    frame = camera_frame(crop)
    assert frame.shape == (150, 120, 3)
    assert np.array_equal(frame[25:125, 20:100], crop)
    assert (frame[:, :20, 0] == 0).all() and (frame[:, 100:, 0] == 79).all()  # border pixels repeated
    big = camera_frame(np.zeros((600, 900, 3), np.uint8))
    assert big.shape[1] == 640 and big.shape[0] <= 480
    tiny = camera_frame(np.zeros((40, 40, 3), np.uint8))
    assert tiny.shape == (60, 60, 3)  # never enlarged


@pytest.mark.parametrize(
    ("label", "probability", "correct"),
    [
        ("covered", None, True),  # no face to judge: denied
        ("covered", 0.5, True),
        ("covered", 0.49, False),
        ("covered", math.nan, True),  # fail closed
        ("uncovered", None, False),  # no face: not allowed
        ("uncovered", 0.49, True),
        ("uncovered", 0.5, False),
    ],
)
def test_decision_rules(label, probability, correct):
    result = ImageResult(
        path=Path("x.jpg"),
        label=label,
        face_count=1,
        small_face=False,
        covered_probability=probability,
        ms=1.0,
    )
    assert result.correct(0.5) is correct


# --- bench -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")
def test_bench_json_reports_the_per_frame_cost(cli):
    from atmguard.vision.runtime import runtime_info

    code, out, _ = cli("bench", "--json", "--runs", "30", "--warmup", "3", "--models-dir", str(MODELS_DIR))
    assert code == 0
    result = json.loads(out)
    assert result.keys() >= BENCH_KEYS
    assert result["threads"] == 1 and result["runs"] == 30 and result["frame_size"] == [640, 480]
    assert result["runtime"] == runtime_info().name
    specs = load_manifest(MODELS_DIR)
    assert result["detector_model_bytes"] == specs["face_detector"].path.stat().st_size
    assert result["covering_model_bytes"] == specs["covering_classifier"].path.stat().st_size
    assert 0 < result["detector_ms_p50"] < result["frame_ms_p50"] <= result["frame_ms_p95"]
    assert 0 < result["covering_ms_p50"] < result["frame_ms_p50"]
    assert Path(result["face_image"]).is_relative_to(IDENTITY_DIR)


@pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")
def test_bench_table(cli):
    code, out, _ = cli("bench", "--runs", "5", "--warmup", "0", "--models-dir", str(MODELS_DIR))
    assert code == 0
    assert "detector" in out and "covering" in out and "target frame p50 <= 4 ms" in out


def test_bench_without_face_photos_fails_with_a_clear_message(cli, tmp_path):
    code, out, err = cli(
        "bench", "--json", "--faces", str(tmp_path / "none"), "--models-dir", str(MODELS_DIR)
    )
    assert code == 66 and out == ""
    assert "face photo folder not found" in err


@pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")
def test_without_a_config_file_the_checkout_models_are_used(cli, monkeypatch, tmp_path):
    import atmguard.config

    monkeypatch.setattr(atmguard.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    code, out, err = cli("bench", "--json", "--runs", "3", "--warmup", "0")
    assert code == 0, err
    assert f"models: {MODELS_DIR}" in err
    assert json.loads(out)["covering_model_bytes"] > 0


def test_an_invalid_config_exits_78_with_the_key_path(cli, tmp_path, small_dataset):
    bad = tmp_path / "atm.toml"
    bad.write_text("[vision]\nnum_threads = 9\n")
    code, out, err = cli("--config", str(bad), "model", "eval", str(small_dataset), "--json")
    assert code == 78 and out == ""
    assert "vision.num_threads" in err


# --- import hygiene ----------------------------------------------------------------------------------


def test_registering_the_commands_imports_nothing_heavy():
    probe = (
        "import argparse, contextlib, io, sys\n"
        "from atmguard.cli import bench_cmd, model_cmd\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
        "model_cmd.register(s); bench_cmd.register(s)\n"
        "for argv in (['model', 'eval', '--help'], ['bench', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            p.parse_args(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(json.loads(out.stdout.strip().replace("'", '"')))
    assert modules.isdisjoint({"numpy", "PIL", "ai_edge_litert", "tflite_runtime", "pydantic"})


# --- model detect ----------------------------------------------------------------------------------


@needs_datasets
def test_detect_draws_each_face_with_its_verdict_and_reports_unreadable_images(cli, tmp_path):
    from PIL import Image

    covered = sorted((COVERED_DIR / "covered").glob("*.jpg"))[0]
    uncovered = sorted((COVERED_DIR.parent / "faces-identity" / "orl_s01").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "pictures"
    code, stdout, stderr = cli(
        "model", "detect", str(covered), str(uncovered), str(broken), "--out", str(out)
    )
    assert code == 1  # one image could not be read
    assert f"{broken}: unreadable" in stderr
    lines = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith("/"))
    assert lines[str(covered)].startswith("1 face(s)") and " C]" in lines[str(covered)]
    assert lines[str(uncovered)].startswith("1 face(s)") and " U]" in lines[str(uncovered)]
    picture = Image.open(out / f"{covered.stem}.png")
    assert picture.size[0] > Image.open(covered).size[0]  # drawn on the padded camera frame
