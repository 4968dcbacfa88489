"""`atmguard model eval-identity DIR --json` (the acceptance interface) on a small real subset of
faces-identity, and the metrics, person split and calibration behind it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from atmguard.cli.common import EX_NOINPUT
from atmguard.config import CONFIG_ENV_VAR
from atmguard.datasets import shared_datasets_dir
from atmguard.vision import identity_eval as ie
from atmguard.vision.embedder import DEFAULT_MATCH_THRESHOLD, DEFAULT_MISMATCH_THRESHOLD

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
needs_identity = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")
REQUIRED = {
    "persons",
    "images",
    "no_face",
    "genuine_pairs",
    "impostor_pairs",
    "eer",
    "tar_at_far_1e-2",
    "tar_at_far_1e-3",
    "match_threshold",
    "mismatch_threshold",
    "tar_at_match_threshold",
    "far_at_match_threshold",
    "genuine_rejected_as_mismatch",
    "ms_per_embedding_p50",
    "template_genuine_pairs",
    "template_impostor_pairs",
    "template_eer",
    "template_tar_at_match_threshold",
    "template_far_at_match_threshold",
    "template_genuine_rejected_as_mismatch",
}
SUBSET = (
    "orl_s01",
    "orl_s03",
    "orl_s05",
    "yale_subject02",
    "yale_subject03",
    "rmfd_liudehua",
    "rmfd_chenglong",
)


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        from atmguard.cli.main import build_parser

        parser: argparse.ArgumentParser = build_parser()
        args = parser.parse_args(list(argv))
        code = args.handler(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def subset_dir(tmp_path: Path) -> Path:
    """Seven persons of three sources, linked (not copied) from the shared dataset."""
    root = tmp_path / "identity"
    root.mkdir()
    for person in SUBSET:
        (root / person).symlink_to(IDENTITY_DIR / person, target_is_directory=True)
    return root


@needs_identity
def test_eval_identity_json_has_every_field_with_sane_values(cli, subset_dir):
    code, out, _ = cli(
        "model", "eval-identity", str(subset_dir), "--json", "--limit", "6", "--models-dir", str(MODELS_DIR)
    )
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    assert result.keys() >= REQUIRED
    expected_images = sum(min(6, len(list((IDENTITY_DIR / p).glob("*.jpg")))) for p in SUBSET)
    assert result["persons"] == len(SUBSET) and result["images"] == expected_images
    assert result["match_threshold"] == DEFAULT_MATCH_THRESHOLD
    assert result["mismatch_threshold"] == DEFAULT_MISMATCH_THRESHOLD
    accepted = result["accepted"]
    assert accepted + result["no_face"] + sum(result["rejected_quality"].values()) == result["images"]
    assert result["genuine_pairs"] + result["impostor_pairs"] == accepted * (accepted - 1) // 2
    assert 0.0 <= result["eer"] < 0.2
    assert result["tar_at_far_1e-2"] > 0.8  # 7 persons of which 5 are lab captures: easy
    assert result["far_at_match_threshold"] < 0.01
    assert result["genuine_rejected_as_mismatch"] == 0.0
    assert 0.0 < result["ms_per_embedding_p50"] < 1000.0
    assert set(result["per_source"]) == {"orl", "yale", "rmfd"}
    assert result["per_source"]["orl"]["eer"] == 0.0
    assert result["template_genuine_pairs"] > 0 and result["template_impostor_pairs"] > 0


@needs_identity
def test_eval_identity_table_names_sources_and_left_out_images(cli, subset_dir):
    code, out, _ = cli(
        "model", "eval-identity", str(subset_dir), "--limit", "3", "--models-dir", str(MODELS_DIR)
    )
    assert code == 0
    assert "rmfd template" in out and "TAR@1e-3" in out and "match >=" in out


def test_eval_identity_on_a_missing_folder_fails_before_loading_models(cli, tmp_path):
    code, _, err = cli("model", "eval-identity", str(tmp_path / "nope"), "--json")
    assert code == EX_NOINPUT and "not a directory" in err


def test_person_split_is_fixed_disjoint_and_halves_each_source():
    persons = [f"orl_s{i:02d}" for i in range(10)] + [f"rmfd_p{i}" for i in range(7)] + ["solo"]
    split = ie.split_persons(persons, seed=5)
    assert split == ie.split_persons(list(reversed(persons)), seed=5)
    assert split != ie.split_persons(persons, seed=6)
    assert sum(side == "calibration" for p, side in split.items() if p.startswith("orl")) == 5
    assert sum(side == "calibration" for p, side in split.items() if p.startswith("rmfd")) == 4


def test_error_rates_on_known_scores():
    genuine = np.linspace(0.0, 1.0, 1001)  # overlapping uniform distributions: EER 25% at 0.25
    impostor = np.linspace(-0.5, 0.5, 1001)
    assert ie.eer(genuine, impostor) == pytest.approx(0.25, abs=0.002)
    # FAR 1%: above the impostors' 99% point (0.49), 51% of the genuine scores.
    assert ie.tar_at_far(genuine, impostor, 1e-2) == pytest.approx(0.51, abs=0.002)
    assert ie.tar_at_far(genuine, impostor[:50], 1e-3) is None  # too few impostors to say


def _synthetic(persons: int, images: int, spread: float, seed: int) -> ie.Embedded:
    rng = np.random.default_rng(seed)
    records = []
    for p in range(persons):
        centre = rng.normal(size=128)
        centre /= np.linalg.norm(centre)
        for i in range(images):
            v = centre + rng.normal(scale=spread, size=128)
            records.append(
                ie.ImageRecord(
                    f"src_p{p:02d}",
                    Path(f"/x/src_p{p:02d}/{i}.jpg"),
                    "ok",
                    embedding=v / np.linalg.norm(v),
                    embed_ms=1.0,
                )
            )
    return ie.Embedded(Path("/x"), records, {"split": "all"})


def test_calibration_orders_the_thresholds_and_reports_unseen_persons():
    data = _synthetic(persons=24, images=6, spread=0.12, seed=3)
    result = ie.calibrate(data, seed=11, rounds=40)
    assert not set(result["calibration_persons"]) & set(result["validation_persons"])
    assert result["mismatch_threshold"] < result["match_threshold"]
    validation = result["validation"]
    assert validation["split"] == "validation" and validation["persons"] == len(result["validation_persons"])
    assert validation["genuine_rejected_as_mismatch"] == 0.0
    assert validation["far_at_match_threshold"] <= 0.01
