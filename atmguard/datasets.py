"""Where the shared face datasets live on a developer or CI machine (never on an ATM).

They sit next to the repository (``../shared/datasets``) and are read in place: their licences do
not allow copying them into the repository. ``$ATMGUARD_DATASETS`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_datasets_dir() -> Path:
    """The datasets directory: ``$ATMGUARD_DATASETS``, else ``<repo>/../shared/datasets``."""
    override = os.environ.get("ATMGUARD_DATASETS")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "datasets"


SCENE_FOLDERS = {"uncovered": "faces-identity/orl_s03", "covered": "faces-covered/covered"}
"""Where the simulated camera's face scenes come from (demo and sim rig). The harness tests session
rules, not the classifier, so the uncovered person is one the classifier is sure of (covered
probability <= 0.03 on the three photos used; orl_s01's third photo scores 0.41, above the 0.3
threshold, and made the tracker prompt an uncovered customer now and then)."""
SCENE_IMAGES = 3


def scene_images(scene: str, datasets: Path | None = None) -> list[Path]:
    """The first few photos of a camera scene ("uncovered" or "covered"), read in place; [] if absent."""
    folder = (datasets or shared_datasets_dir()) / SCENE_FOLDERS[scene]
    return sorted(folder.glob("*.jpg"))[:SCENE_IMAGES]
