"""The file primitives every layer shares: sha256 of a file, atomic writes, default permissions.

A leaf module like `ava.config` and `ava.dist`: it imports nothing of Ava's, so the model, data
and Hugging Face layers may use it. One implementation of each, so that every file Ava writes is
hashed, published and permissioned the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Union

HASH_CHUNK = 1 << 20
_UMASK_LOCK = threading.Lock()


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename inside `path` durable; a no-op where the file system cannot fsync a directory
    (some FUSE and object-store mounts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path` (same directory, so the rename is atomic), unique per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Union[str, Path], write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """`write(tmp)` to a hidden sibling, then fsync and rename it over `path`: a reader sees the old
    file or the whole new one, never a torn write. `durable` (the default) also makes it survive
    a power loss: the file is fsynced before the rename and the directory after it."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: Union[str, Path], text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def apply_default_modes(root: Union[str, Path]) -> None:
    """Give `root` and everything under it the modes a plain `open`/`mkdir` would have under the
    user's umask (files 0666 & ~umask, directories 0777 & ~umask). Temporary directories are
    created private (0700), so a directory built in one and renamed into place would otherwise
    stay unreadable to a colleague or a serving account."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for path in _walk(root):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            yield Path(dirpath) / name
