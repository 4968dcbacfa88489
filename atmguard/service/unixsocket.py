"""Listening UNIX sockets of the daemon (host socket, status socket): create them safely at a path
and remove only what we created.

- A socket file left by a previous run is replaced, but never a live socket (another atmguard is
  running) nor a file that is not a socket.
- Permissions are set before ``listen()``: until then nobody can connect, whatever the umask allowed.
- On close the path is unlinked only if it is still the socket we bound (a successor may own it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
STALE_PROBE_TIMEOUT_S = 0.5

Inode = tuple[int, int]


def bind_listener(
    path: Path, *, mode: int, backlog: int, what: str, error: type[OSError]
) -> tuple[socket.socket, Inode]:
    """A listening socket at ``path`` with ``mode``, and the (device, inode) it was created as.

    ``what`` names the socket in messages ("host socket"); problems raise ``error``.
    """
    if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise error(f"{path}: too long for a UNIX socket path ({MAX_UNIX_PATH_BYTES} bytes at most)")
    remove_stale_socket(path, what=what, error=error)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        try:
            listener.bind(str(path))
        except FileExistsError as exc:
            raise error(f"{path}: appeared while we were starting: {exc}") from exc
        except OSError as exc:
            raise error(f"{path}: cannot create the {what}: {exc.strerror or exc}") from exc
        bound = True
        os.chmod(path, mode)
        info = os.stat(path)
        listener.listen(backlog)
    except BaseException:
        listener.close()
        if bound:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return listener, (info.st_dev, info.st_ino)


def remove_stale_socket(path: Path, *, what: str, error: type[OSError]) -> None:
    """Unlink a socket file left by a previous run; refuse anything else or a live socket."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise error(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(STALE_PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listening: a leftover from a previous run
    except OSError as exc:
        raise error(f"{path}: cannot tell whether the socket is in use: {exc}") from exc
    else:
        raise error(f"{path}: another process is listening on it (is atmguard already running?)")
    finally:
        probe.close()
    logger.info("removing stale %s %s", what, path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def unlink_if_ours(path: Path, inode: Inode, *, what: str) -> None:
    """Unlink ``path`` only if it is still the socket we bound (not a successor's)."""
    try:
        info = path.lstat()
        if (info.st_dev, info.st_ino) == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s %s: %s", what, path, exc)
