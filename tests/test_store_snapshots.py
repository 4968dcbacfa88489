"""Sealed snapshots and the bank's key pair: the ATM can seal evidence it can never read back."""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path

import numpy as np
import pytest
from nacl.public import PrivateKey
from PIL import Image

from atmguard.config import settings_from_mapping
from atmguard.errors import ConfigError
from atmguard.store.journal import Journal
from atmguard.store.keys import (
    PRIVATE_KEY_FILENAME,
    PUBLIC_KEY_FILENAME,
    KeyFileError,
    KeyFileExistsError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)
from atmguard.store.snapshots import (
    JPEG_SOI,
    SEAL_OVERHEAD_BYTES,
    SnapshotError,
    SnapshotOpenError,
    SnapshotSealer,
    encode_jpeg,
    open_sealed,
    seal_and_store,
)


def scene(height: int = 360, width: int = 640) -> np.ndarray:
    """A smooth test picture (JPEG keeps it closely), distinct per channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(
        np.uint8
    )


@pytest.fixture
def bank_key() -> PrivateKey:
    return PrivateKey.generate()


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_sealed_frame_and_crop_open_only_with_the_bank_key(bank_key: PrivateKey):
    sealer = SnapshotSealer(bank_key.public_key)
    frame, crop = scene(), scene(128, 96)

    sealed_frame, sealed_crop = sealer.seal_frame(frame, crop, quality=85)

    assert sealed_crop is not None
    opened = decode(open_sealed(bank_key, sealed_frame))
    assert opened.shape == frame.shape
    assert np.abs(opened.astype(int) - frame.astype(int)).mean() < 3  # the evidence is the picture
    assert decode(open_sealed(bytes(bank_key), sealed_crop)).shape == crop.shape
    with pytest.raises(SnapshotOpenError, match="wrong private key"):
        open_sealed(PrivateKey.generate(), sealed_frame)


def test_sealed_blobs_reveal_no_jpeg_and_differ_every_time(bank_key: PrivateKey):
    sealer = SnapshotSealer(bank_key.public_key)
    frame = scene()
    first, _ = sealer.seal_frame(frame, None, quality=85)
    second, _ = sealer.seal_frame(frame, None, quality=85)
    jpeg = encode_jpeg(frame, quality=85)

    assert not first.startswith(JPEG_SOI) and b"JFIF" not in first
    assert first != second  # a fresh ephemeral key per seal: equal frames are not linkable
    assert len(first) == len(jpeg) + SEAL_OVERHEAD_BYTES


def test_seal_and_store_commits_evidence_the_bank_can_open(tmp_path: Path, bank_key: PrivateKey):
    sealer = SnapshotSealer(bank_key.public_key)
    with Journal(tmp_path / "journal.sqlite3", atm_id="ATM-0042", reserve_bytes=0) as journal:
        record = seal_and_store(
            journal,
            sealer,
            scene(),
            None,
            reason="covered_timeout",
            is_fraud_evidence=True,
            quality=85,
            session_id="s-9",
        )
        event = journal.get_event(record.event_uuid)
        stored = journal.get_snapshot(record.uuid)
    assert event is not None and event.payload["key_id"] == sealer.key_id
    assert stored == record and stored.session_id == "s-9"
    assert decode(open_sealed(bank_key, stored.sealed_frame)).shape == scene().shape


def test_a_crop_is_optional(bank_key: PrivateKey):
    sealed_frame, sealed_crop = SnapshotSealer(bank_key.public_key).seal_frame(scene(), None, quality=60)
    assert sealed_crop is None
    assert open_sealed(bank_key, sealed_frame).startswith(JPEG_SOI)


@pytest.mark.parametrize("damage", ["flip", "truncate", "short"])
def test_an_altered_blob_does_not_open(bank_key: PrivateKey, damage: str):
    blob, _ = SnapshotSealer(bank_key.public_key).seal_frame(scene(), None, quality=85)
    if damage == "flip":
        blob = blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
    elif damage == "truncate":
        blob = blob[:-1]
    else:
        blob = blob[:20]
    with pytest.raises(SnapshotOpenError):
        open_sealed(bank_key, blob)


@pytest.mark.parametrize(
    "image, quality, message",
    [
        (np.zeros((10, 10, 3), np.float32), 85, "uint8"),
        (np.zeros((10, 10, 4), np.uint8), 85, "shape"),
        (np.zeros((0, 10, 3), np.uint8), 85, "cannot be a JPEG"),
        (np.zeros((10, 10, 3), np.uint8), 0, "quality"),
        (np.zeros((10, 10, 3), np.uint8), 100, "quality"),
    ],
)
def test_unusable_frames_are_refused_with_a_clear_error(image: np.ndarray, quality: int, message: str):
    with pytest.raises(SnapshotError, match=message):
        encode_jpeg(image, quality=quality)


def test_grey_frames_are_encoded_too():
    grey = scene()[:, :, 0]
    assert decode(encode_jpeg(grey, quality=85)).shape == (*grey.shape, 3)


# --- keys ---------------------------------------------------------------------------------------


def test_keygen_writes_a_private_0600_and_public_0644_pair_that_work_together(tmp_path: Path):
    out = tmp_path / "bank"
    pair = generate_keypair(out)

    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert pair.private_key_file == out / PRIVATE_KEY_FILENAME
    assert stat.S_IMODE(pair.private_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public_key_file.stat().st_mode) == 0o644
    text = pair.public_key_file.read_text()
    assert text.endswith("\n") and len(base64.b64decode(text.strip())) == 32
    public, private = load_public_key(pair.public_key_file), load_private_key(pair.private_key_file)
    assert bytes(private.public_key) == bytes(public) and pair.key_id == key_id(public)
    sealed, _ = SnapshotSealer(public).seal_frame(scene(), None, quality=85)
    assert open_sealed(private, sealed).startswith(JPEG_SOI)


def test_keygen_never_overwrites_a_key(tmp_path: Path):
    pair = generate_keypair(tmp_path)
    before = pair.private_key_file.read_bytes()
    with pytest.raises(KeyFileExistsError, match="refusing to overwrite"):
        generate_keypair(tmp_path)
    assert pair.private_key_file.read_bytes() == before
    pair.public_key_file.unlink()  # even half a pair left over is not replaced
    with pytest.raises(KeyFileExistsError):
        generate_keypair(tmp_path)
    assert not pair.public_key_file.exists()


def test_a_raw_32_byte_key_file_is_accepted(tmp_path: Path, bank_key: PrivateKey):
    path = tmp_path / "raw.key"
    path.write_bytes(bytes(bank_key.public_key))
    assert bytes(load_public_key(path)) == bytes(bank_key.public_key)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "missing"),
        (b"", "not a 32-byte key"),
        (base64.b64encode(bytes(31)) + b"\n", "not a 32-byte key"),
        (b"not base64 at all!\n", "not a 32-byte key"),
        (base64.b64encode(bytes(32)) + b"\n", "not a usable X25519 public key"),  # all zeros: low order
    ],
)
def test_a_bad_public_key_fails_naming_its_config_key(tmp_path: Path, content: bytes | None, problem: str):
    path = tmp_path / "bank_snapshot_public.key"
    if content is not None:
        path.write_bytes(content)
    settings = settings_from_mapping({"journal": {"bank_public_key_file": str(path)}})

    with pytest.raises(KeyFileError) as caught:
        SnapshotSealer.from_settings(settings)

    assert isinstance(caught.value, ConfigError)  # the daemon refuses to start, like any config error
    assert str(caught.value).count("journal.bank_public_key_file") == 1
    assert problem in str(caught.value) and str(path) in str(caught.value)


def test_the_public_key_path_is_resolved_against_the_config_file(tmp_path: Path):
    generate_keypair(tmp_path / "keys")
    config = tmp_path / "atmguard.toml"
    config.write_text(f'[journal]\nbank_public_key_file = "keys/{PUBLIC_KEY_FILENAME}"\n')
    from atmguard.config import load_settings

    sealer = SnapshotSealer.from_settings(load_settings(config))
    assert sealer.key_id == key_id(load_public_key(tmp_path / "keys" / PUBLIC_KEY_FILENAME))


def test_a_directory_instead_of_a_key_is_reported(tmp_path: Path):
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_key(tmp_path)
