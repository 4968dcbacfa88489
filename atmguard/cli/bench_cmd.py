"""`atmguard bench`: per-frame cost of face detection + covering classification on 640x480 frames.

The frame is synthesised from a real face photo (read in place from the shared identity
dataset, never copied into the repository) pasted on a plain, slightly noisy background, because
the detector's decoding and the classifier only run when there is a face: an empty frame would
time a cheaper path than a customer's. Nothing heavy is imported until the handler runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmguard.cli.common import EX_NOINPUT, EX_OK, EX_UNAVAILABLE, CommandFailed
from atmguard.cli.model_cmd import add_models_dir_option, positive_int, vision_settings
from atmguard.datasets import shared_datasets_dir

if TYPE_CHECKING:
    import numpy as np

    from atmguard.vision.pipeline import VisionPipeline

DEFAULT_FACES_DIR = shared_datasets_dir() / "faces-identity"
FRAME_SIZE = (640, 480)
TARGET_FRAME_MS_P50 = 4.0
"""Detector + classifier, one thread, ai-edge-litert (issue 3)."""
TARGET_EMBEDDING_MS_P50 = 20.0
"""Face embedding of one aligned face, one thread (issue 7)."""
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")
_MAX_CANDIDATES = 50


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the top-level sub-commands."""
    bench = commands.add_parser(
        "bench",
        help="time face detection + covering classification per 640x480 frame",
        description=(
            "Times RUNS passes of the vision pipeline (detector + covering classifier) over one "
            "640x480 frame holding a real face, after a warm-up, and prints the percentiles, the "
            f"runtime and the model sizes, then times the face embedding (alignment + embedder) of that "
            f"frame's face. Targets on one thread: frame p50 <= {TARGET_FRAME_MS_P50:g} ms, embedding p50 <= "
            f"{TARGET_EMBEDDING_MS_P50:g} ms."
        ),
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    bench.add_argument("--runs", type=positive_int, default=300, help="timed frames (default 300)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed frames first (default 20)")
    bench.add_argument(
        "--threads", type=positive_int, default=1, help="interpreter threads per model (default 1)"
    )
    bench.add_argument(
        "--faces",
        metavar="DIR",
        default=str(DEFAULT_FACES_DIR),
        help=f"face photos; the first one the detector finds is used (default {DEFAULT_FACES_DIR})",
    )
    bench.add_argument(
        "--system",
        action="store_true",
        help="also measure the hardware layer (keypad scan, card reader round trip) and the journal append",
    )
    bench.add_argument(
        "--daemon",
        action="store_true",
        help="also run `atmguard run` on simulated hardware and a throwaway MariaDB: idle CPU and RSS, "
        "decision latency over 20 sessions",
    )
    add_models_dir_option(bench)
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        result = _run_bench(args)
    except CommandFailed as exc:
        print(f"atmguard bench: {exc}", file=sys.stderr)
        return exc.exit_code
    system = _run_system_bench() if args.system else {}
    if args.daemon:
        from atmguard.harness.bench_daemon import measure_daemon

        system.update({f"daemon_{k}": v for k, v in measure_daemon().items()})
    if args.json:
        print(json.dumps({**result, **system}))
    else:
        print(format_table(result))
        for key, value in system.items():
            print(f"  {key:<40} {round(value, 3) if isinstance(value, float) else value}")
    return EX_OK


def _run_system_bench() -> dict[str, Any]:
    """Hardware layer on its simulators and the durable journal append, with default settings."""
    import tempfile

    from atmguard.config import settings_from_mapping
    from atmguard.hardware.bench import measure_hardware
    from atmguard.store.journal import measure_journal

    with tempfile.TemporaryDirectory(prefix="atmguard-bench-") as tmp:
        journal = measure_journal(Path(tmp))
    return {
        **measure_hardware(settings_from_mapping({}, source="<defaults>")),
        **{f"journal_{k}": v for k, v in journal.items()},
    }


def synthesize_frame(
    face_rgb: np.ndarray, *, size: tuple[int, int] = FRAME_SIZE, seed: int = 0
) -> np.ndarray:
    """A ``size`` (width, height) frame: the photo, with a border margin, centred on a noisy grey wall.

    The photo is scaled to half the frame height, about the size of a customer at the keypad.
    """
    import numpy as np

    from atmguard.vision.evaluate import camera_frame
    from atmguard.vision.imageops import resize_rgb

    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(90, 150, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0.0, 4.0, (height, width, 3)).astype(np.float32)
    frame = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    padded = camera_frame(face_rgb, pad_fraction=0.25, max_size=(10_000, 10_000))
    scale = (height / 2) / padded.shape[0]
    w, h = min(width, round(padded.shape[1] * scale)), min(height, round(padded.shape[0] * scale))
    x, y = (width - w) // 2, (height - h) // 2
    frame[y : y + h, x : x + w] = resize_rgb(padded, w, h)
    return frame


def _face_photos(faces_dir: Path) -> list[Path]:
    if not faces_dir.is_dir():
        raise CommandFailed(
            EX_NOINPUT,
            f"{faces_dir}: face photo folder not found (the bench needs a real face; use --faces DIR)",
        )
    photos = sorted(p for p in faces_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not photos:
        raise CommandFailed(EX_NOINPUT, f"{faces_dir}: no face photos ({', '.join(_IMAGE_SUFFIXES)}) in it")
    return photos


def _bench_frame(pipeline: VisionPipeline, photos: list[Path]) -> tuple[np.ndarray, Path]:
    from atmguard.vision.imageops import load_rgb

    for path in photos[:_MAX_CANDIDATES]:
        try:
            frame = synthesize_frame(load_rgb(path))
        except Exception:  # an unreadable photo: try the next one
            continue
        observation = pipeline.process(frame)
        if observation.face_count == 1 and observation.primary is not None:
            return frame, path
    raise CommandFailed(
        EX_NOINPUT,
        f"no usable face photo among the first {_MAX_CANDIDATES} of --faces (need exactly one face each)",
    )


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)), 3)


def _run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from atmguard.vision.align import align_face
    from atmguard.vision.embedder import FaceEmbedder
    from atmguard.vision.models import models_dir_from_settings, resolve_model
    from atmguard.vision.pipeline import VisionPipeline
    from atmguard.vision.runtime import ModelError, runtime_info

    photos = _face_photos(Path(args.faces))  # checked before the models are loaded
    settings = vision_settings(args)
    try:
        models_dir = models_dir_from_settings(settings)
        sizes = {
            f"{key}_model_bytes": resolve_model(models_dir, role, verify=False).path.stat().st_size
            for key, role in (
                ("detector", "face_detector"),
                ("covering", "covering_classifier"),
                ("embedder", "face_embedder"),
            )
        }
        with VisionPipeline.from_settings(settings, num_threads=args.threads) as pipeline:
            info = runtime_info()
            frame, face_path = _bench_frame(pipeline, photos)
            for _ in range(max(0, args.warmup)):
                pipeline.process(frame)
            frame_ms, detector_ms, covering_ms = [], [], []
            for _ in range(args.runs):
                observation = pipeline.process(frame)
                frame_ms.append(observation.total_ms)
                detector_ms.append(observation.detector_ms)
                covering_ms.append(observation.covering_ms)
            face = pipeline.process(frame).faces[0].face
        # Embedding runs once per customer check, not per frame: timed on its own, on the same face.
        embed_ms, align_ms = [], []
        with FaceEmbedder.from_settings(settings, num_threads=args.threads) as embedder:
            for run in range(max(0, args.warmup) + args.runs):
                t0 = time.perf_counter()
                aligned = align_face(frame, face)
                t1 = time.perf_counter()
                embedder.embed(aligned)
                if run >= args.warmup:
                    align_ms.append((t1 - t0) * 1e3)
                    embed_ms.append(embedder.last_ms)
    except (ModelError, FileNotFoundError) as exc:
        raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    p50 = _percentile(frame_ms, 50)
    embed_p50 = _percentile(embed_ms, 50)
    return {
        "frame_ms_p50": p50,
        "frame_ms_p95": _percentile(frame_ms, 95),
        "detector_ms_p50": _percentile(detector_ms, 50),
        "detector_ms_p95": _percentile(detector_ms, 95),
        "covering_ms_p50": _percentile(covering_ms, 50),
        "covering_ms_p95": _percentile(covering_ms, 95),
        "runtime": info.name,
        "runtime_version": info.version,
        "threads": args.threads,
        "runs": args.runs,
        "frame_size": list(FRAME_SIZE),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other work on the CPU inflates the figures
        "face_image": str(face_path),
        **sizes,
        "target_frame_ms_p50": TARGET_FRAME_MS_P50,
        "meets_target": p50 <= TARGET_FRAME_MS_P50,
        "embedding_ms_p50": embed_p50,
        "embedding_ms_p95": _percentile(embed_ms, 95),
        "alignment_ms_p50": _percentile(align_ms, 50),
        "target_embedding_ms_p50": TARGET_EMBEDDING_MS_P50,
        "meets_embedding_target": embed_p50 <= TARGET_EMBEDDING_MS_P50,
    }


def format_table(result: dict[str, Any]) -> str:
    """The human-readable form of a bench result."""
    width, height = result["frame_size"]
    lines = [
        f"bench: {result['runs']} frames of {width}x{height}, {result['runtime']} {result['runtime_version']}, "
        f"{result['threads']} thread(s)",
        f"  face photo: {result['face_image']}",
        "",
        f"  {'stage':<26} {'p50 ms':>8} {'p95 ms':>8}",
    ]
    for label, key in (
        ("frame (detector+covering)", "frame"),
        ("detector", "detector"),
        ("covering", "covering"),
        ("face embedding", "embedding"),
    ):
        lines.append(f"  {label:<26} {result[key + '_ms_p50']:>8.3f} {result[key + '_ms_p95']:>8.3f}")
    verdict = "met" if result["meets_target"] else "NOT met"
    embed_verdict = "met" if result["meets_embedding_target"] else "NOT met"
    lines += [
        f"  {'face alignment':<26} {result['alignment_ms_p50']:>8.3f}",
        "",
        f"  models: detector {result['detector_model_bytes']:,} bytes, covering {result['covering_model_bytes']:,} "
        f"bytes, embedder {result['embedder_model_bytes']:,} bytes",
        f"  target frame p50 <= {result['target_frame_ms_p50']:g} ms: {verdict} "
        f"(load average {result['load_avg_1min']:.2f} during the run)",
        f"  target embedding p50 <= {result['target_embedding_ms_p50']:g} ms: {embed_verdict}",
    ]
    return "\n".join(lines)
