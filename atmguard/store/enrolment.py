"""Bank side of face enrolment: store, replace and erase templates in the central database (issue 7).

Runs on a bank connection (table rights; ``atmguard enroll`` logs in with ``--admin-user``). ATMs
never reach these tables: they read a template only through the ``face_template`` procedure, by
the PAN HMAC of the card they hold and the embedding model they run (sql/migrations/0002).

What is stored is the template alone (``FaceTemplate.to_bytes()``: a mean embedding and the model
it belongs to), never a photo, with the customer's consent and when it was given. A template is
only stored with consent: there is no way through this module to store one without.

One template per account and model: storing replaces the account's template for that model in one
transaction, with the account row locked (``SELECT ... FOR UPDATE``), so two operators enrolling
the same customer at once leave exactly one template, never two or none. (The schema has no
unique key on (account_id, model_id); adding one is a migration of its own, see the report of
issue 7.) Erasing deletes the rows, so the template bytes are gone from the table, not hidden
behind a flag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from atmguard.errors import AtmguardError
from atmguard.store.central import PAN_HMAC_BYTES, CardStatus

if TYPE_CHECKING:
    import pymysql.connections

    from atmguard.vision.embedder import FaceEmbedder

    Connection = pymysql.connections.Connection

logger = logging.getLogger(__name__)

MODEL_ID_SHA_HEX = 16
"""Hex digits of the model file's sha256 in a model id: 64 bits tell model files apart, and the
id stays short in face_templates.model_id (VARCHAR(64)). The template itself carries the full
sha256, and the ATM refuses a template of another model file (embedder.check_compatible)."""
MODEL_ID_MAX_CHARS = 64


class EnrolmentError(AtmguardError):
    """Root of the enrolment store's refusals."""


class AccountNotFoundError(EnrolmentError, LookupError):
    """No account with this id (or card)."""


class AccountClosedError(EnrolmentError, ValueError):
    """A closed account gets no new template: biometric data with no use must not be collected."""


class ConsentRequiredError(EnrolmentError, PermissionError):
    """The customer's consent is a legal precondition for storing a face template."""


@dataclass(frozen=True, slots=True)
class Account:
    """What the bank operator is shown of an account: never the PAN, only its masked form."""

    account_id: int
    pan_masked: str
    status: CardStatus


@dataclass(frozen=True, slots=True)
class StoredTemplate:
    """One row of face_templates as the bank sees it (without the template bytes)."""

    template_id: int
    model_id: str
    template_bytes: int
    consent: bool
    consent_at: datetime | None
    created_at: datetime


def model_id_from_sha256(name: str, sha256: str) -> str:
    """``name@<first MODEL_ID_SHA_HEX hex digits of sha256>``."""
    digest = sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if not name or "@" in name:
        raise ValueError(f"model name must be non-empty without '@', got {name!r}")
    model_id = f"{name}@{digest[:MODEL_ID_SHA_HEX]}"
    if len(model_id) > MODEL_ID_MAX_CHARS:
        raise ValueError(f"model id {model_id!r} is longer than {MODEL_ID_MAX_CHARS} characters")
    return model_id


def model_id_for(embedder: FaceEmbedder) -> str:
    """The face_templates.model_id of templates made by ``embedder``: the bank stores under it, the
    ATM asks ``face_template(pan_hmac, model_id)`` with it, so both must use this function.

    The name is the embedder's manifest role, not the file name or manifest entry name, which a
    deployment may change without changing the model; the sha256 prefix is what identifies it.
    """
    return model_id_from_sha256(embedder.ROLE, embedder.model_sha256)


def _account(row: tuple[object, ...] | None) -> Account | None:
    if row is None:
        return None
    account_id, pan_masked, status = row
    return Account(int(account_id), str(pan_masked), CardStatus(str(status)))


def find_account(conn: Connection, account_id: int) -> Account | None:
    """The account with this id, or None."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT account_id, pan_masked, status FROM accounts WHERE account_id = %s", (int(account_id),)
        )
        return _account(cursor.fetchone())


def find_account_by_pan_hmac(conn: Connection, pan_hmac_value: bytes) -> Account | None:
    """The account of a card, by ``central.pan_hmac(pan, key=...)`` (the PAN itself never reaches here)."""
    if len(pan_hmac_value) != PAN_HMAC_BYTES:
        raise ValueError(f"pan_hmac must be {PAN_HMAC_BYTES} bytes, got {len(pan_hmac_value)}")
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT account_id, pan_masked, status FROM accounts WHERE pan_hmac = %s",
            (bytes(pan_hmac_value),),
        )
        return _account(cursor.fetchone())


def _utc_naive(moment: datetime) -> datetime:
    # DATETIME(6) has no time zone: the database holds UTC (as schema_migrations.applied_at does).
    if moment.tzinfo is None:
        raise ValueError("consent_at must be timezone-aware (e.g. datetime.now(UTC))")
    return moment.astimezone(UTC).replace(tzinfo=None)


def store_template(
    conn: Connection,
    account_id: int,
    *,
    model_id: str,
    template: bytes,
    consent: bool,
    consent_at: datetime,
) -> int:
    """Replace the account's template for ``model_id`` with ``template``; returns the new template_id.

    ``template`` must be a valid ``FaceTemplate.to_bytes()`` record made by the model ``model_id``
    names. Refuses without consent (ConsentRequiredError), for an unknown account
    (AccountNotFoundError) or a closed one (AccountClosedError); nothing is changed then.
    """
    from atmguard.vision.embedder import FaceTemplate

    if consent is not True:
        raise ConsentRequiredError(
            "the customer's consent is required before a face template may be stored; nothing was stored"
        )
    consent_time = _utc_naive(consent_at)
    parsed = FaceTemplate.from_bytes(bytes(template))  # TemplateMismatchError for anything else
    if (
        not model_id.endswith("@" + parsed.model_sha256[:MODEL_ID_SHA_HEX])
        or len(model_id) > MODEL_ID_MAX_CHARS
    ):
        raise ValueError(
            f"model id {model_id!r} does not name the model that made this template "
            f"(sha256 {parsed.model_sha256[:MODEL_ID_SHA_HEX]}…)"
        )
    import pymysql

    conn.begin()
    try:
        with conn.cursor() as cursor:
            # The lock serialises concurrent enrolments of one account: delete + insert is atomic.
            cursor.execute("SELECT status FROM accounts WHERE account_id = %s FOR UPDATE", (int(account_id),))
            row = cursor.fetchone()
            if row is None:
                raise AccountNotFoundError(f"no account {account_id}")
            if str(row[0]) == CardStatus.CLOSED:
                raise AccountClosedError(f"account {account_id} is closed; no template stored")
            cursor.execute(
                "DELETE FROM face_templates WHERE account_id = %s AND model_id = %s",
                (int(account_id), model_id),
            )
            replaced = cursor.rowcount
            cursor.execute(
                "INSERT INTO face_templates (account_id, model_id, template, consent, consent_at, created_at)"
                " VALUES (%s, %s, %s, TRUE, %s, UTC_TIMESTAMP(6))",
                (int(account_id), model_id, bytes(template), consent_time),
            )
            template_id = int(cursor.lastrowid)
        conn.commit()
    except (EnrolmentError, pymysql.err.MySQLError, OSError):
        try:
            conn.rollback()
        except (pymysql.err.MySQLError, OSError):
            logger.debug("rollback after a failed enrolment failed", exc_info=True)
        raise
    logger.info(
        "stored face template %d for account %s (model %s, %d image(s)%s)",
        template_id,
        account_id,
        model_id,
        parsed.image_count,
        f", replaced {replaced}" if replaced else "",
    )
    return template_id


def delete_templates(conn: Connection, account_id: int) -> int:
    """Erase every face template of the account (all models); returns how many rows were deleted.

    AccountNotFoundError for an unknown account, so a mistyped id is not reported as "0 erased".
    """
    import pymysql

    conn.begin()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (int(account_id),))
            if cursor.fetchone() is None:
                raise AccountNotFoundError(f"no account {account_id}")
            cursor.execute("DELETE FROM face_templates WHERE account_id = %s", (int(account_id),))
            deleted = int(cursor.rowcount)
        conn.commit()
    except (EnrolmentError, pymysql.err.MySQLError, OSError):
        try:
            conn.rollback()
        except (pymysql.err.MySQLError, OSError):
            logger.debug("rollback after a failed erasure failed", exc_info=True)
        raise
    logger.info("erased %d face template(s) of account %s", deleted, account_id)
    return deleted


def list_templates(conn: Connection, account_id: int) -> list[StoredTemplate]:
    """The account's stored templates (metadata and size only), oldest first."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT template_id, model_id, LENGTH(template), consent, consent_at, created_at"
            " FROM face_templates WHERE account_id = %s ORDER BY template_id",
            (int(account_id),),
        )
        rows = cursor.fetchall()
    return [
        StoredTemplate(int(tid), str(mid), int(size), bool(consent), consent_at, created_at)
        for tid, mid, size, consent, consent_at, created_at in rows
    ]
