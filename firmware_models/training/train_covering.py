#!/usr/bin/env python3
"""Train, quantise, verify and ship the covered-face classifier (``make train-covering``).

Steps (all seeded; see README.md in this folder):
1. ``covering_data.prepare``: detector crops of faces-covered, duplicate clusters, source-grouped split.
2. Validation sets: real validation crops exactly as the daemon cuts them (``face_crop``), synthetic
   coverings and distractors on validation faces only, and ORL/Yale faces (sources never trained on).
3. Training rounds: every round re-draws synthetic coverings/distractors and augmentation for every
   training face (2 worker processes, before TensorFlow is imported); one epoch per round.
4. A small depthwise-separable CNN trained from scratch on raw uint8 pixels.
5. Full-integer int8 conversion (uint8 input, scale 1 / zero point 0), checked against Keras, and
   every figure recomputed with the shipped .tflite through ``CoveringClassifier``.
6. Writes the model, its ``manifest.json`` entry and ``MODEL_CARD_covering.md``; metrics go to out/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import covering_data as cd  # noqa: E402
import synth  # noqa: E402

from atmguard.vision.covering import (  # noqa: E402
    CROP_SIZE,
    ROLE,
    CoveringClassifier,
    face_crop,
)
from atmguard.vision.detector import FaceDetector  # noqa: E402
from atmguard.vision.imageops import load_rgb  # noqa: E402

logger = logging.getLogger("train_covering")

MODELS_DIR = cd.REPO_ROOT / "firmware_models"
MODEL_FILE = "covering_classifier.tflite"
CARD_FILE = "MODEL_CARD_covering.md"
IDENTITY_DIR = cd.REPO_ROOT.parent / "shared" / "datasets" / "faces-identity"
SEED = 1124

COVER_WEIGHTS = {
    "mask": 0.16,
    "scarf": 0.18,
    "balaclava": 0.12,
    "hand": 0.2,
    "visor": 0.1,
    "hood_scarf": 0.12,
    "object": 0.12,
}
DISTRACTOR_WEIGHTS = {
    "sunglasses": 0.2,
    "glasses": 0.2,
    "hand_chin": 0.18,
    "beard": 0.1,
    "neck_scarf": 0.12,
    "hood": 0.08,
    "helmet": 0.06,
    "cap": 0.06,
    "mustache": 0.12,
}
P_COVER_UNCOVERED = 0.45
"""Share of real uncovered faces that get a synthetic covering (label 1): this is what breaks the
"CelebA-looking crop means uncovered" shortcut, and it teaches the non-mask coverings."""
P_DISTRACT_UNCOVERED = 0.3
P_DISTRACT_COVERED = 0.2
P_SECOND_DISTRACTOR = 0.3
"""Share of distracted uncovered faces that get a second, different distractor (glasses and a
moustache, a cap and a hand under the chin): real faces combine them."""
PRIOR_NEUTRAL_THRESHOLD = 0.5
"""Training is class-balanced, so P(covered) = 0.5 is the decision point before any tuning."""
LABEL_SMOOTHING = 0.05
"""Soft targets: the real labels are noisy (half-worn masks, hands near the mouth) and hard targets
pushed the first model to over-confident flips on unseen sources."""
WARMUP_EPOCHS = 1
PEAK_LR = 2e-3
P_FRAME_CUT = 0.25
SOURCE_REPEAT = {"fmd_uncovered_rmfd": 2, "k12_covered": 3}
"""Crops seen more than once per round (freshly augmented each time): the 601 RMFD crops are the
only uncovered faces not from CelebA, and the 353 k12 masks are the smallest real covered source
and the one with the most validation misses in runs v1 and v2."""

# --- worker-side generation (module globals are inherited by the forked workers) --------------------

_CTX: np.ndarray | None = None
_KPS: np.ndarray | None = None
_PHOTO_POOL: np.ndarray | None = None


def _weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def make_sample(index: int, label: int, rng: np.random.Generator) -> tuple[np.ndarray, int, str]:
    """One augmented 96x96 training crop of context ``index``; returns (crop, label, kind)."""
    assert _CTX is not None and _KPS is not None and _PHOTO_POOL is not None
    context, pts = _CTX[index], _KPS[index]
    kind = "plain"
    draw = rng.random()
    if label == 0 and draw < P_COVER_UNCOVERED:
        kind, label = _weighted(rng, COVER_WEIGHTS), 1
    elif label == 0 and draw < P_COVER_UNCOVERED + P_DISTRACT_UNCOVERED:
        kind = _weighted(rng, DISTRACTOR_WEIGHTS)
    elif label == 1 and draw < P_DISTRACT_COVERED:
        kind = str(rng.choice(["sunglasses", "glasses", "hood", "cap", "helmet"]))
    if kind != "plain":
        photo = _PHOTO_POOL[rng.integers(len(_PHOTO_POOL))]
        context = synth.apply_covering(kind, context, pts, rng, photo=photo)
        if label == 0 and kind in DISTRACTOR_WEIGHTS and rng.random() < P_SECOND_DISTRACTOR:
            second = _weighted(rng, {k: w for k, w in DISTRACTOR_WEIGHTS.items() if k != kind})
            context = synth.apply_covering(second, context, pts, rng, photo=photo)
    if rng.random() < P_FRAME_CUT:
        context = synth.random_frame_cut(context, pts, rng)
    crop = synth.jittered_crop(context, rng)
    return synth.photometric(crop, rng), label, kind


def _generate_chunk(args: tuple[list[tuple[int, int]], int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    items, seed = args
    rng = np.random.default_rng(seed)
    crops = np.empty((len(items), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    labels = np.empty(len(items), np.float32)
    kinds = []
    for k, (index, label) in enumerate(items):
        crops[k], labels[k], kind = make_sample(index, label, rng)
        kinds.append(kind)
    return crops, labels, kinds


def generate_rounds(
    items: list[tuple[int, int]], rounds: int, *, seed: int, workers: int = 2
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rounds`` freshly augmented, shuffled copies of the training items."""
    jobs = []
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        order = rng.permutation(len(items))
        shuffled = [items[i] for i in order]
        for start in range(0, len(shuffled), 1000):
            jobs.append((r, (shuffled[start : start + 1000], seed * 1000 + len(jobs))))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        results = pool.map(_generate_chunk, [job for _, job in jobs], chunksize=1)
    out = []
    for r in range(rounds):
        parts = [res for (rr, _), res in zip(jobs, results, strict=True) if rr == r]
        out.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return out


# --- validation sets ----------------------------------------------------------------------------


def real_crops(records: list[cd.Record], dataset: Path) -> np.ndarray:
    """Validation crops exactly as the daemon cuts them: face_crop on the original image."""
    return np.stack([face_crop(load_rgb(dataset / r.file), cd.face_of(r)) for r in records])


def synthetic_set(
    indices: list[int], kinds: tuple[str, ...], ctx: np.ndarray, kps: np.ndarray, *, seed: int
) -> dict[str, np.ndarray]:
    """Each kind drawn once on every given face (canonical crop, no augmentation)."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in kinds:
        crops = []
        for i in indices:
            photo = ctx[indices[int(rng.integers(len(indices)))]]
            crops.append(synth.canonical_crop(synth.apply_covering(kind, ctx[i], kps[i], rng, photo=photo)))
        out[kind] = np.stack(crops)
    return out


def identity_set(model_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """ORL and Yale faces (never trained on) as the daemon would crop them: plain crops by source,
    and 192 px contexts + points for synthetic coverings."""
    crops: dict[str, list[np.ndarray]] = defaultdict(list)
    contexts, points = [], []
    with FaceDetector(model_path) as detector:
        for path in sorted(IDENTITY_DIR.glob("*/*.jpg")):
            source = path.parent.name.split("_", 1)[0]
            if source not in ("orl", "yale"):
                continue  # the RMFD persons are the same pictures as faces-covered/uncovered
            rgb = load_rgb(path)
            padded, _dx, _dy = cd._pad_edge(rgb, 0.25)
            faces = detector.detect(padded)
            if not faces:
                continue
            crops[source].append(face_crop(padded, faces[0]))
            context, pts = cd.context_of(padded, faces[0])
            contexts.append(context)
            points.append(pts)
    return {k: np.stack(v) for k, v in crops.items()}, np.stack(contexts), np.stack(points)


# --- model --------------------------------------------------------------------------------------


def build_model(tf: Any) -> Any:
    """~200k-parameter MobileNet-v1-style CNN on raw 0..255 pixels (BatchNorm absorbs the scale).

    Only CONV_2D, DEPTHWISE_CONV_2D, RELU, MEAN, FULLY_CONNECTED and LOGISTIC after conversion: ops
    every TFLite runtime we ship (incl. tflite-runtime 2.14) runs in int8.
    """
    layers = tf.keras.layers
    reg = tf.keras.regularizers.l2(2e-5)
    inputs = tf.keras.Input((CROP_SIZE, CROP_SIZE, 3), name="crop")
    x = layers.Conv2D(24, 3, strides=2, padding="same", use_bias=False, kernel_regularizer=reg)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    for stride, filters in (
        (1, 32),
        (2, 64),
        (1, 64),
        (2, 128),
        (1, 128),
        (2, 192),
        (1, 192),
        (2, 256),
        (1, 256),
    ):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, 1, use_bias=False, kernel_regularizer=reg)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="covered")(x)
    return tf.keras.Model(inputs, outputs, name="covering_classifier")


def convert_int8(tf: Any, model: Any, representative: np.ndarray) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def samples() -> Any:
        for crop in representative:
            yield [crop[None].astype(np.float32)]

    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


# --- metrics ------------------------------------------------------------------------------------


def rates(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    pred = probs >= threshold
    pos, neg = labels == 1, labels == 0
    tpr = float(pred[pos].mean()) if pos.any() else float("nan")
    tnr = float((~pred[neg]).mean()) if neg.any() else float("nan")
    vals = [v for v in (tpr, tnr) if not np.isnan(v)]
    return {
        "tpr": tpr,
        "tnr": tnr,
        "balanced_accuracy": float(np.mean(vals)),
        "n_pos": int(pos.sum()),
        "n_neg": int(neg.sum()),
    }


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = probs[labels == 1], probs[labels == 0]
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(predict: Any, sets: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Every figure of the model card for one predictor (Keras or the shipped .tflite)."""
    real_x, real_y, real_src = sets["real"]
    p_real = predict(real_x)
    out: dict[str, Any] = {"threshold": threshold}
    out["real_overall"] = rates(p_real, real_y, threshold)
    out["real_overall"]["auc"] = auc(p_real, real_y)
    out["real_per_source"] = {
        s: rates(p_real[real_src == s], real_y[real_src == s], threshold) for s in sorted(set(real_src))
    }
    # Balanced accuracy of each covered source against all uncovered validation faces and vice versa.
    synth_cov = {k: predict(v) for k, v in sets["synthetic_cover"].items()}
    synth_neg = {k: predict(v) for k, v in sets["synthetic_distract"].items()}
    out["synthetic_covering_tpr"] = {k: float((p >= threshold).mean()) for k, p in synth_cov.items()}
    out["synthetic_distractor_tnr"] = {k: float((p < threshold).mean()) for k, p in synth_neg.items()}
    real_neg = p_real[real_y == 0]
    non_mask = np.concatenate([synth_cov[k] for k in synth.NON_MASK_COVERINGS])
    labels = np.concatenate([np.ones(len(non_mask)), np.zeros(len(real_neg))])
    out["synthetic_non_mask"] = rates(np.concatenate([non_mask, real_neg]), labels, threshold)
    distract = np.concatenate(list(synth_neg.values()))
    labels = np.concatenate([np.ones(len(non_mask)), np.zeros(len(distract))])
    out["synthetic_non_mask_vs_distractors"] = rates(np.concatenate([non_mask, distract]), labels, threshold)
    ident_plain, ident_cov = sets["identity_plain"], sets["identity_cover"]
    out["unseen_sources_uncovered_tnr"] = {
        k: float((predict(v) < threshold).mean()) for k, v in ident_plain.items()
    }
    out["unseen_sources_synthetic_covering_tpr"] = {
        k: float((predict(v) >= threshold).mean()) for k, v in ident_cov.items()
    }
    # ROC-ish table for choosing covered_threshold.
    table = []
    for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        r = rates(p_real, real_y, t)
        table.append(
            {
                "threshold": t,
                "real_tpr": r["tpr"],
                "real_fpr": 1 - r["tnr"],
                "synthetic_non_mask_tpr": float((non_mask >= t).mean()),
                "distractor_fpr": float((distract >= t).mean()),
            }
        )
    out["threshold_table"] = table
    out["_probs"] = {"real": p_real, "non_mask": non_mask, "distract": distract}
    return out


def choose_threshold(probs: dict[str, np.ndarray], real_y: np.ndarray) -> float:
    """The recommended ``covered_threshold``, chosen on the validation data by a fixed rule.

    Start from 0.5 (training is class-balanced, so that is the prior-neutral point) and lower it
    in steps of 0.1, down to 0.3 at most, while the false-alarm rate on real uncovered validation
    faces stays where it is at 0.5: covered recall bought without a single extra false alarm on real
    faces. A missed covering is the failure the ATM exists to prevent, so free recall is taken.
    The floor of 0.3 is there because the first model, tuned for the best validation balanced
    accuracy, picked 0.20 and tripled its false alarms on Yale faces (never trained on).
    """
    p_real = probs["real"]
    negatives = p_real[real_y == 0]
    base_false_alarms = int((negatives >= PRIOR_NEUTRAL_THRESHOLD).sum())
    chosen = PRIOR_NEUTRAL_THRESHOLD
    for threshold in (0.4, 0.3):
        if int((negatives >= threshold).sum()) > base_false_alarms:
            break
        chosen = threshold
    return chosen


# --- outputs ------------------------------------------------------------------------------------


def _compact_json(data: Any) -> str:
    """json.dumps(indent=2), with short scalar lists and short objects inside lists on one line
    (the style of the hand-written detector entry, which must stay byte-identical)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)

    def one_line(match: re.Match[str]) -> str:
        body = re.sub(r"\s*\n\s*", " ", match.group(0))
        body = body.replace("[ ", "[").replace(" ]", "]").replace("{ ", "{").replace(" }", "}")
        return body if len(body) <= 100 else match.group(0)

    text = re.sub(r"\[[^\[\]{}]*\]", one_line, text)
    text = re.sub(
        r"(?<=\n)(\s*)\{[^\[\]{}]*(\[[^\[\]{}]*\][^\[\]{}]*)*\}",
        lambda m: m.group(1) + one_line(m).lstrip() if m.group(0).count("\n") else m.group(0),
        text,
    )
    return text + "\n"


def write_manifest_entry(entry: dict[str, Any]) -> None:
    path = MODELS_DIR / "manifest.json"
    original = path.read_text(encoding="utf-8")
    data = json.loads(original)
    data["models"] = [m for m in data["models"] if m.get("role") != ROLE] + [entry]
    text = _compact_json(data)
    # Other entries must come out exactly as they were written.
    for other in json.loads(original)["models"]:
        if other.get("role") == ROLE:
            continue
        if _compact_json(other).strip() not in text and json.dumps(other) not in json.dumps(data):
            raise RuntimeError(f"manifest rewrite would change the {other.get('role')} entry")
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=cd.DEFAULT_DATASET)
    parser.add_argument("--out", type=Path, default=cd.DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ship", action="store_true", help="leave firmware_models/ untouched")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where the candidate model and metrics go (default: --out, next to the cached crops)",
    )
    parser.add_argument(
        "--ship-if-better",
        type=Path,
        default=None,
        metavar="METRICS_JSON",
        help="ship only if real validation balanced accuracy beats this run's, no unseen source's "
        "uncovered-kept figure is lower, and synthetic non-mask balanced accuracy stays >= 95%%",
    )
    parser.add_argument("--reprepare", action="store_true", help="redo detection and split")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-evaluate out/covering's trained model and rewrite the card (no training)",
    )
    args = parser.parse_args(argv)
    run_dir = args.run_dir or args.out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    if args.reprepare or not (args.out / "faces.json").is_file():
        cd.prepare(args.dataset, args.out)
    records, ctx, kps, prep_stats = cd.load_prepared(args.out)
    timings["prepare_s"] = time.monotonic() - t_start

    # Validation sets (validation groups only).
    t0 = time.monotonic()
    val = [r for r in records if r.split == "val" and r.box is not None]
    val_unc = [r.index for r in val if r.label == 0]
    sets: dict[str, Any] = {
        "real": (
            real_crops(val, args.dataset),
            np.array([r.label for r in val], np.float32),
            np.array([r.source for r in val]),
        ),
        "synthetic_cover": synthetic_set(val_unc, synth.COVERINGS, ctx, kps, seed=SEED + 1),
        "synthetic_distract": synthetic_set(val_unc, synth.DISTRACTORS, ctx, kps, seed=SEED + 2),
    }
    ident_plain, ident_ctx, ident_kps = identity_set(cd.DETECTOR_MODEL)
    ident_idx = list(range(len(ident_ctx)))
    ident_cov = synthetic_set(
        ident_idx, (*synth.NON_MASK_COVERINGS, "mask"), ident_ctx, ident_kps, seed=SEED + 3
    )
    sets["identity_plain"] = ident_plain
    sets["identity_cover"] = ident_cov
    timings["validation_sets_s"] = time.monotonic() - t0

    candidate = run_dir / MODEL_FILE
    if args.evaluate_only:
        import tensorflow as tf

        previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        history, items_count = previous["history"], previous["train_items_per_round"]
        for key in ("augmentation_s", "training_s", "conversion_s"):
            timings[key] = previous["timings"][key]
        timings["prepare_s"] = previous["timings"]["prepare_s"]
        args.epochs = previous["epochs"]
        model = tf.keras.models.load_model(run_dir / "covering_classifier.keras")
        tflite = candidate.read_bytes()
        real_x, real_y, _ = sets["real"]

        def keras_predict(x: np.ndarray) -> np.ndarray:
            return model.predict(x.astype(np.float32), batch_size=256, verbose=0)[:, 0]

    else:
        # Training rounds, generated before TensorFlow is imported (fork safety).
        global _CTX, _KPS, _PHOTO_POOL
        _CTX, _KPS = ctx, kps
        train = [r for r in records if r.split == "train" and r.box is not None]
        _PHOTO_POOL = ctx[[r.index for r in train[:: max(1, len(train) // 400)]]]
        items = []
        for r in train:
            items += [(r.index, r.label)] * SOURCE_REPEAT.get(r.source, 1)
        t0 = time.monotonic()
        rounds = generate_rounds(items, args.epochs, seed=SEED, workers=args.workers)
        timings["augmentation_s"] = time.monotonic() - t0
        logger.info(
            "generated %d rounds of %d crops in %.0f s", len(rounds), len(items), timings["augmentation_s"]
        )

        import tensorflow as tf

        tf.keras.utils.set_random_seed(SEED)
        tf.config.experimental.enable_op_determinism()
        model = build_model(tf)
        steps = args.epochs * int(np.ceil(len(items) / args.batch_size))
        warmup = WARMUP_EPOCHS * int(np.ceil(len(items) / args.batch_size))
        schedule = tf.keras.optimizers.schedules.CosineDecay(
            PEAK_LR / 20, steps - warmup, alpha=0.01, warmup_target=PEAK_LR, warmup_steps=warmup
        )
        model.compile(
            optimizer=tf.keras.optimizers.Adam(schedule),
            loss=tf.keras.losses.BinaryCrossentropy(label_smoothing=LABEL_SMOOTHING),
            metrics=[tf.keras.metrics.AUC(name="auc")],
        )
        model.summary(print_fn=logger.info)
        real_x, real_y, _ = sets["real"]
        t0 = time.monotonic()
        history = []
        for epoch, (x, y) in enumerate(rounds):
            pos = float(y.mean())
            weights = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)).astype(np.float32)
            h = model.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=args.batch_size,
                epochs=epoch + 1,
                initial_epoch=epoch,
                verbose=0,
            )
            p = model.predict(real_x, batch_size=256, verbose=0)[:, 0]
            ba = rates(p, real_y, 0.5)["balanced_accuracy"]
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": float(h.history["loss"][-1]),
                    "val_real_ba": ba,
                    "covered_share": pos,
                }
            )
            logger.info(
                "epoch %d: loss %.4f, val real balanced accuracy %.4f (%.0f s)",
                epoch + 1,
                h.history["loss"][-1],
                ba,
                time.monotonic() - t0,
            )
        timings["training_s"] = time.monotonic() - t0
        del rounds

        def keras_predict(x: np.ndarray) -> np.ndarray:
            return model.predict(x.astype(np.float32), batch_size=256, verbose=0)[:, 0]

        keras_metrics = evaluate(keras_predict, sets, 0.5)

        # int8 conversion with ~300 representative training crops (fresh augmentation, both classes).
        t0 = time.monotonic()
        _, rep_rng = None, np.random.default_rng(SEED + 4)
        rep_items = [items[i] for i in rep_rng.choice(len(items), 300, replace=False)]
        representative = _generate_chunk((rep_items, SEED + 5))[0]
        tflite = convert_int8(tf, model, representative)
        timings["conversion_s"] = time.monotonic() - t0
        run_dir.mkdir(parents=True, exist_ok=True)
        candidate.write_bytes(tflite)
        model.save(run_dir / "covering_classifier.keras")

        items_count = len(items)

    with CoveringClassifier(candidate) as clf:
        int8_metrics = evaluate(clf.predict_crops, sets, 0.5)
        threshold = choose_threshold(int8_metrics["_probs"], real_y)
        int8_metrics = evaluate(clf.predict_crops, sets, threshold)
        keras_metrics = evaluate(keras_predict, sets, threshold)
        diff = np.abs(int8_metrics["_probs"]["real"] - keras_metrics["_probs"]["real"])
        agree = float(
            (
                (int8_metrics["_probs"]["real"] >= threshold)
                == (keras_metrics["_probs"]["real"] >= threshold)
            ).mean()
        )
        bench = sets["real"][0][:200]
        clf.predict_crops(bench[:10])
        t_b = time.perf_counter()
        for crop in bench:
            clf.predict_crops(crop[None])
        ms_per_crop = (time.perf_counter() - t_b) * 1e3 / len(bench)
        ops = _op_names(clf)
    timings["total_s"] = time.monotonic() - t_start
    if args.evaluate_only:
        timings["total_s"] = previous["timings"]["total_s"]

    sha = hashlib.sha256(tflite).hexdigest()
    summary = {
        "sha256": sha,
        "bytes": len(tflite),
        "threshold": threshold,
        "params": int(model.count_params()),
        "ms_per_crop_1_thread": ms_per_crop,
        "ops": ops,
        "int8_vs_keras": {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "decision_agreement": agree,
        },
        "keras": _public(keras_metrics),
        "int8": _public(int8_metrics),
        "prepare": prep_stats,
        "history": history,
        "timings": timings,
        "environment": {
            "tensorflow": tf.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "epochs": args.epochs,
        "train_items_per_round": items_count,
        "seed": SEED,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    logger.info(
        "int8: %s", json.dumps({k: summary["int8"][k] for k in ("real_overall", "synthetic_non_mask")})
    )
    if args.ship_if_better is not None and not args.no_ship:
        verdict = ship_gate(summary, json.loads(args.ship_if_better.read_text(encoding="utf-8")))
        logger.info("ship gate against %s: %s", args.ship_if_better, verdict)
        args.no_ship = bool(verdict)
    if not args.no_ship:
        (MODELS_DIR / MODEL_FILE).write_bytes(tflite)
        write_manifest_entry(manifest_entry(summary))
        (MODELS_DIR / CARD_FILE).write_text(model_card(summary), encoding="utf-8")
        logger.info("shipped %s (%d bytes, sha256 %s)", MODEL_FILE, len(tflite), sha)
    return 0


def ship_gate(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """Reasons not to replace the model ``old`` (a previous metrics.json) with ``new``; [] = ship.

    Only the int8 figures count, and only ones computed on identical sets (real validation, ORL/Yale,
    synthetic non-mask coverings): the shipped model is what the daemon runs.
    """
    reasons = []
    ba_new = new["int8"]["real_overall"]["balanced_accuracy"]
    ba_old = old["int8"]["real_overall"]["balanced_accuracy"]
    if ba_new <= ba_old:
        reasons.append(f"real validation balanced accuracy {ba_new:.4f} <= {ba_old:.4f}")
    for source, kept_old in old["int8"]["unseen_sources_uncovered_tnr"].items():
        kept_new = new["int8"]["unseen_sources_uncovered_tnr"].get(source, 0.0)
        if kept_new < kept_old:
            reasons.append(f"{source} uncovered kept {kept_new:.4f} < {kept_old:.4f}")
    non_mask = new["int8"]["synthetic_non_mask"]["balanced_accuracy"]
    if non_mask < 0.95:
        reasons.append(f"synthetic non-mask balanced accuracy {non_mask:.4f} < 0.95")
    return reasons


def _op_names(clf: CoveringClassifier) -> list[str]:
    interpreter = clf._interpreter
    try:
        return sorted({op["op_name"] for op in interpreter._get_ops_details()})
    except Exception:  # private API; only informative
        return []


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def manifest_entry(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": ROLE,
        "name": "covering_cnn_96_int8",
        "file": MODEL_FILE,
        "sha256": summary["sha256"],
        "bytes": summary["bytes"],
        "input": {
            "name": "crop",
            "shape": [1, CROP_SIZE, CROP_SIZE, 3],
            "dtype": "uint8",
            "layout": "NHWC",
            "color": "RGB",
            "value_range": [0, 255],
            "quantization": {"scale": 1.0, "zero_point": 0},
            "resize": "atmguard.vision.covering.face_crop (1.6x face box, eye line level, edge padding)",
        },
        "outputs": [
            {"name": "covered", "shape": [1, 1], "dtype": "uint8", "meaning": "P(covered) = q / 256"}
        ],
        "quantization": "full integer int8 (per-channel weights), uint8 input and output",
        "license": "Apache-2.0",
        "threshold": summary["threshold"],
        "source": {
            "trained_by": "atmguard",
            "recipe": "firmware_models/training/train_covering.py",
            "model_card": CARD_FILE,
            "tensorflow": summary["environment"]["tensorflow"],
            "seed": summary["seed"],
        },
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def model_card(s: dict[str, Any]) -> str:
    i8, kr = s["int8"], s["keras"]
    t = s["timings"]
    lines = [
        "# Model card: covering_classifier (covered-face classifier)",
        "",
        "Generated by `firmware_models/training/train_covering.py` (`make train-covering`); do not edit by hand.",
        "",
        "## What it does",
        "",
        "Input: a 96x96 RGB uint8 crop from `atmguard.vision.covering.face_crop` (square, 1.6x the BlazeFace",
        "box, rotated so the eye line is level, edge-padded outside the frame). Output: P(covered), where",
        "covered means the nose and/or mouth are hidden (mask, scarf, balaclava, hand, helmet visor, hood and",
        "scarf, any object). Glasses, sunglasses, beards, moustaches, caps, hoods and a hand below the mouth",
        "are *not* coverings.",
        "",
        f"- File `{MODEL_FILE}`: {s['bytes']:,} bytes, sha256 `{s['sha256']}`",
        f"- {s['params']:,} parameters; ops: {', '.join(s['ops']) or 'n/a'}",
        f"- {s['ms_per_crop_1_thread']:.2f} ms per crop (ai-edge-litert, 1 thread, this 2-core x86_64 machine)",
        f"- Recommended decision threshold (`covered_threshold`): **{s['threshold']:.2f}**",
        "- Licence: Apache-2.0 (our weights). Training data: research-only images, not shipped.",
        "",
        "## Validation (shipped int8 model)",
        "",
        "Split: groups = near-duplicate clusters (whole-image pHash <= 4 bits, or face-crop correlation >= 0.955,",
        "mirrored too) joined with RMFD person names; 20% of the groups of each source go to validation.",
        "Validation crops are cut by `face_crop` from the original images, exactly as the daemon cuts them.",
        "",
        f"Real validation, threshold {s['threshold']:.2f}: balanced accuracy **{_pct(i8['real_overall']['balanced_accuracy'])}**",
        f"(covered recall {_pct(i8['real_overall']['tpr'])}, uncovered specificity {_pct(i8['real_overall']['tnr'])}, "
        f"AUC {i8['real_overall']['auc']:.4f}); Keras float model: {_pct(kr['real_overall']['balanced_accuracy'])}.",
        "",
        "| source | class | images | correct (int8) | correct (Keras) |",
        "|---|---|---|---|---|",
    ]
    for src, r in i8["real_per_source"].items():
        cls = "covered" if r["n_pos"] else "uncovered"
        key = "tpr" if r["n_pos"] else "tnr"
        lines.append(
            f"| {src} | {cls} | {r['n_pos'] + r['n_neg']} | {_pct(r[key])} | {_pct(kr['real_per_source'][src][key])} |"
        )
    nm = i8["synthetic_non_mask"]
    lines += [
        "",
        "Synthetic coverings drawn on validation faces only (uncovered validation groups), canonical crop:",
        f"non-mask coverings vs real uncovered validation faces: balanced accuracy **{_pct(nm['balanced_accuracy'])}**",
        f"(coverings flagged {_pct(nm['tpr'])}); against the synthetic distractors instead: "
        f"{_pct(i8['synthetic_non_mask_vs_distractors']['balanced_accuracy'])}.",
        "",
        "| synthetic covering | flagged (int8) | flagged (Keras) |",
        "|---|---|---|",
    ]
    for k, v in i8["synthetic_covering_tpr"].items():
        lines.append(
            f"| {k}{'' if k in synth.NON_MASK_COVERINGS else ' (mask-like)'} | {_pct(v)} | {_pct(kr['synthetic_covering_tpr'][k])} |"
        )
    lines += ["", "| distractor (must stay uncovered) | kept uncovered (int8) | (Keras) |", "|---|---|---|"]
    for k, v in i8["synthetic_distractor_tnr"].items():
        lines.append(f"| {k} | {_pct(v)} | {_pct(kr['synthetic_distractor_tnr'][k])} |")
    lines += [
        "",
        "Sources never trained on (faces-identity ORL and Yale, grayscale lab photos, detector at 0.6 on a",
        "25% edge-padded image):",
        "",
    ]
    for k, v in i8["unseen_sources_uncovered_tnr"].items():
        lines.append(f"- {k}: uncovered kept uncovered {_pct(v)}")
    cov = i8["unseen_sources_synthetic_covering_tpr"]
    lines.append(
        "- synthetic coverings on them flagged: " + ", ".join(f"{k} {_pct(v)}" for k, v in cov.items())
    )
    lines += [
        "",
        "### Threshold (ROC-ish, int8)",
        "",
        "| threshold | real covered recall | real uncovered flagged | synthetic non-mask recall | distractors flagged |",
        "|---|---|---|---|---|",
    ]
    for row in i8["threshold_table"]:
        lines.append(
            f"| {row['threshold']:.1f} | {_pct(row['real_tpr'])} | {_pct(row['real_fpr'])} | "
            f"{_pct(row['synthetic_non_mask_tpr'])} | {_pct(row['distractor_fpr'])} |"
        )
    d = s["int8_vs_keras"]
    p = s["prepare"]
    lines += [
        "",
        f"int8 vs Keras on real validation crops: max |dP| {d['max_abs_diff']:.3f}, mean {d['mean_abs_diff']:.4f}, "
        f"same decision on {_pct(d['decision_agreement'])}.",
        "",
        "## Data",
        "",
        "`faces-covered` (read in place; never copied into the repository). Faces found by the project's",
        f"BlazeFace detector at score >= {cd.DETECT_THRESHOLD} on the image as is or edge-padded by 25% / 50%:",
        "",
        "| source | images | no face found (not used) | train | validation |",
        "|---|---|---|---|---|",
    ]
    for src, det in p["detection"].items():
        sp = p["split"][src]
        lines.append(
            f"| {src} | {det['images']} | {det['no_face']} | {sp.get('train', 0)} | {sp.get('val', 0)} |"
        )
    lines += [
        "",
        f"Groups: {p['groups']} ({p['image_phash_pairs']} whole-image and {p['face_crop_correlated_pairs']} face-crop",
        "near-duplicate pairs merged; RMFD persons kept on one side).",
        "",
        "## Training",
        "",
        f"- {s['epochs']} epochs, one freshly augmented round of {s['train_items_per_round']} crops each ("
        + ", ".join(f"{k} x{v}" for k, v in SOURCE_REPEAT.items())
        + ").",
        f"- Uncovered training faces: {_pct(P_COVER_UNCOVERED)} get a synthetic covering (label covered), "
        f"{_pct(P_DISTRACT_UNCOVERED)} a distractor (label uncovered; {_pct(P_SECOND_DISTRACTOR)} of those a second "
        f"one too); real covered faces get a distractor {_pct(P_DISTRACT_COVERED)} of the time.",
        "- Augmentation: zoom/shift/rotation/mirror, random re-framing with edge padding, downscale-upscale, blur,",
        "  saturation/grayscale (25%), white balance, side-light gradient, harsh directional shadow,",
        "  brightness/contrast (down to 0.4)/gamma, noise, JPEG.",
        f"- Loss: class-balanced binary cross-entropy, label smoothing {LABEL_SMOOTHING}; Adam, {WARMUP_EPOCHS} epoch "
        f"warm-up to {PEAK_LR:g} then cosine decay; batch 64; seeded.",
        f"- Time on this 2-core machine: prepare {t['prepare_s']:.0f} s (cached after the first run), validation sets "
        f"{t['validation_sets_s']:.0f} s, augmentation {t['augmentation_s']:.0f} s, training {t['training_s']:.0f} s, "
        f"int8 conversion {t['conversion_s']:.0f} s; total {t['total_s'] / 60:.1f} min "
        f"(TensorFlow {s['environment']['tensorflow']}, Python {s['environment']['python']}).",
        "",
        "## Limitations",
        "",
        "- Real coverings in the data are almost all face masks; scarves, balaclavas, hands, visors and hoods",
        "  are synthetic (drawn from the detector's keypoints). Their figures above come from the same",
        "  generator as training (other faces, other random draws), so they are optimistic for real ones.",
        "- 89% of the real uncovered faces are CelebA crops; covered faces come from other web sources.",
        "  Synthetic coverings on CelebA faces are what stops the model keying on the source.",
        f"- The threshold ({s['threshold']:.2f}) was chosen on this same validation set (see choose_threshold() in the",
        "  recipe: lowered from 0.5 only while real false alarms do not rise, never below 0.3), so the real",
        "  validation figures above are optimistic; the table shows 0.5 for comparison. Tuning for the best",
        "  validation balanced accuracy picked 0.20 for the first model and tripled its false alarms on Yale faces.",
        "- Yale is no longer a blind check: the first model's Yale misses (moustaches, glasses, dark",
        "  grayscale faces) led to the moustache distractor, more grayscale and harsh-shadow augmentation.",
        "  Its faces are still never trained on; the sealed set is the real test of generalisation.",
        "- Validate on real ATM camera captures (lighting, angle, resolution) before relying on it.",
        "",
        "Data credits: RMFD (Wang et al., IEEE T-BIOM 2023), CelebA (Liu et al., ICCV 2015), ORL (Olivetti",
        "Research Laboratory), Yale Face Database; via chandrikadeb7/Face-Mask-Detection and",
        "Karimashraf01/Face-Mask-Detection-using-MobilenetV2.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
