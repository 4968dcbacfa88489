"""`atmguard model eval DIR` / `eval-identity DIR`: the vision models' accuracy and speed on labelled images.

Also holds the small helpers the vision commands share (settings and models directory), so
``bench`` finds the models the same way. Nothing heavy is imported until a handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmguard.cli.common import (
    EX_CONFIG,
    EX_NOINPUT,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandFailed,
    command_settings,
    config_is_explicit,
    report_failures,
)
from atmguard.cli.progress import Progress

if TYPE_CHECKING:
    from atmguard.config import Settings


def _checkout_models_dir() -> Path:
    # A development checkout keeps the models next to the package (firmware_models/).
    import atmguard

    return Path(atmguard.__file__).resolve().parent.parent / "firmware_models"


def vision_settings(args: argparse.Namespace) -> Settings:
    """Settings for a vision command, with ``paths.models_dir`` chosen as documented in --help.

    --config / $ATMGUARD_CONFIG are loaded as usual (invalid: exit 78). Without either, the
    default config file is used if it exists, else the built-in defaults, and a models directory
    without a manifest falls back to the source checkout's firmware_models/ (so the commands work
    in a clone without an installed config).
    """
    from atmguard.errors import ConfigError
    from atmguard.vision.models import MANIFEST_NAME, models_dir_from_settings

    explicit = config_is_explicit(args)
    try:
        settings = command_settings(args)
    except ConfigError as exc:
        raise CommandFailed(EX_CONFIG, str(exc)) from None
    if getattr(args, "models_dir", None):
        models_dir = Path(args.models_dir).resolve()
    else:
        models_dir = models_dir_from_settings(settings)
        fallback = _checkout_models_dir()
        if (
            not explicit
            and not (models_dir / MANIFEST_NAME).is_file()
            and (fallback / MANIFEST_NAME).is_file()
        ):
            models_dir = fallback
    print(f"models: {models_dir}", file=sys.stderr)
    return settings.model_copy(
        update={"paths": settings.paths.model_copy(update={"models_dir": str(models_dir)})}
    )


def add_models_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        help="directory with manifest.json and the .tflite files (default: paths.models_dir from the "
        "config; without a config file, the checkout's firmware_models/)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {value}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``model`` (with ``eval``, ``detect`` and ``eval-identity``) to the top-level sub-commands."""
    model = commands.add_parser("model", help="evaluate the vision models on labelled images")
    model_commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")

    def _usage(args: argparse.Namespace) -> int:
        model.print_help()
        return EX_USAGE

    model.set_defaults(handler=_usage)

    evaluate = model_commands.add_parser(
        "eval",
        help="accuracy and speed of face detection + covering classification on DIR/covered and DIR/uncovered",
        description=(
            "Each image is one camera frame: padded by --pad of its size on every side (border "
            "replicated) and shrunk to fit 640x480 if larger. A covered image counts as denied when no "
            "face can be judged or the primary face is classified covered; an uncovered one as allowed "
            "when a face is judged and classified uncovered (one frame, at --threshold; the daemon's "
            "tracker adds smoothing over several frames). Unreadable files are counted and listed."
        ),
    )
    evaluate.add_argument("dir", metavar="DIR", help="folder with covered/ and uncovered/ image folders")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.add_argument(
        "--threshold",
        type=_probability,
        help="covering probability at/above which a face counts as covered (default: the tracker's, 0.5)",
    )
    evaluate.add_argument(
        "--min-face-px",
        type=float,
        help="primary faces smaller than this are not judged (default: the pipeline's, 40)",
    )
    evaluate.add_argument(
        "--pad",
        type=_fraction,
        default=0.25,
        help="margin added around each image, as a fraction (default 0.25)",
    )
    evaluate.add_argument(
        "--threads", type=positive_int, help="interpreter threads (default: vision.num_threads)"
    )
    evaluate.add_argument(
        "--limit", type=positive_int, metavar="N", help="only the first N images of each class"
    )
    evaluate.add_argument("--details", metavar="CSV", help="also write one CSV row per image to this file")
    add_models_dir_option(evaluate)
    evaluate.set_defaults(handler=_eval)

    detect = model_commands.add_parser(
        "detect",
        help="draw the faces found, their keypoints and covering probability on images, as PNG files",
        description=(
            "Runs the vision pipeline on each image as one camera frame (padded like `model eval`) and "
            "writes OUT/<name>.png with each face's box, keypoints and a label 'detector score / covering "
            "probability' (C: counts as covered, U: uncovered, -: too small to judge)."
        ),
    )
    detect.add_argument("images", metavar="IMAGE", nargs="+", help="image files to look at")
    detect.add_argument(
        "--out", metavar="DIR", default="out/detect", help="where the PNGs go (default out/detect)"
    )
    detect.add_argument(
        "--pad", type=_fraction, default=0.25, help="margin added around each image (default 0.25)"
    )
    add_models_dir_option(detect)
    detect.set_defaults(handler=_detect)

    identity = model_commands.add_parser(
        "eval-identity",
        help="face verification error rates on DIR/<person>/ images, at the shipped thresholds",
        description=(
            "Every image is handled as a camera frame (padded like `model eval`): primary face, "
            "alignment, quality gates, embedding. Pairs of accepted images give genuine and impostor "
            "scores; templates from each person's first --template-images images are compared with "
            "the rest (how the ATM uses them). Figures are also given per source (folder name up to "
            "the first '_'). --calibrate derives the two thresholds from the calibration half of the "
            "persons (fixed --seed, split per source) and reports the validation half."
        ),
    )
    identity.add_argument("dir", metavar="DIR", help="folder with one sub-folder of images per person")
    identity.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    identity.add_argument(
        "--split",
        choices=("all", "calibration", "validation"),
        default="all",
        help="only the persons of this half of the --seed split (default: all persons)",
    )
    identity.add_argument(
        "--calibrate",
        action="store_true",
        help="derive match/mismatch thresholds from the calibration persons; report the validation persons",
    )
    identity.add_argument("--seed", type=int, help="person split seed (default: the shipped calibration's)")
    identity.add_argument(
        "--template-images",
        type=positive_int,
        default=3,
        help="images per person that make the template (default 3)",
    )
    identity.add_argument("--match-threshold", type=float, help="override the shipped match threshold")
    identity.add_argument("--mismatch-threshold", type=float, help="override the shipped mismatch threshold")
    identity.add_argument(
        "--limit", type=positive_int, metavar="N", help="only the first N images of each person"
    )
    add_models_dir_option(identity)
    identity.set_defaults(handler=_eval_identity)


def _detect(args: argparse.Namespace) -> int:
    from atmguard.vision.evaluate import camera_frame
    from atmguard.vision.imageops import load_rgb
    from atmguard.vision.pipeline import VisionPipeline
    from atmguard.vision.runtime import ModelError

    settings = vision_settings(args)
    threshold = settings.vision.covered_threshold
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    try:
        with VisionPipeline.from_settings(settings) as pipeline:
            from atmguard.vision.detector import draw_faces

            for name in args.images:
                try:
                    frame = camera_frame(load_rgb(name), pad_fraction=args.pad)
                except (OSError, ValueError) as exc:
                    unreadable += 1
                    print(f"{name}: unreadable: {exc}", file=sys.stderr)
                    continue
                observation = pipeline.process(frame)
                labels = []
                for judged in observation.faces:
                    p = judged.covered_probability
                    verdict = "-" if p is None else ("C" if p >= threshold else "U")
                    labels.append(f"{judged.face.score:.2f} / {'-' if p is None else f'{p:.2f}'} {verdict}")
                target = out_dir / f"{Path(name).stem}.png"
                draw_faces(frame, [judged.face for judged in observation.faces], labels=labels).save(target)
                print(f"{name}: {observation.face_count} face(s) [{'; '.join(labels) or 'none'}] -> {target}")
    except ModelError as exc:
        print(f"atmguard model detect: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 1 if unreadable else EX_OK


def _eval(args: argparse.Namespace) -> int:
    return report_failures("atmguard model eval", lambda: _run_eval(args))


def _run_eval(args: argparse.Namespace) -> int:
    from atmguard.vision.evaluate import DatasetError, evaluate_dir, list_images
    from atmguard.vision.pipeline import DEFAULT_MIN_FACE_PX, VisionPipeline
    from atmguard.vision.runtime import ModelError, runtime_info
    from atmguard.vision.tracker import DEFAULT_COVERED_THRESHOLD

    try:
        list_images(args.dir)  # a wrong DIR is reported before the models are loaded
    except DatasetError as exc:
        raise CommandFailed(EX_NOINPUT, str(exc)) from None
    settings = vision_settings(args)
    threshold = DEFAULT_COVERED_THRESHOLD if args.threshold is None else args.threshold
    min_face_px = DEFAULT_MIN_FACE_PX if args.min_face_px is None else args.min_face_px
    progress = Progress("eval", unit="images")  # stderr: stdout may be JSON

    try:
        pipeline = VisionPipeline.from_settings(settings, num_threads=args.threads, min_face_px=min_face_px)
        with pipeline:
            info = runtime_info()
            threads = args.threads or settings.vision.num_threads
            report = evaluate_dir(
                pipeline,
                args.dir,
                threshold=threshold,
                pad_fraction=args.pad,
                limit_per_class=args.limit,
                progress=progress.update,
                settings={"runtime": info.name, "runtime_version": info.version, "threads": threads},
            )
        progress.finish()
    except ModelError as exc:
        raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    if args.details:
        report.write_details(args.details)
    result = report.to_dict()
    if args.json:
        print(json.dumps(result, indent=None))
    else:
        print(format_table(result))
    return EX_OK


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable form of an eval result."""
    lines = [
        f"model eval: {result['dir']}",
        f"  threshold {result['threshold']:.2f}, min face {result['min_face_px']:g} px, "
        f"pad {result['pad_fraction']:.0%}, {result['runtime']} {result['runtime_version']}, "
        f"{result['threads']} thread(s)",
        "",
        f"  {'class':<10} {'images':>7} {'correct':>8} {'rate':>7} {'no face':>8} {'small':>6} {'multi':>6}",
    ]
    for label, correct in (("covered", "covered_denied"), ("uncovered", "uncovered_allowed")):
        lines.append(
            f"  {label:<10} {result[label + '_n']:>7} {result[correct]:>8} {_pct(result[correct + '_rate']):>7} "
            f"{result['no_face_' + label]:>8} {result['small_face_' + label]:>6} {result['multi_face_' + label]:>6}"
        )
    judged = result["face_covered_n"] + result["face_uncovered_n"]
    p50, p95 = result["ms_per_image_p50"], result["ms_per_image_p95"]
    lines += [
        "",
        "  correct: covered images denied, uncovered images allowed (one frame each)",
        f"  decision balanced accuracy    {_pct(result['balanced_accuracy'])}",
        f"  classifier balanced accuracy  {_pct(result['face_balanced_accuracy'])} (on {judged} images with a face)",
        "  time per image                "
        + ("n/a" if p50 is None else f"p50 {p50:.2f} ms, p95 {p95:.2f} ms (detector + classifier)"),
        f"  unreadable files              {result['unreadable_n']}",
    ]
    lines += [f"    {entry}" for entry in result["unreadable"]]
    return "\n".join(lines)


def _eval_identity(args: argparse.Namespace) -> int:
    return report_failures("atmguard model eval-identity", lambda: _run_eval_identity(args))


def _run_eval_identity(args: argparse.Namespace) -> int:
    from atmguard.vision import identity_eval as ie
    from atmguard.vision.detector import FaceDetector
    from atmguard.vision.embedder import DEFAULT_MATCH_THRESHOLD, DEFAULT_MISMATCH_THRESHOLD, FaceEmbedder
    from atmguard.vision.runtime import ModelError, runtime_info

    try:
        persons = list(ie.list_persons(args.dir))  # a wrong DIR is reported before the models are loaded
    except ie.IdentityDatasetError as exc:
        raise CommandFailed(EX_NOINPUT, str(exc)) from None
    seed = ie.DEFAULT_SPLIT_SEED if args.seed is None else args.seed
    chosen = None
    if args.split != "all" and not args.calibrate:
        split = ie.split_persons(persons, seed=seed)
        chosen = {person for person, side in split.items() if side == args.split}
    match = DEFAULT_MATCH_THRESHOLD if args.match_threshold is None else args.match_threshold
    mismatch = DEFAULT_MISMATCH_THRESHOLD if args.mismatch_threshold is None else args.mismatch_threshold
    if not -1.0 <= mismatch < match <= 1.0:
        raise CommandFailed(
            EX_USAGE, f"need -1 <= mismatch threshold ({mismatch}) < match threshold ({match}) <= 1"
        )
    settings = vision_settings(args)
    progress = Progress("eval-identity", unit="images")  # stderr: stdout may be JSON

    try:
        # One thread: the figure the speed target is about, and what the daemon gives it.
        with (
            FaceDetector.from_settings(settings, num_threads=1) as detector,
            FaceEmbedder.from_settings(settings, num_threads=1) as embedder,
        ):
            data = ie.embed_dir(
                detector,
                embedder,
                args.dir,
                persons=chosen,
                limit_per_person=args.limit,
                progress=progress.update,
            )
            info = runtime_info()
            data.settings.update(
                {"runtime": info.name, "runtime_version": info.version, "threads": 1, "split": args.split}
            )
            data.settings["model_sha256"] = embedder.model_sha256
        progress.finish()
    except ModelError as exc:
        raise CommandFailed(EX_UNAVAILABLE, str(exc)) from None
    try:
        if args.calibrate:
            result = ie.calibrate(data, seed=seed, template_images=args.template_images)
        else:
            result = ie.report(
                data, match_threshold=match, mismatch_threshold=mismatch, template_images=args.template_images
            )
            result["seed"] = seed
    except ie.IdentityDatasetError as exc:
        raise CommandFailed(EX_NOINPUT, str(exc)) from None
    if args.json:
        print(json.dumps(result))
    else:
        print(format_identity_table(result))
    return EX_OK


def _num(value: Any, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def format_identity_table(result: dict[str, Any]) -> str:
    """The human-readable form of an eval-identity (or --calibrate) result."""
    lines: list[str] = []
    if "validation" in result:
        q = result["calibration_quantiles"]
        lines += [
            f"calibration (seed {result['seed']}): {len(result['calibration_persons'])} calibration persons, "
            f"{len(result['validation_persons'])} validation persons",
            f"  match_threshold    {result['match_threshold']:+.2f}  (impostor 99.9% quantile, 95th pct of subsets: "
            f"pairs {q['impostor_q999_pairs_p95']:+.3f}, template {q['impostor_q999_template_p95']:+.3f})",
            f"  mismatch_threshold {result['mismatch_threshold']:+.2f}  (genuine 0.1% tail, 5th pct of subsets, by source: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in q["genuine_tail_by_source_p5"].items())
            + f"; minus margin {q['generalisation_margin']:.2f})",
            "",
            "validation persons:",
        ]
        result = result["validation"]
    rejected = ", ".join(f"{k} {v}" for k, v in result["rejected_quality"].items()) or "none"
    lines += [
        f"eval-identity: {result['dir']} ({result['split']} persons)",
        f"  {result['persons']} persons, {result['images']} images: {result['accepted']} accepted, "
        f"{result['no_face']} without a face, rejected by quality: {rejected}",
        f"  thresholds: match >= {result['match_threshold']:+.2f}, mismatch < {result['mismatch_threshold']:+.2f}; "
        f"template from {result['template_images']} images",
        f"  embedding p50 {_num(result['ms_per_embedding_p50'], '.2f')} ms, "
        f"alignment p50 {_num(result['ms_per_alignment_p50'], '.2f')} ms "
        f"({result['runtime']} {result['runtime_version']}, 1 thread)",
        "",
    ]
    columns = (
        ("genuine", "genuine_pairs", "d"),
        ("impostor", "impostor_pairs", "d"),
        ("EER", "eer", ".4f"),
        ("TAR@1e-2", "tar_at_far_1e-2", ".4f"),
        ("TAR@1e-3", "tar_at_far_1e-3", ".4f"),
        ("TAR@match", "tar_at_match_threshold", ".4f"),
        ("FAR@match", "far_at_match_threshold", ".4f"),
        ("gen->MISM", "genuine_rejected_as_mismatch", ".4f"),
        ("imp->MISM", "impostor_called_mismatch", ".4f"),
    )
    lines.append(f"  {'set':<16}" + "".join(f"{title:>11}" for title, _, _ in columns))
    rows = [("all", result), *sorted(result.get("per_source", {}).items())]
    for name, row in rows:
        for prefix, label in (("", "pairs"), ("template_", "template")):
            cells = "".join(f"{_num(row.get(prefix + key), fmt):>11}" for _, key, fmt in columns)
            lines.append(f"  {name + ' ' + label:<16}{cells}")
    if result["problems"]:
        lines += ["", f"  {len(result['problems'])} image(s) left out:"]
        lines += [f"    {entry}" for entry in result["problems"][:20]]
        if len(result["problems"]) > 20:
            lines.append(f"    ... {len(result['problems']) - 20} more (see --json)")
    return "\n".join(lines)
