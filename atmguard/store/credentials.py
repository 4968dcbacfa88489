"""Secrets from files: a path (mode 0600) or a systemd credential in ``$CREDENTIALS_DIRECTORY``.

Never from the config file, never from the command line (visible in ``ps``). A file that other
users could read or write is refused: the secret may already have leaked, and the owner should
know. Nothing here logs or raises with a secret's content, only its name and where it was looked for.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from atmguard.config import Settings, relative_to_config
from atmguard.errors import AtmguardError

logger = logging.getLogger(__name__)

CREDENTIALS_ENV_VAR = "CREDENTIALS_DIRECTORY"
"""Set by systemd for a unit with ``LoadCredential=``/``SetCredential=``."""

MAX_SECRET_BYTES = 64 * 1024


class CredentialError(AtmguardError, PermissionError):
    """A secret is missing, unreadable, empty or too widely readable; says which and where."""


def _strip_newline(data: bytes) -> bytes:
    # Editors and `echo` add one trailing newline; a secret never legitimately ends with one.
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


MIN_KEY_BYTES = 16


def read_secret_file(path: str | os.PathLike[str], *, what: str, check_mode: bool = True) -> bytes:
    """The bytes of a secret file (one trailing newline removed); refuses mode bits beyond 0600."""
    location = os.fspath(path)
    try:
        # O_NOFOLLOW is not used: credential directories and deploy tools legitimately use links.
        fd = os.open(location, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialError(f"{what}: {location} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"{what}: cannot open {location}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialError(f"{what}: {location} is not a regular file")
        if check_mode and info.st_mode & 0o077:
            raise CredentialError(
                f"{what}: {location} is accessible to group/others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {location}"
            )
        if info.st_size > MAX_SECRET_BYTES:
            raise CredentialError(f"{what}: {location} is {info.st_size} bytes, not a secret")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = _strip_newline(handle.read(MAX_SECRET_BYTES + 1))
    finally:
        os.close(fd)
    if not data:
        raise CredentialError(f"{what}: {location} is empty")
    return data


def read_secret(
    *,
    path: str | os.PathLike[str] = "",
    credential: str = "",
    what: str,
    environ: Mapping[str, str] = os.environ,
) -> bytes:
    """A secret from ``path`` if given, else from ``$CREDENTIALS_DIRECTORY/<credential>``."""
    if path:
        return read_secret_file(path, what=what)
    if not credential:
        raise CredentialError(f"{what}: neither a file nor a systemd credential name is configured")
    if "/" in credential or credential in (".", ".."):
        raise CredentialError(f"{what}: credential name {credential!r} must be a plain file name")
    directory = environ.get(CREDENTIALS_ENV_VAR, "")
    if not directory:
        raise CredentialError(
            f"{what}: no file configured and ${CREDENTIALS_ENV_VAR} is not set "
            f"(run under systemd with LoadCredential={credential}:<path>, or configure a file)"
        )
    return read_secret_file(Path(directory) / credential, what=what)


def _central_secret(settings: Settings, name: str, *, what: str, environ: Mapping[str, str]) -> bytes:
    """``central.<name>_file`` if set, else the systemd credential ``central.<name>_credential``."""
    central = settings.central
    file_value: str = getattr(central, f"{name}_file")
    return read_secret(
        path=relative_to_config(settings, file_value) if file_value else "",
        credential=getattr(central, f"{name}_credential"),
        what=f"{what} (central.{name}_file / central.{name}_credential)",
        environ=environ,
    )


def _key_material(settings: Settings, name: str, *, what: str, environ: Mapping[str, str]) -> bytes:
    secret = _central_secret(settings, name, what=what, environ=environ)
    if len(secret) < MIN_KEY_BYTES:
        raise CredentialError(f"{what}: shorter than {MIN_KEY_BYTES} bytes")
    return secret


def pin_pepper(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> bytes:
    """The fleet secret mixed into every PIN derivation."""
    return _key_material(settings, "pin_pepper", what="PIN pepper", environ=environ)


def pan_key(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> bytes:
    """The bank key that turns a PAN into its keyed hash."""
    return _key_material(settings, "pan_key", what="PAN HMAC key", environ=environ)


def central_password(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> str:
    """The ATM's central MySQL password: ``central.password_file`` or the systemd credential."""
    data = _central_secret(settings, "password", what="central MySQL password", environ=environ)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError("central MySQL password: not valid UTF-8") from None
