"""The records the journal keeps and the sync worker sends, and their hash chain.

One definition shared by the ATM (journal), the sync worker and the central side, so the hash
of a record is computed the same way everywhere: the central server can re-verify a chain it
received without trusting the ATM's arithmetic.

Payloads are JSON objects of non-secret facts. A PIN, a full PAN or track data must never be put
in one: use a masked PAN (first 6 / last 4 at most) or the keyed PAN hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of an ATM's first event."""

SyncState = Literal["pending", "synced", "dead"]


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept, NaN/Infinity refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One journaled event, as committed locally and as sent to the central server."""

    uuid: str
    """Idempotency key (UUID4, lowercase hex with dashes), given at creation."""
    seq: int
    """Local sequence number: strictly increasing per ATM, starting at 1."""
    atm_id: str
    kind: str
    """Event type, e.g. ``card_inserted``, ``pin_result``, ``face_state``, ``decision``."""
    t_wall: str
    """UTC wall-clock time, ISO 8601 with microseconds and ``Z``."""
    session_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Self:
        """A record from a row of (uuid, seq, atm_id, kind, t_wall, session_id, payload as JSON text,
        prev_hash, hash): the column order of the local journal and the central server alike."""
        uuid, seq, atm_id, kind, t_wall, session_id, payload, prev_hash, digest = row
        return cls(
            uuid=uuid,
            seq=int(seq),
            atm_id=atm_id,
            kind=kind,
            t_wall=t_wall,
            session_id=session_id,
            payload=json.loads(payload),
            prev_hash=prev_hash,
            hash=digest,
        )

    def body(self) -> dict[str, Any]:
        """The fields the hash covers (everything except the hashes themselves)."""
        return {
            "uuid": self.uuid,
            "seq": self.seq,
            "atm_id": self.atm_id,
            "kind": self.kind,
            "t_wall": self.t_wall,
            "session_id": self.session_id,
            "payload": self.payload,
        }


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical JSON of this record's body (hex)."""
    digest = hashlib.sha256()
    digest.update(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical_json(body).encode("utf-8"))
    return digest.hexdigest()


def verify_chain(records: list[EventRecord], *, prev_hash: str = GENESIS_HASH) -> list[str]:
    """Problems found in a run of consecutive records (empty when the chain holds)."""
    problems: list[str] = []
    expected_seq = records[0].seq if records else 0
    for record in records:
        if record.seq != expected_seq:
            problems.append(f"seq {record.seq}: expected seq {expected_seq} (a record is missing)")
        if record.prev_hash != prev_hash:
            problems.append(f"seq {record.seq}: prev_hash does not match the previous record's hash")
        if chain_hash(record.prev_hash, record.body()) != record.hash:
            problems.append(f"seq {record.seq}: hash does not match its contents (altered)")
        prev_hash = record.hash
        expected_seq = record.seq + 1
    return problems


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One sealed evidence snapshot. The ATM cannot open the sealed blobs; only the bank can."""

    uuid: str
    atm_id: str
    session_id: str | None
    event_uuid: str
    """The ``snapshot_taken`` event that puts this snapshot (and its sha256) in the hash chain."""
    reason: str
    """Why it was taken, e.g. ``uncovered``, ``covered_timeout``, ``hot_listed``, ``retained``."""
    is_fraud_evidence: bool
    """Unsynced fraud evidence is never purged, whatever the disk pressure."""
    t_wall: str
    sealed_frame: bytes
    """Full-resolution JPEG sealed to the bank's public key."""
    sealed_crop: bytes | None
    """Face crop JPEG sealed the same way, when a face was found."""
    sha256: str
    """SHA-256 (hex) of ``sealed_frame`` followed by ``sealed_crop`` (if any)."""


def snapshot_digest(sealed_frame: bytes, sealed_crop: bytes | None) -> str:
    digest = hashlib.sha256(sealed_frame)
    if sealed_crop is not None:
        digest.update(sealed_crop)
    return digest.hexdigest()
