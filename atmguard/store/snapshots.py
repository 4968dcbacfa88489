"""Sealed evidence snapshots: JPEG-encode a frame in memory, then seal it to the bank's key.

A sealed blob is exactly libsodium's ``crypto_box_seal`` output (32-byte ephemeral public key,
ciphertext, 16-byte tag), so any libsodium binding can open it with the bank's private key.
The plaintext JPEG never touches the disk on the ATM, and the ATM cannot open what it wrote.
"""

from __future__ import annotations

import io
import logging
import os
from typing import TYPE_CHECKING, Self

from atmguard.errors import AtmguardError
from atmguard.store.keys import key_id, load_private_key, load_public_key, public_key_from_settings

if TYPE_CHECKING:
    import numpy as np
    from nacl.public import PrivateKey, PublicKey

    from atmguard.config import Settings
    from atmguard.store.journal import Journal
    from atmguard.store.records import SnapshotRecord

logger = logging.getLogger(__name__)

SEAL_OVERHEAD_BYTES = 48
"""What a sealed box adds to its plaintext: ephemeral public key (32) + authentication tag (16)."""
JPEG_SOI = b"\xff\xd8\xff"


class SnapshotError(AtmguardError, ValueError):
    """A frame cannot be encoded (wrong dtype, shape or size) or a quality is out of range."""


class SnapshotOpenError(SnapshotError):
    """A sealed blob cannot be opened: wrong private key, or the blob was altered or truncated."""


def encode_jpeg(image: np.ndarray, *, quality: int) -> bytes:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 array as a baseline JPEG, in memory."""
    import numpy as np
    from PIL import Image

    if not 1 <= quality <= 95:
        # Pillow's docs: above 95 the file grows with no visible gain.
        raise SnapshotError(f"JPEG quality must be 1..95, got {quality}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise SnapshotError(
            f"expected a uint8 numpy array, got {getattr(image, 'dtype', type(image).__name__)}"
        )
    if not (image.ndim == 3 and image.shape[2] == 3) and image.ndim != 2:
        raise SnapshotError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1 or max(image.shape[:2]) > 65_500:
        raise SnapshotError(f"image size {image.shape[1]}x{image.shape[0]} cannot be a JPEG")
    buffer = io.BytesIO()
    # No EXIF or comments: nothing about the ATM leaks beyond the pixels, and the journal
    # event carries the time and reason.
    # uint8 (H, W, 3) becomes RGB and (H, W) becomes L: fromarray infers it (its mode= is deprecated).
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality, optimize=False)
    return buffer.getvalue()


class SnapshotSealer:
    """Seals evidence to the bank's public key. Holds no secret: the ATM cannot open its own output."""

    def __init__(self, public_key: PublicKey | bytes) -> None:
        from nacl.public import PublicKey, SealedBox

        self._public_key = public_key if isinstance(public_key, PublicKey) else PublicKey(bytes(public_key))
        self._box = SealedBox(self._public_key)
        self.key_id = key_id(self._public_key)
        """Fingerprint of the bank key, recorded in each ``snapshot_taken`` event."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """Load ``journal.bank_public_key_file``; a KeyFileError names that key when it is unusable."""
        return cls(public_key_from_settings(settings))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        return cls(load_public_key(path))

    def seal(self, plaintext: bytes) -> bytes:
        return self._box.encrypt(plaintext)

    def seal_frame(
        self, rgb: np.ndarray, crop: np.ndarray | None, *, quality: int
    ) -> tuple[bytes, bytes | None]:
        """JPEG-encode the full frame (and the face crop) and seal each; returns (sealed_frame, sealed_crop)."""
        sealed_frame = self.seal(encode_jpeg(rgb, quality=quality))
        sealed_crop = None if crop is None else self.seal(encode_jpeg(crop, quality=quality))
        return sealed_frame, sealed_crop


def seal_and_store(
    journal: Journal,
    sealer: SnapshotSealer,
    rgb: np.ndarray,
    crop: np.ndarray | None,
    *,
    reason: str,
    is_fraud_evidence: bool,
    quality: int,
    session_id: str | None = None,
) -> SnapshotRecord:
    """Encode and seal first (tens of milliseconds of CPU), then commit: the journal's writer lock
    is held only for the write, so event appends never wait behind a JPEG encoder."""
    sealed_frame, sealed_crop = sealer.seal_frame(rgb, crop, quality=quality)
    return journal.add_snapshot(
        sealed_frame,
        sealed_crop=sealed_crop,
        reason=reason,
        is_fraud_evidence=is_fraud_evidence,
        session_id=session_id,
        key_id=sealer.key_id,
    )


def open_sealed(private_key: PrivateKey | bytes, blob: bytes) -> bytes:
    """Bank side: decrypt one sealed blob (raises SnapshotOpenError for a wrong key or altered blob)."""
    from nacl.exceptions import CryptoError
    from nacl.public import PrivateKey, SealedBox

    key = private_key if isinstance(private_key, PrivateKey) else PrivateKey(bytes(private_key))
    if len(blob) < SEAL_OVERHEAD_BYTES:
        raise SnapshotOpenError(f"sealed blob too short ({len(blob)} bytes)")
    try:
        return SealedBox(key).decrypt(bytes(blob))
    except CryptoError:
        raise SnapshotOpenError(
            "cannot open sealed snapshot: wrong private key, or the blob was altered"
        ) from None


def open_sealed_file(private_key_file: str | os.PathLike[str], blob: bytes) -> bytes:
    return open_sealed(load_private_key(private_key_file), blob)
