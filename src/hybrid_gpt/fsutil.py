"""Crash-safe reads and writes: every artifact goes to a temporary path first and is renamed into place,
so that a crash leaves either the old complete artifact or the new complete one.

Directories (checkpoints, prepared data, analysis outputs) are built whole in a hidden sibling and
swapped in by :func:`replace_dir`; :func:`output_dir` is the one sequence every writer of a directory
uses (lock, stale temporaries, recovery of a half-finished swap, refusal of a directory that holds,
at any depth, anything the command's tree spec of what it writes does not name, swap). An OSError
from a write becomes one line naming the file and the reason (:class:`WriteError`).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError, RunFailure

JSON_LIMIT = 64 << 20  # bytes; our JSON files are kilobytes, so anything near this is not one of them
NAME_MAX = 255  # bytes in one file name, where the file system does not say (ext4, XFS, btrfs, tmpfs, APFS)
PID_DIGITS = 7  # Linux's largest pid_max, 4,194,304: the room a hidden temporary's name leaves for its pid


def clip(value, limit: int = 60) -> str:
    """``repr``-free text of a value, cut to ``limit`` characters: what an error may echo of the user's input."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def os_reason(e: OSError) -> str:
    """'read-only file system', 'no space left on device', ...: the errno's meaning, in lower case."""
    if e.errno:
        text = os.strerror(e.errno)
        return text[:1].lower() + text[1:]
    return clip(str(e).splitlines()[0] if str(e) else type(e).__name__, 120)


class WriteError(RunFailure):
    """A write that the file system refused (read-only, full, no permission): one line, exit status 1."""

    def __init__(self, path, reason: str, note: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"could not write {path}: {reason}" + (f"; {note}" if note else ""))


def _quietly(fn, *args) -> None:
    """Cleanup that must never replace the error it cleans up after."""
    try:
        fn(*args)
    except OSError:
        pass


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` (or of its nearest existing
    ancestor) takes."""
    folder = Path(os.path.abspath(folder))
    for d in (folder, *folder.parents):
        try:
            return int(os.pathconf(d, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return NAME_MAX


def _sibling(final: Path, prefix: str, suffix: str, room: int = 0) -> Path:
    """The sibling of ``final`` named ``prefix + name + suffix`` (and up to ``room`` bytes more); where that is
    longer than the file system takes, the name is cut and a hash of the whole stands for the rest, so that
    every name the file system takes can be written (a 245-byte --out once failed at its first save)."""
    name, limit = final.name, name_max(final.parent)
    fixed = len(os.fsencode(prefix + suffix)) + room
    if len(os.fsencode(name)) + fixed > limit:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        while name and len(os.fsencode(name)) + fixed + len(digest) + 1 > limit:
            name = name[:-1]
        name = f"{name}~{digest}"
    return final.with_name(prefix + name + suffix)


def _temp(final: Path) -> Path:
    """The hidden temporary of ``final`` (atomic_path, staged_dir) of this process; the stale ones of killed
    processes match ``_temp_glob(final)``."""
    base = _sibling(final, ".", ".tmp-", PID_DIGITS)
    return base.with_name(f"{base.name}{os.getpid()}")


def _temp_glob(final: Path) -> str:
    return glob.escape(_sibling(final, ".", ".tmp-", PID_DIGITS).name) + "*"


def _lock(target: Path) -> Path:
    return _sibling(target, ".", ".lock")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data) -> None:
    """The one place bytes reach the disk (tests replace it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary sibling path; on success rename it over ``final``; on failure remove it.

    An OSError on the way (read-only file system, disk full) becomes a :class:`WriteError` naming ``final``.
    """
    final = _named(final)
    tmp = _temp(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        _quietly(tmp.unlink, True)
        raise WriteError(final, os_reason(e), "the previous version is untouched") from e
    except BaseException:
        _quietly(tmp.unlink, True)
        raise


def write_bytes(final: str | Path, data) -> None:
    """Write ``data`` (bytes, or any buffer such as a numpy array's memoryview) to ``final`` atomically."""
    with atomic_path(final) as tmp:
        _write_file(tmp, data)


def write_text(final: str | Path, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | Path, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes.

    Anything else is refused before a byte is read: a FIFO would block forever and /dev/zero never ends.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: opening a FIFO never waits
    except FileNotFoundError as e:
        raise HybridGPTError(f"{what} {path} not found") from e
    except OSError as e:
        raise HybridGPTError(f"cannot read {what} {path}: {os_reason(e)}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise HybridGPTError(f"{what} {path} is {kind}, not a regular file")
    if st.st_size > limit:
        os.close(fd)
        raise HybridGPTError(f"{what} {path} is {st.st_size:,} bytes, over the limit of {limit:,}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise HybridGPTError(f"cannot read {what} {path}: {os_reason(e)}") from e
    if len(data) > limit:  # it grew while we read it
        raise HybridGPTError(f"{what} {path} is over the limit of {limit:,} bytes")
    return data


def read_text(path: str | Path, what: str, limit: int) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HybridGPTError(f"{what} {path} is not UTF-8 text (bad byte at offset {e.start})") from e


def parse_json(text: str, where: str, note: str = ""):
    """``json.loads(text)``, with each way it fails as one line naming ``where``: bad syntax, integers longer
    than Python converts (4,300 digits, a ValueError that is not a JSONDecodeError), nesting deeper than the
    recursion limit."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise HybridGPTError(f"{where}: nested too deeply to be one of ours") from e
    except ValueError as e:
        raise HybridGPTError(f"{where}: not valid JSON ({clip(e, 120)})" + (f"; {note}" if note else "")) from e


def read_json(path: str | Path, what: str, limit: int = JSON_LIMIT):
    path = Path(path)
    return parse_json(read_text(path, what, limit), f"{what} {path}", "it may be truncated")


# -- directories ------------------------------------------------------------------------------------

def _named(path: str | Path) -> Path:
    """``path`` with a last component to name siblings after ("." and ".." become absolute)."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def _old(final: Path) -> Path:
    return _sibling(final, "", ".old")


def _listing(names: list[str], shown: int = 4) -> str:
    text = ", ".join(clip(n, 80) for n in names[:shown])
    return text + (f" and {len(names) - shown:,} more" if len(names) > shown else "")


def nested(prefix: str, spec: Collection[str]) -> tuple[str, ...]:
    """``spec`` (a tree spec: see :func:`check_replaceable`) moved under the directory pattern ``prefix``:
    ``nested("arms/*", CHECKPOINT_FILES)`` is a checkpoint in every directory under arms/."""
    return tuple(f"{prefix}/{p}" for p in spec)


def _stands_for(name: str, is_dir: bool) -> list[str]:
    """The names an entry may stand for: itself, and for our hidden siblings (``.X.tmp-PID`` of atomic_path
    and staged_dir, ``X.old`` of an interrupted swap) the X they are a version of."""
    names = [name]
    tmp = re.fullmatch(r"\.(.+)\.tmp-\d+", name, re.DOTALL)
    if tmp:
        names.append(tmp[1])
    if is_dir and name.endswith(".old") and len(name) > 4:
        names.append(name[:-4])
    return names


def _contents(name: str, is_dir: bool, patterns: list[tuple[str, ...]]) -> list[tuple[str, ...]] | None:
    """None if the entry ``name`` is not ours among ``patterns``; else the patterns of what it may hold
    (empty for a file)."""
    names = _stands_for(name, is_dir)
    if not is_dir:
        lock = re.fullmatch(r"\.(.+)\.lock", name, re.DOTALL)  # the lock of a sibling (exclusive_writer)
        if lock and any(fnmatch.fnmatchcase(lock[1], p[0]) for p in patterns):
            return []
        return [] if any(len(p) == 1 and fnmatch.fnmatchcase(n, p[0]) for n in names for p in patterns) else None
    inner = [p[1:] for p in patterns if len(p) > 1 and any(fnmatch.fnmatchcase(n, p[0]) for n in names)]
    return inner or None


def foreign_entries(path: Path, allowed: Collection[str]) -> list[str]:
    """Every entry under the directory ``path`` that the tree spec ``allowed`` does not name, as a path
    relative to it ('/'-separated; a directory ends in '/', and what is in it is not listed): see
    :func:`check_replaceable`. No symbolic link is followed."""
    patterns = [tuple(p.split("/")) for p in allowed]
    foreign: list[str] = []

    def walk(folder: Path, rel: str, patterns: list[tuple[str, ...]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise HybridGPTError(f"cannot read {folder}: {os_reason(e)}") from e
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:  # gone since the listing
                continue
            is_dir = stat.S_ISDIR(mode)
            inner = _contents(entry.name, is_dir, patterns) if is_dir or stat.S_ISREG(mode) else None
            if inner is None:  # not ours, or a link, FIFO, socket or device: we write none of those
                foreign.append(rel + entry.name + ("/" if is_dir else ""))
            elif is_dir:
                walk(Path(entry.path), f"{rel}{entry.name}/", inner)

    walk(path, "", patterns)
    return foreign


def check_replaceable(path: Path, allowed: Collection[str], what: str) -> None:
    """Refuse to replace (or delete in) ``path`` unless it is missing, or a directory whose every entry, at
    every depth, is one the tool writes: replacing deletes it all, so all of it must be ours.

    ``allowed`` is the tool's tree spec: '/'-separated paths of the files it writes, relative to ``path``,
    each component a glob pattern ("arms/*/config.json"; :func:`nested`); the directories on the way are
    implied. Also ours: the hidden siblings that our own writes leave after a kill (``.X.tmp-PID``,
    ``X.old``, ``.X.lock``) of an entry the spec names. ``path`` itself may be a link to a directory (only
    the link is replaced). A symbolic link, a FIFO or a device is never ours, nor a
    directory where the spec has a file. Why a spec and not a manifest of what was written: it also judges
    directories written in place (ablate, static) or by earlier versions, and it is the one description of
    each layout (an empty directory holds nothing to lose)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise HybridGPTError(f"{path} is a file, not a {what}; it is left untouched (choose another output path)")
    foreign = foreign_entries(path, allowed)
    if foreign:
        raise HybridGPTError(f"{path} is not a {what}: it holds {_listing(foreign)}; it is left untouched "
                             "(move those away, or choose another output path)")


def check_not_source(source: str | Path, out: str | Path) -> None:
    """Refuse an output that is the source being read, or a directory holding it: writing it would replace (and
    so delete) the source."""
    src, dest = Path(source).resolve(), Path(out).resolve()
    if dest == src or dest in src.parents:
        raise HybridGPTError(f"the output {out} would replace the source {source}; choose another --out")


def check_replaceable_json(path: str | Path, keys: Collection[str], what: str) -> None:
    """Refuse to overwrite the file ``path`` unless it is missing or a JSON object holding ``keys``: an output
    file named on the command line may be a user's file or another artifact (a checkpoint's config.json)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        data = read_json(path, what)
    except HybridGPTError:
        data = None
    if not (isinstance(data, dict) and all(k in data for k in keys)):
        raise HybridGPTError(f"{path} exists and is not a {what}; it is left untouched (remove it, or choose "
                             "another output path)")


def replace_dir(tmp_dir: Path, final: Path, allowed: Collection[str] | None = None, what: str = "") -> None:
    """Swap a fully written directory into place.

    The previous directory is first renamed to ``final.old``; a crash between the two renames
    leaves ``final.old`` complete, and :func:`recover_dir` puts it back. With ``allowed`` (a tree spec), a
    previous directory that holds anything else at any depth is refused (see :func:`check_replaceable`) and
    nothing moves.
    """
    old = _old(final)
    if allowed is not None:
        check_replaceable(final, allowed, what)
        check_replaceable(old, allowed, what)
    try:
        if old.exists() or old.is_symlink():
            _remove(old)
        if final.exists() or final.is_symlink():
            os.rename(final, old)
        os.rename(tmp_dir, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise WriteError(final, os_reason(e)) from e
    _quietly(_remove, old)


def _try_lock(target: Path):
    """(the lock file of ``target``, held exclusively, None) or (None, the pid written by the process that holds it)."""
    import fcntl

    lock = _lock(target)
    try:
        f = open(lock, "a+")
    except OSError as e:
        raise WriteError(target, os_reason(e)) from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        return None, holder
    return f, None


def _unlock(f, target: Path) -> None:
    import fcntl

    _quietly(_lock(target).unlink, True)  # while held: no one sees it held, then gone
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


@contextmanager
def exclusive_writer(target: str | Path):
    """Hold a lock on ``target`` (an advisory flock on a hidden sibling file) while writing it.

    A second process that tries to write the same checkpoint gets a clear error instead of
    interleaving its checkpoints with the first one's. The lock dies with its process.
    """
    target = _named(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(target, os_reason(e)) from e
    f, holder = _try_lock(target)
    if f is None:
        raise HybridGPTError(
            f"another process{f' (pid {holder})' if holder else ''} is writing {target}; "
            "wait for it to finish, or pass another --out"
        )
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    except OSError as e:
        _unlock(f, target)
        raise WriteError(target, os_reason(e)) from e
    try:
        yield
    finally:
        _unlock(f, target)


def _recover(final: Path) -> None:
    old = _old(final)
    if not final.exists() and not final.is_symlink() and old.is_dir():
        try:
            os.rename(old, final)
        except FileNotFoundError:  # another reader restored it first
            pass
        except OSError as e:
            raise WriteError(final, os_reason(e), f"its last complete version is in {old}") from e


def recover_dir(final: str | Path) -> None:
    """Undo a swap interrupted by a crash: restore ``final.old`` if ``final`` is missing.

    Every reader and writer of a swapped directory calls this first. It does nothing while another
    process holds the directory's lock: that writer may be between its two renames.
    """
    final = _named(final)
    if final.exists() or final.name == "" or not _old(final).is_dir():
        return
    if not final.parent.is_dir():
        return
    try:
        f, _ = _try_lock(final)
    except WriteError:  # cannot even create a lock file (read-only): try the rename, which says why
        _recover(final)
        return
    if f is None:
        return
    try:
        _recover(final)
    finally:
        _unlock(f, final)


@contextmanager
def staged_dir(final: str | Path, allowed: Collection[str], what: str):
    """Yield an empty hidden sibling directory to build ``final`` in; on success swap it in whole
    (:func:`replace_dir`), on failure remove it. The caller holds ``final``'s lock (:func:`claimed_dir`)."""
    final = _named(final)
    tmp = _temp(final)
    try:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        replace_dir(tmp, final, allowed, what)
    except WriteError as e:  # named after a file in the temporary directory: name the directory instead
        _quietly(_remove, tmp)
        raise WriteError(final, e.reason, "the previous version is untouched") from e
    except OSError as e:
        _quietly(_remove, tmp)
        raise WriteError(final, os_reason(e), "the previous version is untouched") from e
    except BaseException:
        _quietly(_remove, tmp)
        raise


def _check_existing(final: Path, allowed: Collection[str], what: str, overwrite: bool, resume: bool,
                    exists_hint: str) -> bool:
    """Whether ``final`` exists, refusing it unless ``overwrite`` or ``resume`` and it is ours."""
    if not (final.exists() or final.is_symlink()):
        return False
    if not (overwrite or resume):
        raise HybridGPTError(f"{final} already exists; {exists_hint}")
    check_replaceable(final, allowed, what)
    check_replaceable(_old(final), allowed, what)  # the swap deletes it: refused now, not after the work
    return True


@contextmanager
def claimed_dir(final: str | Path, *, allowed: Collection[str], what: str, overwrite: bool = False,
                resume: bool = False, exists_hint: str = "pass --overwrite to replace it", writer: bool = True,
                in_place: bool = False):
    """Hold the directory ``final`` for writing; the one sequence before any directory is written.

    A half-finished swap is recovered, then an existing ``final`` is refused unless ``overwrite`` or
    ``resume``, and also then when anything in it, at any depth, is not named by the tree spec ``allowed``
    (:func:`check_replaceable`): first without the lock (so that a refused command leaves no trace), then
    again under it, after removing the stale temporaries of killed writers (the lock makes them ours).
    ``in_place`` (a writer that fills ``final`` itself instead of swapping a staged copy in): ``overwrite``
    deletes the existing ``final`` right after that check, under the lock (no link is followed).
    ``writer=False`` (a DDP rank other than 0) only checks.
    """
    final = _named(final)
    try:
        os.lstat(final)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:  # a name too long, a loop of links: the OS refuses the path itself
        raise HybridGPTError(f"cannot use {clip(final, 120)} as the {what}: {os_reason(e)}") from e
    recover_dir(final)
    _check_existing(final, allowed, what, overwrite, resume, exists_hint)
    if not writer:
        yield final
        return
    with exclusive_writer(final):
        for stale in final.parent.glob(_temp_glob(final)):
            _quietly(_remove, stale)
        _recover(final)
        if _check_existing(final, allowed, what, overwrite, resume, exists_hint) and in_place and overwrite:
            try:
                _remove(final)
            except OSError as e:
                raise WriteError(final, os_reason(e), "it may be partly deleted") from e
        yield final


@contextmanager
def output_dir(final: str | Path, *, allowed: Collection[str], what: str, overwrite: bool = False,
               exists_hint: str = "pass --overwrite to replace it"):
    """Claim ``final`` (:func:`claimed_dir`) and yield a temporary directory that replaces it whole on success."""
    with claimed_dir(final, allowed=allowed, what=what, overwrite=overwrite, exists_hint=exists_hint):
        with staged_dir(final, allowed, what) as tmp:
            yield tmp

