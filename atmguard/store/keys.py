"""The bank's snapshot key pair: generation (bank side) and loading (ATM and bank side).

Snapshots are sealed to an X25519 public key with libsodium's sealed box, so an ATM holds only
the public key and can write evidence it can never read back; the private key stays with the bank.

Key file format (both files): the 32 raw key bytes, standard base64, one line, newline-terminated
(44 characters + ``\\n``). Loading also accepts a file of exactly 32 raw bytes, which is what
``crypto_box_keypair`` tooling in other languages tends to write.

Generate a pair with ``atmguard snapshot keygen --out-dir DIR`` on a trusted bank machine; copy
only ``bank_snapshot_public.key`` to each ATM (config key ``journal.bank_public_key_file``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atmguard.errors import AtmguardError, ConfigError

if TYPE_CHECKING:
    from nacl.public import PrivateKey, PublicKey

    from atmguard.config import Settings

logger = logging.getLogger(__name__)

PRIVATE_KEY_FILENAME = "bank_snapshot_private.key"
PUBLIC_KEY_FILENAME = "bank_snapshot_public.key"
PUBLIC_KEY_CONFIG_KEY = "journal.bank_public_key_file"
KEY_BYTES = 32
_MAX_KEY_FILE_BYTES = 4096  # a key file is 45 bytes; anything big is the wrong file


class KeyFileError(ConfigError):
    """A key file is missing, unreadable or not a usable X25519 key.

    A ConfigError because the path comes from configuration (or a command-line option), and the
    daemon must refuse to start, naming ``key_name``, rather than run without sealing evidence.
    """

    def __init__(self, path: str | os.PathLike[str], *, key_name: str, problem: str) -> None:
        self.key_name = key_name
        self.problem = problem
        text = os.fspath(path)
        super().__init__(text, [f"{key_name}: {text}: {problem}"])


class KeyFileExistsError(AtmguardError, FileExistsError):
    """``snapshot keygen`` refuses to overwrite an existing key file (it may be the bank's only copy)."""


@dataclass(frozen=True, slots=True)
class KeyPairPaths:
    private_key_file: Path
    public_key_file: Path
    key_id: str


def key_id(public_key: PublicKey | bytes) -> str:
    """Short fingerprint of a public key (first 16 hex digits of its SHA-256): names the key in events."""
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def encode_key(raw: bytes) -> bytes:
    """The on-disk form: base64 of the 32 raw bytes, newline-terminated."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a key has {KEY_BYTES} bytes, got {len(raw)}")
    return base64.b64encode(raw) + b"\n"


def _decode_key(data: bytes) -> bytes | None:
    if len(data) == KEY_BYTES:
        return data
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_BYTES else None


def _read_key_bytes(path: Path, *, key_name: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(
            path, key_name=key_name, problem="missing (generate a pair with `atmguard snapshot keygen`)"
        ) from None
    except OSError as exc:
        raise KeyFileError(path, key_name=key_name, problem=f"cannot read: {exc.strerror or exc}") from None
    raw = _decode_key(data)
    if raw is None:
        raise KeyFileError(
            path,
            key_name=key_name,
            problem=f"not a {KEY_BYTES}-byte key (expected one line of base64, or {KEY_BYTES} raw bytes)",
        )
    return raw


def load_public_key(path: str | os.PathLike[str], *, key_name: str = PUBLIC_KEY_CONFIG_KEY) -> PublicKey:
    """Read and check the bank's public key; a trial seal rejects keys libsodium cannot use."""
    from nacl.exceptions import CryptoError
    from nacl.exceptions import RuntimeError as NaclRuntimeError
    from nacl.public import PublicKey, SealedBox

    key_path = Path(path)
    public_key = PublicKey(_read_key_bytes(key_path, key_name=key_name))
    try:
        # A low-order point (e.g. all zeros) would make every "sealed" snapshot readable by
        # anyone; libsodium refuses to seal to one, so find out now rather than at the first fraud.
        SealedBox(public_key).encrypt(b"probe")
    except (CryptoError, NaclRuntimeError):
        raise KeyFileError(key_path, key_name=key_name, problem="not a usable X25519 public key") from None
    return public_key


def load_private_key(path: str | os.PathLike[str], *, key_name: str = "--private-key") -> PrivateKey:
    """Read the bank's private key (bank side only); warns when the file is readable by others."""
    from nacl.public import PrivateKey

    key_path = Path(path)
    raw = _read_key_bytes(key_path, key_name=key_name)
    try:
        mode = key_path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s: private key is accessible to group/others (mode %o)", key_path, mode & 0o777)
    return PrivateKey(raw)


def public_key_path_from_settings(settings: Settings) -> Path:
    from atmguard.config import relative_to_config

    return relative_to_config(settings, settings.journal.bank_public_key_file)


def public_key_from_settings(settings: Settings) -> PublicKey:
    return load_public_key(public_key_path_from_settings(settings))


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    # O_EXCL: never replace an existing key, even in a race with another keygen.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileExistsError(f"{path}: already exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for 0644) kept it; be exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(out_dir: str | os.PathLike[str]) -> KeyPairPaths:
    """Write a fresh pair into ``out_dir`` (created 0700): private key 0600, public key 0644.

    Refuses (KeyFileExistsError) if either file exists, before writing anything.
    """
    from nacl.public import PrivateKey

    directory = Path(out_dir)
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)
    private_path = directory / PRIVATE_KEY_FILENAME
    public_path = directory / PUBLIC_KEY_FILENAME
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileExistsError(f"{path}: already exists; refusing to overwrite a key")
    private_key = PrivateKey.generate()
    _write_new(private_path, encode_key(bytes(private_key)), mode=0o600)
    try:
        _write_new(public_path, encode_key(bytes(private_key.public_key)), mode=0o644)
    except BaseException:
        # Half a pair is useless and the private key would be orphaned: remove it.
        private_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return KeyPairPaths(private_path, public_path, key_id(private_key.public_key))
