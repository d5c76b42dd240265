"""Files on disk: written atomically with the user's umask, read strictly.

Every file the project writes (plans, results, presets' records, comparison tables) goes through
:func:`write_bytes` / :func:`write_text`: a temporary file in the same folder, flushed and synced,
then renamed over the target, so a crash or a full disk never leaves a half-written file, and the
file gets the permissions any new file of the user gets (``mkstemp`` alone would make it 0600).
Text is read with :func:`read_text`, which refuses bytes that are not UTF-8 instead of guessing.
Names that become paths (a preset's, a variant's) follow one rule, :func:`check_name`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .errors import DataError, InvalidArgument

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (the parent folder is created)."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]     # removed again on failure
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), path.parent)
        raise DataError(f"cannot write {path}: {blocker} is a file, not a folder") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:                # a fault names the file asked for, not a temporary name
        _remove_empty(made)
        raise _named(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _remove_empty(made)
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write made (innermost first), where they are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name (a disk-full write names none, a failed temporary file
    names itself)."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


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
        import errno
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            # the folder exists, yet no file can be made in it: /proc, /sys and their like
            raise DataError(f"cannot write {out}: {probe} does not accept new files (a special "
                            "file system?); choose another place") from None
        from .errors import os_reason
        where = "" if probe == p else f"{probe}: "         # the path once, where the folder is the output
        why = os_reason(e) or (e.strerror.lower() if e.strerror else str(e))
        raise DataError(f"cannot write {out}: {where}{why}") from None


def sha256(path: PathLike) -> str:
    """The sha256 (hex) of a file's bytes; cached while the file's size and modification time stay
    the same (a text file that settings record by content is hashed once per process)."""
    import hashlib
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    got = _SHA_CACHE.get(key)
    if got is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        got = _SHA_CACHE[key] = h.hexdigest()
    return got


_SHA_CACHE: dict = {}


# --- names that become paths ------------------------------------------------------------------------

WORK_SUFFIXES = (".new", ".replaced", ".allocating")    # the folders writers make beside an output
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def name_problem(name: Any) -> Optional[str]:
    """Why ``name`` cannot name a file or folder the project makes from it (a preset's run folder, a
    variant's plan folder and results files), or None. The one rule: letters, digits, '_', '.', '-';
    not starting with '.' (so not '.', '..' or a hidden file); not ending like a folder a writer
    makes beside an output (``.new``, ``.replaced``, ``.allocating``); at most 100 characters."""
    if not isinstance(name, str) or not name:
        return f"must be a non-empty name, got {name!r}"
    if not _NAME.fullmatch(name):
        return f"must be letters, digits, '_', '.', '-', got {name!r}"
    if name.startswith("."):
        return f"must not start with '.' (it becomes a folder or file name), got {name!r}"
    if name.endswith(WORK_SUFFIXES):
        return f"must not end with {', '.join(WORK_SUFFIXES)} (the work folders' endings), got {name!r}"
    if len(name) > 100:
        return f"must be at most 100 characters, got {len(name)}"
    return None


def check_name(name: Any, what: str = "name") -> str:
    """``name`` if it may become a path (:func:`name_problem`), else :class:`InvalidArgument`."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidArgument(f"{what} {problem}")
    return name


LOCK_NAME = ".wina-lock"
LOCK_SUFFIX = ".wina-lock"      # a file's lock: the hidden file ``.NAME.wina-lock`` beside it (locked_file)


_HELD: dict[str, tuple[int, int]] = {}        # what is held (a folder, a file) -> (thread holding it, depth)
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(folder: PathLike, what: str = "") -> Iterator[None]:
    """Hold ``folder`` for writing: a second writer (another process, or another thread of this one)
    gets one clear error naming the process that holds it. The lock is the kernel's (``flock``), so
    a killed writer leaves no stale lock behind. The thread holding it may take it again (a front-end
    takes it before loading a model, the pipeline's step inside). A folder this call created and that
    holds nothing but the lock when it is released is removed: a writer that failed before writing
    anything leaves nothing behind."""
    d = Path(folder)
    created = not d.exists()

    def cleanup() -> None:
        if created:
            _remove_if_only_lock(d)

    with _holding(str(d.expanduser().resolve()), d / LOCK_NAME, what or str(d),
                  lambda: d.mkdir(parents=True, exist_ok=True), cleanup, above=True):
        yield


@contextlib.contextmanager
def locked_file(path: PathLike, what: str = "") -> Iterator[None]:
    """Hold the file ``path`` for writing, as :func:`locked` holds a folder (a results file two
    commands were told to write): a second writer gets one clear error naming the process that holds
    it, and the thread holding it may take it again. The lock is a hidden file beside it
    (``.NAME.wina-lock``), removed on release, as are the folders made for it while still empty.
    Unlike a folder's, it does not ask the folders above: ``wina run`` holds its run folder while its
    data-parallel processes write their results into it."""
    p = Path(path).expanduser()
    lock = p.with_name(f".{p.name}{LOCK_SUFFIX}")
    made = [q for q in (p.parent, *p.parent.parents) if not q.exists()]     # removed again if left empty

    def cleanup() -> None:
        try:
            lock.unlink()
        except OSError:
            pass
        _remove_empty(made)

    with _holding(str(p.resolve()), lock, what or str(path),
                  lambda: p.parent.mkdir(parents=True, exist_ok=True), cleanup, above=False):
        yield


@contextlib.contextmanager
def _holding(key: str, lock: Path, what: str, prepare: Callable[[], None],
             cleanup: Callable[[], None], *, above: bool) -> Iterator[None]:
    """The writer's hold on ``key`` (a resolved folder or file) through the lock file ``lock``, for
    :func:`locked` and :func:`locked_file`: taken again by the thread that holds it; else ``prepare``
    (makes the lock's folder), the ``flock``, and (``above``) the check of the folders above;
    ``cleanup`` runs, still holding it, when it is let go or refused by a writer above."""
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        mine = held is not None and held[0] == me
        if mine:
            _HELD[key] = (me, held[1] + 1)
    if mine:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] = (me, _HELD[key][1] - 1)
        return
    if held is not None:
        raise DataError(f"{what} is being written by process {os.getpid()} (this one); wait for it "
                        "to finish or stop it")
    f = _take(lock, prepare, what)
    try:
        up = _held_above(Path(key)) if above else None
        if up is not None:
            cleanup()
            raise DataError(f"{what} is inside {up[0]}, which process {up[1]} is writing; wait "
                            "for it to finish or choose another folder")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        with _HELD_GUARD:
            _HELD[key] = (me, 1)
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            cleanup()
    finally:
        f.close()


def _take(lock: Path, prepare: Callable[[], None], what: str):
    """The lock file ``lock`` open and ``flock``-ed by this process, or :class:`DataError` naming the
    process that holds it. A lock file its last holder removed as this one opened it is taken anew:
    the lock must be on the file that is there."""
    import fcntl
    for _ in range(20):
        prepare()
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise DataError(f"{what} is being written by process {pid}; wait for it to finish "
                            "or stop it") from None
        except BaseException:
            f.close()
            raise
        try:
            there = os.stat(lock)
            mine = os.fstat(f.fileno())
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return f
        except FileNotFoundError:
            pass
        f.close()
    raise DataError(f"{what}: its lock file {lock} keeps being replaced; try again")


def writer(folder: PathLike) -> Optional[str]:
    """The process id of the writer that holds ``folder`` now (:func:`locked`), or that holds a folder
    above it (a run folder ``wina run`` is writing); None when none does (a killed writer holds
    nothing). A writer in this process counts."""
    d = Path(folder).expanduser().resolve()
    with _HELD_GUARD:
        if str(d) in _HELD:
            return str(os.getpid())
    pid = _holder(d / LOCK_NAME)
    if pid is not None:
        return pid
    above = _held_above(d)
    return above[1] if above is not None else None


def _holder(lock: Path) -> Optional[str]:
    """The process id written in the lock file ``lock`` while a live process holds it, else None."""
    import fcntl
    if not lock.is_file():
        return None
    try:
        with open(lock, "r", encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "?"
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        pass
    return None


def _remove_if_only_lock(d: Path) -> None:
    """Remove the folder ``d`` if it holds nothing but the lock file and empty folders (called while
    holding it)."""
    def empty(folder: Path, skip: str = "") -> bool:
        return all(p.name == skip or (p.is_dir() and not p.is_symlink() and empty(p)) for p in folder.iterdir())
    try:
        if not (d / LOCK_NAME).is_file() or not empty(d, skip=LOCK_NAME):
            return
        (d / LOCK_NAME).unlink()
        for sub in sorted(d.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            sub.rmdir()                              # empty folders, deepest first
        d.rmdir()
    except OSError:
        pass


def _held_above(d: Path) -> Optional[tuple[Path, str]]:
    """The nearest folder above ``d`` whose lock another process holds now (its folder and pid), or
    None: a plan written into a folder that a running ``wina run`` holds would be taken over by it."""
    for up in d.parents:
        lock = up / LOCK_NAME
        if not lock.is_file():
            continue
        with _HELD_GUARD:
            if str(up) in _HELD:                 # this process's own (a run's step, the TUI)
                return None
        pid = _holder(lock)
        if pid is not None:
            return up, pid
    return None


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
