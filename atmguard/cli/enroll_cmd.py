"""`atmguard enroll ACCOUNT --images DIR --consent` / `--delete`: face enrolment, from the bank's side.

Builds a face template from a folder of photos of the customer (each photo checked; the table
says which were used and why the others were not), and stores the template - never a photo - in
the central database with the customer's consent and its time. ``--delete`` erases every template
of the account. ACCOUNT is the bank's account id; ``--pan-stdin`` names the account by the card
number read from stdin instead (hashed with the PAN key, shown masked only).

The admin login is as for ``atmguard db``: ``--admin-user``, password from a 0600 file or a
systemd credential. Exit codes: 0 stored / erased; 64 usage, including a missing ``--consent``;
65 too few good photos (nothing stored) or a closed account; 66 no such folder; 67 no such
account; 69 database unreachable or model missing; 77 access denied / unsafe password file;
78 invalid config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from atmguard.cli.common import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandFailed,
    report_failures,
)
from atmguard.cli.db_cmd import add_admin_options
from atmguard.cli.model_cmd import add_models_dir_option

if TYPE_CHECKING:
    import pymysql.connections

    from atmguard.config import Settings
    from atmguard.store.enrolment import Account
    from atmguard.vision.enrol import Enrolment

Handler = Callable[[argparse.Namespace], int]

EX_NOUSER = 67  # sysexits.h "addressee unknown": no account with this id or card

CONSENT_REQUIRED = (
    "refusing to enrol without --consent: the customer's consent to the processing of their "
    "biometric data is a legal precondition for storing a face template. Record the consent, then "
    "run again with --consent."
)
_MAX_PAN_INPUT_BYTES = 64  # a PAN is at most 19 digits; a longer line is not a card number


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``enroll`` to the top-level sub-commands."""
    # allow_abbrev=False: a mistyped --admin-password must not be taken as a prefix of an option.
    enroll = commands.add_parser(
        "enroll",
        allow_abbrev=False,
        help="bank side: store a customer's face template from photos (with consent), or erase it",
        description="Builds a face template from the photos in --images (one customer, uncovered face, "
        "several photos; each is checked and the table says why any was rejected) and stores the "
        "template, never the photos, in the central database. --delete erases the account's templates. "
        "Exit 0 stored/erased, 64 without --consent, 65 too few good photos (nothing stored), "
        "66 no such folder, 67 no such account, 69 database unreachable, 77 access denied, 78 bad config.",
    )
    enroll.add_argument(
        "account", nargs="?", metavar="ACCOUNT", help="the bank's account id (accounts.account_id)"
    )
    enroll.add_argument(
        "--pan-stdin",
        action="store_true",
        help="name the account by its card number, read from stdin (hashed with central.pan_key_file / "
        "the pan-hmac-key credential; only the masked number is shown)",
    )
    action = enroll.add_mutually_exclusive_group()
    action.add_argument("--images", metavar="DIR", help="folder with the customer's photos")
    action.add_argument(
        "--delete", action="store_true", help="erase every face template of the account (all models)"
    )
    enroll.add_argument(
        "--consent",
        action="store_true",
        help="the customer has given their consent to face verification (required to store a template)",
    )
    enroll.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_admin_options(enroll, user_help="MySQL account of the bank allowed to write face_templates")
    add_models_dir_option(enroll)
    enroll.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import pymysql

    from atmguard.errors import ConfigError
    from atmguard.store.central import CentralAccessDeniedError, CentralError, classify_error
    from atmguard.store.credentials import CredentialError
    from atmguard.store.enrolment import AccountClosedError, AccountNotFoundError, ConsentRequiredError
    from atmguard.vision.runtime import ModelError

    def call() -> int:
        try:
            return _enroll(args)
        except pymysql.err.MySQLError as exc:
            raise classify_error(exc, where="central") from None

    return report_failures(
        "atmguard enroll",
        call,
        [
            (ConfigError, EX_CONFIG, ""),
            ((CredentialError, CentralAccessDeniedError), EX_NOPERM, ""),
            (CentralError, EX_UNAVAILABLE, "central database unavailable: "),
            (ModelError, EX_UNAVAILABLE, ""),
            # The account changed between the lookup and the store (closed or removed by someone else).
            (AccountNotFoundError, EX_NOUSER, ""),
            (AccountClosedError, EX_DATAERR, ""),
            (ConsentRequiredError, EX_USAGE, ""),
        ],
    )


def _check_usage(args: argparse.Namespace) -> None:
    if (args.account is None) == (not args.pan_stdin):
        raise CommandFailed(EX_USAGE, "name the account either as ACCOUNT (its id) or with --pan-stdin")
    if args.account is not None and not (args.account.isascii() and args.account.isdigit()):
        raise CommandFailed(EX_USAGE, f"ACCOUNT must be the numeric account id, got {args.account!r}")
    if args.delete:
        if args.consent:
            raise CommandFailed(EX_USAGE, "--consent has no meaning with --delete")
        return
    if not args.images:
        raise CommandFailed(EX_USAGE, "give --images DIR (to enrol) or --delete (to erase)")
    if not args.consent:
        raise CommandFailed(EX_USAGE, CONSENT_REQUIRED)


def _read_pan_hmac(settings: Settings) -> tuple[bytes, str]:
    """(pan_hmac, masked PAN) of the card number on stdin; the digits are wiped after use."""
    from atmguard.store.central import InvalidPinError, mask_pan, pan_hmac
    from atmguard.store.credentials import pan_key

    key = pan_key(settings)  # before reading: no PAN sits in memory while a key error is reported
    if sys.stdin.isatty():
        print("card number (PAN), then Enter:", file=sys.stderr)
    buffer = bytearray(_MAX_PAN_INPUT_BYTES + 1)
    view = memoryview(buffer)
    try:
        length = 0
        stream = sys.stdin.buffer
        while length < len(buffer):
            count = stream.readinto(view[length:])
            if not count:
                break
            length += count
            if b"\n" in buffer[:length]:
                break
        if length > _MAX_PAN_INPUT_BYTES:
            raise CommandFailed(EX_USAGE, "stdin holds more than a card number")
        start, end = 0, length
        while start < end and buffer[start] in b" \t\r\n":
            start += 1
        while end > start and buffer[end - 1] in b" \t\r\n":
            end -= 1
        digits = view[start:end]
        try:
            return pan_hmac(digits, key=key), mask_pan(digits)
        except InvalidPinError:
            raise CommandFailed(EX_USAGE, "stdin is not a card number (12-19 digits)") from None
        finally:
            digits.release()
    finally:
        buffer[:] = bytes(len(buffer))
        view.release()


def _connect(args: argparse.Namespace, settings: Settings) -> pymysql.connections.Connection:
    from atmguard.cli.db_cmd import admin_connection

    conn = admin_connection(args, settings)
    try:
        conn.select_db(settings.central.database)
    except BaseException:
        conn.close()
        raise
    return conn


def _find_account(args: argparse.Namespace, conn: Any, *, card_hmac: bytes, masked: str) -> Account:
    from atmguard.store.enrolment import find_account, find_account_by_pan_hmac

    if args.account is not None:
        account = find_account(conn, int(args.account))
        what = f"account {args.account}"
    else:
        account = find_account_by_pan_hmac(conn, card_hmac)
        what = f"card {masked}"
    if account is None:
        raise CommandFailed(EX_NOUSER, f"no {what} in the central database")
    return account


def _enroll(args: argparse.Namespace) -> int:
    from atmguard.cli.common import command_settings
    from atmguard.cli.model_cmd import vision_settings
    from atmguard.vision.enrol import EnrolmentInputError, list_image_files

    _check_usage(args)
    if args.delete:
        settings = command_settings(args)  # no models needed to erase
    else:
        try:
            list_image_files(args.images)  # a missing folder is reported before any login
        except EnrolmentInputError as exc:
            raise CommandFailed(EX_NOINPUT, str(exc)) from None
        settings = vision_settings(args)
    card_hmac, masked = _read_pan_hmac(settings) if args.pan_stdin else (b"", "")
    conn = _connect(args, settings)
    try:
        account = _find_account(args, conn, card_hmac=card_hmac, masked=masked)
        if args.delete:
            return _delete(args, conn, account)
        return _store(args, settings, conn, account)
    finally:
        conn.close()


def _label(account: Account) -> str:
    return f"account {account.account_id} (card {account.pan_masked or '?'}, {account.status.value})"


def _delete(args: argparse.Namespace, conn: Any, account: Account) -> int:
    from atmguard.store.enrolment import delete_templates

    deleted = delete_templates(conn, account.account_id)
    if args.json:
        print(
            json.dumps(
                {"account_id": account.account_id, "pan_masked": account.pan_masked, "deleted": deleted}
            )
        )
    else:
        print(f"{_label(account)}: erased {deleted} face template(s)")
    return EX_OK


def _store(args: argparse.Namespace, settings: Settings, conn: Any, account: Account) -> int:
    from atmguard.store.central import CardStatus
    from atmguard.store.enrolment import model_id_for, store_template
    from atmguard.vision.detector import FaceDetector
    from atmguard.vision.embedder import FaceEmbedder
    from atmguard.vision.enrol import EnrolmentInputError, build_template

    if account.status is CardStatus.CLOSED:
        raise CommandFailed(EX_DATAERR, f"{_label(account)} is closed: no face template is stored for it")
    with FaceDetector.from_settings(settings) as detector, FaceEmbedder.from_settings(settings) as embedder:
        try:
            enrolment = build_template(args.images, detector=detector, embedder=embedder)
        except EnrolmentInputError as exc:  # the folder vanished or filled up since the first check
            raise CommandFailed(EX_NOINPUT, str(exc)) from None
        model_id = model_id_for(embedder)
    result: dict[str, Any] = {
        "account_id": account.account_id,
        "pan_masked": account.pan_masked,
        "account_status": account.status.value,
        "images": [
            {
                "name": image.name,
                "status": image.status.value,
                "accepted": image.accepted,
                "reason": image.reason,
                "consistency": None if image.consistency is None else round(image.consistency, 4),
            }
            for image in enrolment.images
        ],
        "accepted": enrolment.accepted_count,
        "min_images": enrolment.min_images,
        "model_id": model_id,
        "stored": False,
    }
    if enrolment.template is not None:
        blob = enrolment.template.to_bytes()
        result["template_id"] = store_template(
            conn,
            account.account_id,
            model_id=model_id,
            template=blob,
            consent=True,  # _check_usage refused to get here without --consent
            consent_at=datetime.now(UTC),
        )
        result["template_bytes"] = len(blob)
        result["stored"] = True
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(account, enrolment, result)
    if enrolment.template is None:
        print(
            f"atmguard enroll: {enrolment.accepted_count} good photo(s), {enrolment.min_images} needed: "
            "nothing stored; add or retake photos (one person, facing the camera, sharp, well lit)",
            file=sys.stderr,
        )
        return EX_DATAERR
    return EX_OK


def _print_table(account: Account, enrolment: Enrolment, result: dict[str, Any]) -> None:
    print(_label(account))
    width = max([len("PHOTO"), *(len(image.name) for image in enrolment.images)])
    print(f"  {'PHOTO':<{width}}  {'RESULT':<8}  REASON")
    for image in enrolment.images:
        verdict = "accepted" if image.accepted else "rejected"
        if image.accepted:
            reason = (
                "ok" if image.consistency is None else f"ok (matches the others: {image.consistency:.2f})"
            )
        else:
            reason = f"{image.status.value}: {image.reason}"
        print(f"  {image.name:<{width}}  {verdict:<8}  {reason}")
    print(
        f"{enrolment.accepted_count} of {len(enrolment.images)} photo(s) accepted ({enrolment.min_images} needed)"
    )
    if result["stored"]:
        print(
            f"stored face template {result['template_id']} (model {result['model_id']}, "
            f"{result['template_bytes']} bytes, consent recorded); the photos were not stored"
        )
