"""Files on disk: written atomically with the user's umask, read strictly.

Every file the project writes (plans, results, presets' records, comparison tables) goes through
:func:`write_bytes` / :func:`write_text`: a temporary file in the same folder, flushed and synced,
then renamed over the target, so a crash or a full disk never leaves a half-written file, and the
file gets the permissions any new file of the user gets (``mkstemp`` alone would make it 0600).
Text is read with :func:`read_text`, which refuses bytes that are not UTF-8 instead of guessing.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

from .errors import DataError

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **kw: Any) -> None:
    kw.setdefault("indent", 1)
    write_text(path, json.dumps(obj, **kw) + "\n")


def read_text(path: PathLike) -> str:
    """A UTF-8 text file's content; a binary or otherwise encoded file is a :class:`DataError`."""
    p = Path(path).expanduser()
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start} cannot be decoded); give a text file") from None


def check_writable(out: PathLike, *, folder: bool = False) -> None:
    """Raise before any work if ``out`` cannot be written: a folder (``folder=True``, or a path
    without a suffix) must not be an existing file; the nearest existing parent must be a folder in
    which a file can really be created (a read-only or full disk shows up here, not hours later)."""
    p = Path(out).expanduser()
    is_folder = folder or p.is_dir() or p.suffix == ""
    if is_folder and p.exists() and not p.is_dir():
        raise DataError(f"{out} is an existing file, not a folder; choose another --out")
    if not is_folder and p.is_dir():
        raise DataError(f"{out} is a folder; give a file name")
    probe = p if is_folder else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"cannot write {out}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".wina-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DataError(f"cannot write {out}: {probe}: {e.strerror.lower() if e.strerror else e}") from None


LOCK_NAME = ".wina-lock"


@contextlib.contextmanager
def locked(folder: PathLike, what: str = "") -> Iterator[None]:
    """Hold ``folder`` for writing: a second writer (another process) gets one clear error naming
    the process that holds it. The lock is the kernel's (``flock``), so a killed writer leaves no
    stale lock behind."""
    import fcntl
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / LOCK_NAME, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise DataError(f"{what or d} is being written by process {pid}; wait for it to finish "
                            "or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()


def replace_folder(new: PathLike, target: PathLike) -> None:
    """Put the finished folder ``new`` where ``target`` is (the old one is removed only once the new
    one is in place; :func:`recover_folder` finishes a swap cut short)."""
    import shutil
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: PathLike) -> None:
    """After a crash between the two renames of :func:`replace_folder`: put the old folder back."""
    target = Path(target)
    old = target.with_name(target.name + ".replaced")
    if old.exists() and not target.exists():
        os.rename(old, target)


def sweep_temps(folder: PathLike) -> int:
    """Remove the temporary files a killed writer left in ``folder`` and below (``.NAME.*.tmp``, what
    :func:`write_bytes` makes). Call it only while holding the folder's lock (:func:`locked`), so that
    no live writer's file is taken. Returns how many were removed."""
    n = 0
    for p in Path(folder).rglob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
