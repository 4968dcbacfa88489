"""The central MySQL/MariaDB server: secure connection, ``CentralStore``, and the PIN scheme.

The ATM account can only call the procedures in sql/migrations/0002_atm_procedures.sql, so this
client is a thin layer over them that adds what the server cannot do for it: checking records
against their own hashes before they leave, classifying errors for the sync worker (transient:
``CentralUnavailableError``, retry later; permanent for one record: ``RecordRejectedError``,
dead-letter it), and deriving the PIN value so the PIN itself never leaves the ATM.

PIN scheme (details and rationale in sql/README.md): ``pin_value = scrypt(PIN digits,
HMAC-SHA256(pepper, "atmguard-pin-v1" + salt))``; the server stores ``SHA-256(pin_value)`` and
compares in ``verify_pin``. ``provision_account`` computes the same on the bank's side.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Self

from atmguard.config import Settings, relative_to_config
from atmguard.errors import AtmguardError, ConfigError
from atmguard.lifecycle import Managed
from atmguard.store.records import (
    GENESIS_HASH,
    EventRecord,
    SnapshotRecord,
    canonical_json,
    chain_hash,
    snapshot_digest,
    verify_chain,
)

if TYPE_CHECKING:
    import pymysql.connections

    Connection = pymysql.connections.Connection

logger = logging.getLogger(__name__)

# --- errors ----------------------------------------------------------------------------------


class CentralError(AtmguardError):
    """Root of the central server's errors."""


class CentralUnavailableError(CentralError, ConnectionError):
    """Transient: the server is down, unreachable, timed out, deadlocked or refused us for now.

    Nothing was stored by the failed call (its transaction was rolled back); retry later.
    """


class CentralAccessDeniedError(CentralUnavailableError):
    """The server refused this login or a statement (wrong password, missing grant, login not
    registered as an ATM). Retrying after a back-off is right, but someone must fix the setup."""


class CentralTlsError(CentralUnavailableError):
    """TLS failed: the server's certificate is not from the configured CA, is for another host
    name, or the server does not offer TLS. Never falls back to plaintext."""


class RecordRejectedError(CentralError, ValueError):
    """Permanent for one record: it can never be stored as it is (dead-letter it).

    The whole batch it came in was rolled back; the other records can be sent again.
    """

    def __init__(self, uuid: str, reason: str) -> None:
        self.uuid = uuid
        self.reason = reason
        super().__init__(f"record {uuid} rejected: {reason}")


class RecordConflictError(RecordRejectedError):
    """The server holds a record with this uuid and different content."""


class InvalidPinError(AtmguardError, ValueError):
    """A PIN or PAN given to the KDF is not digits of an allowed length (content never shown)."""


# --- PIN and PAN derivation ------------------------------------------------------------------

PIN_KDF_ID = "scrypt-n16384-r8-p1-hmacsha256pepper-v1"
"""Stored in accounts.pin_kdf: which derivation made the verifier, so the cost can be raised later."""
# 16 MiB and ~50 ms on one x86 core, more on a Pi: slow for a brute force, fine once per card.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
PIN_VALUE_BYTES = 32
PAN_HMAC_BYTES = 32
PIN_SALT_BYTES = 16
_MIN_SECRET_BYTES = 16


def _digits_view(value: object, *, what: str, min_len: int, max_len: int) -> memoryview:
    """A byte view of ASCII digits; refuses ``str`` so a PIN is never turned into an immutable string."""
    if isinstance(value, str):
        raise TypeError(f"{what} must be a bytes-like buffer of ASCII digits, not str")
    try:
        view = memoryview(value).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like buffer of ASCII digits") from None
    if not min_len <= len(view) <= max_len or any(b < 0x30 or b > 0x39 for b in view):
        length = len(view)
        view.release()
        raise InvalidPinError(f"{what} must be {min_len}-{max_len} ASCII digits (got {length} byte(s))")
    return view


def derive_pin_value(pin: object, *, salt: bytes, pepper: bytes) -> bytes:
    """The 32-byte value the ATM sends instead of the PIN: scrypt(PIN, HMAC(pepper, salt)).

    ``pin`` is a bytes-like buffer of 4-12 ASCII digits (e.g. PinBuffer.reveal()'s memoryview);
    the digits are read in place and never copied into a str or bytes. The pepper is a fleet
    secret held by the ATMs and the bank, not by the database: a leaked accounts table alone
    does not allow testing PIN guesses.
    """
    if len(salt) != PIN_SALT_BYTES:
        raise ValueError(f"salt must be {PIN_SALT_BYTES} bytes")
    if len(pepper) < _MIN_SECRET_BYTES:
        raise ValueError(f"pepper must be at least {_MIN_SECRET_BYTES} bytes")
    view = _digits_view(pin, what="PIN", min_len=4, max_len=12)
    try:
        peppered_salt = hmac.new(pepper, b"atmguard-pin-v1" + bytes(salt), hashlib.sha256).digest()
        return hashlib.scrypt(
            view,
            salt=peppered_salt,
            n=_SCRYPT_N,
            r=_SCRYPT_R,
            p=_SCRYPT_P,
            maxmem=_SCRYPT_MAXMEM,
            dklen=PIN_VALUE_BYTES,
        )
    finally:
        view.release()


def pin_verifier(pin_value: bytes) -> bytes:
    """What the server stores: SHA-256 of the PIN value (the same as ``UNHEX(SHA2(v, 256))``)."""
    return hashlib.sha256(pin_value).digest()


def pan_hmac(pan: object, *, key: bytes) -> bytes:
    """HMAC-SHA256 of the PAN (bytes-like ASCII digits) under the bank's PAN key: the account key."""
    if len(key) < _MIN_SECRET_BYTES:
        raise ValueError(f"PAN key must be at least {_MIN_SECRET_BYTES} bytes")
    view = _digits_view(pan, what="PAN", min_len=12, max_len=19)
    try:
        return hmac.new(key, view, hashlib.sha256).digest()
    finally:
        view.release()


def mask_pan(pan: object) -> str:
    """First 6 and last 4 digits, the rest as ``*``: the most of a PAN that may be shown or stored."""
    view = _digits_view(pan, what="PAN", min_len=12, max_len=19)
    try:
        digits = bytes(view[:6]).decode() + "*" * (len(view) - 10) + bytes(view[-4:]).decode()
    finally:
        view.release()
    return digits


class PinResult(StrEnum):
    OK = "OK"
    WRONG_PIN = "WRONG_PIN"
    LOCKED = "LOCKED"
    """Too many wrong PINs (now or before): the card must not be served."""
    HOT_LISTED = "HOT_LISTED"
    CLOSED = "CLOSED"
    UNKNOWN_CARD = "UNKNOWN_CARD"


@dataclass(frozen=True, slots=True)
class PinCheck:
    result: PinResult
    attempts_left: int
    """After this check; 0 unless OK or WRONG_PIN."""

    @property
    def ok(self) -> bool:
        return self.result is PinResult.OK


class CardStatus(StrEnum):
    ACTIVE = "active"
    HOT_LISTED = "hot_listed"
    CLOSED = "closed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CardState:
    status: CardStatus
    pin_locked: bool


@dataclass(frozen=True, slots=True)
class PinSalt:
    salt: bytes
    kdf: str


# --- connection ------------------------------------------------------------------------------


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``[central]``, or None when ``tls_ca_file`` is empty (no TLS).

    CERT_REQUIRED and host-name checking: PyMySQL's ``ssl_ca`` alone does not verify the
    host name, an explicit context does.
    """
    central = settings.central
    if not central.tls_ca_file:
        return None
    ca_file = relative_to_config(settings, central.tls_ca_file)
    source = settings.source
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, [f"{source}: central.tls_ca_file: cannot load {ca_file}: {exc}"]) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if central.tls_cert_file:
        cert_file = relative_to_config(settings, central.tls_cert_file)
        key_file = relative_to_config(settings, central.tls_key_file)
        try:
            context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                source, [f"{source}: central.tls_cert_file: cannot load {cert_file} / {key_file}: {exc}"]
            ) from None
    return context


def connect(
    settings: Settings,
    *,
    user: str | None = None,
    password: str | None = None,
    database: str | None = None,
    environ: Mapping[str, str] = os.environ,
    autocommit: bool = True,
) -> Connection:
    """A PyMySQL connection to ``[central]``: TLS-verified when ``tls_ca_file`` is set, never
    plaintext then; the password from ``central.password_file`` or the systemd credential
    unless given (admin tools pass their own ``user``/``password``). ``database``: None for
    ``central.database``, "" for no default database.

    Raises CentralTlsError, CentralAccessDeniedError, CentralUnavailableError, CredentialError
    or ConfigError; none of them contains the password.
    """
    import pymysql

    from atmguard.store.credentials import central_password

    central = settings.central
    context = tls_context(settings)
    kwargs: dict[str, Any] = {"ssl": context} if context is not None else {"ssl_disabled": True}
    secret = central_password(settings, environ=environ) if password is None else password
    where = f"{central.host}:{central.port}"
    try:
        conn = pymysql.connect(
            host=central.host,
            port=central.port,
            user=user or central.user,
            password=secret,
            database=central.database if database is None else (database or None),
            connect_timeout=central.connect_timeout_s,
            read_timeout=central.read_timeout_s,
            write_timeout=central.write_timeout_s,
            charset="utf8mb4",
            autocommit=autocommit,
            **kwargs,
        )
    except pymysql.err.MySQLError as exc:
        raise classify_error(exc, where=where) from None
    logger.info(
        "connected to central %s as %s (%s)",
        where,
        user or central.user,
        "TLS verified" if context else "no TLS",
    )
    return conn


# --- error classification --------------------------------------------------------------------

_TRANSIENT_ERRNOS = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1062,  # duplicate key: only a race with a concurrent sender can reach it; a retry resolves it
        1205,  # lock wait timeout
        1213,  # deadlock
        1290,  # read-only (failover in progress)
        1317,  # query interrupted
        1792,  # read-only transaction
        1836,  # read-only mode
        1927,  # MariaDB: connection killed
        1969,  # MariaDB: max_statement_time exceeded
        2002, 2003, 2006, 2013, 2014, 2055,  # client: cannot connect, gone away, lost, out of sync
        3024,  # MySQL: max_execution_time exceeded
        4031,  # MySQL: disconnected by the server (inactivity)
    }
)  # fmt: skip
_ACCESS_ERRNOS = frozenset({1044, 1045, 1142, 1143, 1227, 1251, 1370, 3159})
_RECORD_ERRNOS = frozenset(
    {
        1048,  # column cannot be null
        1153,  # packet bigger than max_allowed_packet
        1264,  # out of range
        1265,  # data truncated
        1292,  # incorrect value (date, number)
        1300,  # invalid character string
        1366,  # incorrect string value (bad UTF-8)
        1406,  # data too long
        1452,  # foreign key fails
        3140,  # MySQL: invalid JSON
        3819,  # MySQL: check constraint violated
        4025,  # MariaDB: check constraint (JSON_VALID) failed
        4038,  # MariaDB: JSON syntax error
    }
)
_SSL_ERRNO = 2026


def classify_error(exc: BaseException, *, where: str, uuid: str | None = None) -> CentralError:
    """Map a PyMySQL error to transient / access / TLS / per-record errors (``uuid``: the record
    the failed statement was storing, if any)."""
    import pymysql

    if isinstance(exc, pymysql.err.InterfaceError):
        return CentralUnavailableError(f"central {where}: connection unusable ({exc})")
    if not isinstance(exc, pymysql.err.MySQLError):
        return CentralUnavailableError(f"central {where}: {type(exc).__name__}: {exc}")
    args = exc.args
    errno = args[0] if args and isinstance(args[0], int) else 0
    message = str(args[1]) if len(args) > 1 else str(exc)
    original = getattr(exc, "original_exception", None)
    if errno == _SSL_ERRNO or isinstance(original, ssl.SSLError):
        return CentralTlsError(f"central {where}: TLS failed, not connecting in plaintext: {message}")
    if message.startswith("ATMGUARD-CONFLICT") and uuid is not None:
        return RecordConflictError(uuid, message.removeprefix("ATMGUARD-CONFLICT: "))
    if message.startswith("ATMGUARD-REJECT") and uuid is not None:
        return RecordRejectedError(uuid, message.removeprefix("ATMGUARD-REJECT: "))
    if message.startswith("ATMGUARD-DENIED"):
        return CentralAccessDeniedError(f"central {where}: {message.removeprefix('ATMGUARD-DENIED: ')}")
    if errno in _ACCESS_ERRNOS:
        return CentralAccessDeniedError(f"central {where}: access denied ({errno}): {message}")
    if errno in _RECORD_ERRNOS and uuid is not None:
        return RecordRejectedError(uuid, f"({errno}) {message}")
    if errno in _TRANSIENT_ERRNOS:
        return CentralUnavailableError(f"central {where}: ({errno}) {message}")
    # Unknown errors (a schema not migrated yet, a server bug) are retried, never dead-lettered:
    # losing evidence is worse than retrying in vain until someone looks.
    return CentralUnavailableError(f"central {where}: unexpected error ({errno}): {message}")


# --- the store -------------------------------------------------------------------------------

_STATEMENT_OVERHEAD_BYTES = 2048


class CentralStore(Managed):
    """The ATM's view of the central server: card checks and idempotent record upload.

    ``connect_fn`` makes a new connection (``connect(settings)`` in production). A failed call
    drops its connection and the next call opens a new one. Calls are serialised by a lock;
    give each thread that talks to the server (controller, sync worker) its own store, so a
    PIN check never waits behind a large snapshot upload.
    """

    def __init__(
        self,
        connect_fn: Callable[[], Connection],
        *,
        atm_id: str,
        where: str = "server",
    ) -> None:
        self._connect_fn = connect_fn
        self.atm_id = atm_id
        self._where = where
        self._conn: Connection | None = None
        self._max_packet_bytes = 0
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        central = settings.central
        return cls(lambda: connect(settings), atm_id=settings.atm.id, where=f"{central.host}:{central.port}")

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        with self._lock:
            self._connection()

    def close(self) -> None:
        with self._lock:
            self._drop()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _connection(self) -> Connection:
        if self._conn is None:
            import pymysql

            try:
                conn = self._connect_fn()
            except pymysql.err.MySQLError as exc:
                raise classify_error(exc, where=self._where) from None
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT @@max_allowed_packet")
                    row = cursor.fetchone()
            except pymysql.err.MySQLError as exc:
                conn.close()
                raise classify_error(exc, where=self._where) from None
            self._max_packet_bytes = int(row[0]) if row else 16 * 1024 * 1024
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the central connection failed", exc_info=True)

    def _fail(self, exc: BaseException, *, uuid: str | None = None) -> CentralError:
        """Classify; drop the connection unless the error concerns one record only."""
        error = classify_error(exc, where=self._where, uuid=uuid)
        if not isinstance(error, RecordRejectedError):
            self._drop()
            logger.warning("%s", error)
        return error

    def _call(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One CALL in autocommit mode; the rows of its first result set."""
        import pymysql

        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql, args)
                    rows = list(cursor.fetchall())
                    while cursor.nextset():  # a CALL ends with a status result: read it all
                        pass
                return rows
            except (pymysql.err.MySQLError, OSError) as exc:
                raise self._fail(exc) from None

    # --- cards and PINs ----------------------------------------------------------------------

    def card_state(self, pan_hmac: bytes) -> CardState:
        """Status of a card (hot-listed, closed, unknown) and whether its PIN is locked."""
        _check_len(pan_hmac, PAN_HMAC_BYTES, "pan_hmac")
        rows = self._call("CALL hot_list_status(%s)", (bytes(pan_hmac),))
        if len(rows) != 1:
            raise CentralError("hot_list_status returned no row")
        status, locked = rows[0]
        return CardState(CardStatus(status), bool(locked))

    def pin_salt(self, pan_hmac: bytes) -> PinSalt | None:
        """The card's salt and KDF name, None for an unknown card."""
        _check_len(pan_hmac, PAN_HMAC_BYTES, "pan_hmac")
        rows = self._call("CALL pin_salt(%s)", (bytes(pan_hmac),))
        if not rows:
            return None
        salt, kdf = rows[0]
        return PinSalt(bytes(salt), str(kdf))

    def verify_pin(self, pan_hmac: bytes, pin_value: bytes) -> PinCheck:
        """Have the server compare a derived PIN value and count the attempt.

        Not retried on a lost connection: the attempt may have been counted, so the caller
        fails closed (refuses the transaction) instead of trying again.
        """
        _check_len(pan_hmac, PAN_HMAC_BYTES, "pan_hmac")
        _check_len(pin_value, PIN_VALUE_BYTES, "pin_value")
        rows = self._call("CALL verify_pin(%s, %s, %s)", (self.atm_id, bytes(pan_hmac), bytes(pin_value)))
        if len(rows) != 1:
            raise CentralError("verify_pin returned no result")
        result, attempts_left = rows[0]
        return PinCheck(PinResult(result), int(attempts_left))

    def check_pin(self, pan_hmac: bytes, pin: object, *, pepper: bytes) -> PinCheck:
        """Salt lookup, local derivation and ``verify_pin`` in one: what the controller calls."""
        salt = self.pin_salt(pan_hmac)
        if salt is None:
            return PinCheck(PinResult.UNKNOWN_CARD, 0)
        if salt.kdf != PIN_KDF_ID:
            # An ATM must not guess at a derivation: a mismatch would count as a wrong PIN.
            raise CentralError(f"account uses PIN KDF {salt.kdf!r}; this ATM knows only {PIN_KDF_ID!r}")
        return self.verify_pin(pan_hmac, derive_pin_value(pin, salt=salt.salt, pepper=pepper))

    def face_templates(self, pan_hmac: bytes, *, model_id: str) -> list[bytes]:
        """Enrolled templates of a consenting, active card holder for one model (issue 7)."""
        _check_len(pan_hmac, PAN_HMAC_BYTES, "pan_hmac")
        rows = self._call("CALL face_template(%s, %s)", (bytes(pan_hmac), model_id))
        return [bytes(template) for _id, template in rows]

    # --- records -----------------------------------------------------------------------------

    def chain_head(self) -> tuple[int, str]:
        """(seq, hash) of the newest event the server holds for this ATM; (0, GENESIS) if none."""
        rows = self._call("CALL atm_chain_head()", ())
        if not rows:
            return 0, GENESIS_HASH
        _atm, seq, head = rows[0]
        return int(seq), str(head)

    def insert_events(self, records: Sequence[EventRecord]) -> None:
        """Store a batch in one transaction; records already stored identically are skipped.

        RecordRejectedError (or RecordConflictError: same uuid, different content) names the
        first bad record; nothing of the batch is stored then. CentralUnavailableError: retry.
        """
        statements: list[tuple[str, str]] = []
        for record in records:
            _check_event(record, atm_id=self.atm_id)
            try:
                payload = canonical_json(record.payload)
            except (TypeError, ValueError) as exc:
                raise RecordRejectedError(record.uuid, f"payload is not JSON: {exc}") from None
            statements.append(
                (
                    record.uuid,
                    _call_sql(
                        "ingest_event",
                        (
                            record.atm_id,
                            record.uuid,
                            record.seq,
                            record.kind,
                            record.t_wall,
                            record.session_id,
                            payload,
                            record.prev_hash,
                            record.hash,
                        ),
                    ),
                )
            )
        self._run_batch(statements)

    def insert_snapshots(self, records: Sequence[SnapshotRecord]) -> None:
        """Like ``insert_events``, for sealed snapshots (sha256 checked before sending)."""
        statements: list[tuple[str, str]] = []
        for record in records:
            _check_snapshot(record, atm_id=self.atm_id)
            statements.append(
                (
                    record.uuid,
                    _call_sql(
                        "ingest_snapshot",
                        (
                            record.atm_id,
                            record.uuid,
                            record.event_uuid,
                            record.session_id,
                            record.reason,
                            bool(record.is_fraud_evidence),
                            record.t_wall,
                            bytes(record.sealed_frame),
                            None if record.sealed_crop is None else bytes(record.sealed_crop),
                            record.sha256,
                        ),
                    ),
                )
            )
        self._run_batch(statements)

    def _run_batch(self, statements: Iterable[tuple[str, str]]) -> None:
        import pymysql

        batch = list(statements)
        if not batch:
            return
        with self._lock:
            conn = self._connection()
            for uuid, sql in batch:
                size = len(sql.encode("utf-8", "surrogateescape")) + _STATEMENT_OVERHEAD_BYTES
                if size > self._max_packet_bytes:
                    raise RecordRejectedError(
                        uuid,
                        f"record needs a {size}-byte statement; the server accepts at most "
                        f"{self._max_packet_bytes} (max_allowed_packet)",
                    )
            current: str | None = None
            try:
                conn.begin()
                with conn.cursor() as cursor:
                    for uuid, sql in batch:
                        current = uuid
                        cursor.execute(sql)
                        while cursor.nextset():
                            pass
                current = None
                conn.commit()
            except (pymysql.err.MySQLError, OSError) as exc:
                error = self._fail(exc, uuid=current)
                if self._conn is not None:
                    try:
                        conn.rollback()
                    except (pymysql.err.MySQLError, OSError):
                        self._drop()
                raise error from None
        logger.debug("stored a batch of %d record(s) on central %s", len(batch), self._where)

    # --- bank side ---------------------------------------------------------------------------

    def verify_chain(self, atm_id: str, *, page_size: int = 5000) -> list[str]:
        """Re-verify an ATM's stored chain (bank side: needs SELECT on events, which ATMs lack).

        Problems as records.verify_chain words them, plus gaps between pages and a head that
        does not match ``atms``; empty when the chain holds from seq 1 to the head.
        """
        import pymysql

        problems: list[str] = []
        prev_hash = GENESIS_HASH
        last_seq = 0
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cursor:
                    while True:
                        cursor.execute(
                            "SELECT uuid, seq, atm_id, kind, t_wall, session_id, payload, prev_hash, hash"
                            " FROM events WHERE atm_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                            (atm_id, last_seq, page_size),
                        )
                        rows = cursor.fetchall()
                        if not rows:
                            break
                        page = [EventRecord.from_row(row) for row in rows]
                        if page[0].seq != last_seq + 1:
                            problems.append(
                                f"seq {page[0].seq}: expected seq {last_seq + 1} (a record is missing)"
                            )
                        problems += verify_chain(page, prev_hash=prev_hash)
                        prev_hash = page[-1].hash
                        last_seq = page[-1].seq
                    cursor.execute(
                        "SELECT chain_head_seq, chain_head_hash FROM atms WHERE atm_id = %s", (atm_id,)
                    )
                    head = cursor.fetchone()
            except (pymysql.err.MySQLError, OSError) as exc:
                raise self._fail(exc) from None
        if head is None:
            problems.append(f"ATM {atm_id} is not registered")
        elif int(head[0]) != last_seq or str(head[1]) != prev_hash:
            problems.append(
                f"atms.chain_head (seq {head[0]}) does not match the stored chain (seq {last_seq})"
            )
        return problems


def _check_len(value: bytes, expected: int, what: str) -> None:
    if len(value) != expected:
        raise ValueError(f"{what} must be {expected} bytes, got {len(value)}")


def _check_event(record: EventRecord, *, atm_id: str) -> None:
    if record.atm_id != atm_id:
        raise RecordRejectedError(record.uuid, f"event of ATM {record.atm_id!r}, this is ATM {atm_id!r}")
    if chain_hash(record.prev_hash, record.body()) != record.hash:
        raise RecordRejectedError(record.uuid, "hash does not match the event's contents")


def _check_snapshot(record: SnapshotRecord, *, atm_id: str) -> None:
    if record.atm_id != atm_id:
        raise RecordRejectedError(record.uuid, f"snapshot of ATM {record.atm_id!r}, this is ATM {atm_id!r}")
    if snapshot_digest(record.sealed_frame, record.sealed_crop) != record.sha256:
        raise RecordRejectedError(record.uuid, "sha256 does not match the sealed blobs")


def _call_sql(procedure: str, args: Sequence[Any]) -> str:
    """``CALL procedure(...)`` with every argument escaped by PyMySQL, built once."""
    from pymysql.converters import escape_item

    escaped = ", ".join(_escape(value, escape_item) for value in args)
    return f"CALL {procedure}({escaped})"


def _escape(value: Any, escape_item: Callable[..., str]) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        from pymysql.converters import escape_bytes

        return escape_bytes(bytes(value))
    return escape_item(value, "utf8mb4")


# --- bank side: provisioning (in production: the bank's HSM / back office) --------------------


def provision_account(
    admin_conn: Connection,
    pan: object,
    pin: object,
    *,
    pan_key: bytes,
    pepper: bytes,
    status: CardStatus | str = CardStatus.ACTIVE,
    max_pin_attempts: int = 3,
    salt: bytes | None = None,
) -> bytes:
    """Create or re-PIN an account; returns its pan_hmac. Resets the attempt counter and lock.

    Computes what the ATM will compute (pan_hmac, salt, pin value) and stores only
    SHA-256(pin value). ``admin_conn`` is a bank connection to the central database.
    """
    key = pan_hmac(pan, key=pan_key)
    masked = mask_pan(pan)
    salt = secrets.token_bytes(PIN_SALT_BYTES) if salt is None else salt
    verifier = pin_verifier(derive_pin_value(pin, salt=salt, pepper=pepper))
    with admin_conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO accounts (pan_hmac, pan_masked, pin_salt, pin_verifier, pin_kdf, status,"
            " failed_pin_attempts, max_pin_attempts, locked_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, 0, %s, NULL)"
            " ON DUPLICATE KEY UPDATE pan_masked = VALUES(pan_masked), pin_salt = VALUES(pin_salt),"
            " pin_verifier = VALUES(pin_verifier), pin_kdf = VALUES(pin_kdf), status = VALUES(status),"
            " failed_pin_attempts = 0, max_pin_attempts = VALUES(max_pin_attempts), locked_at = NULL",
            (key, masked, salt, verifier, PIN_KDF_ID, str(CardStatus(status)), max_pin_attempts),
        )
    admin_conn.commit()
    logger.info("provisioned account %s", masked)
    return key


def set_card_status(admin_conn: Connection, pan_hmac_value: bytes, status: CardStatus | str) -> None:
    """Hot-list, close or re-activate a card (bank side)."""
    value = CardStatus(status)
    if value is CardStatus.UNKNOWN:
        raise ValueError("'unknown' is not a status an account can have")
    with admin_conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM accounts WHERE pan_hmac = %s", (pan_hmac_value,))
        if cursor.fetchone() is None:
            raise CentralError("no such account")
        cursor.execute("UPDATE accounts SET status = %s WHERE pan_hmac = %s", (str(value), pan_hmac_value))
    admin_conn.commit()
