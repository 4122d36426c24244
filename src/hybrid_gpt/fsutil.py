"""Crash-safe writes: every artifact goes to a temporary path first and is renamed into place,
so that a crash leaves either the old complete artifact or the new complete one."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from hybrid_gpt.errors import RunFailure


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


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary sibling path; on success rename it over ``final``; on failure remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunFailure(f"could not write {final}: {e.strerror or e}; the previous version is untouched") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(final: str | Path, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str):
    from hybrid_gpt.errors import HybridGPTError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise HybridGPTError(f"{what} {path} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HybridGPTError(f"{what} {path} is not valid JSON ({e}); it may be truncated") from e


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Swap a fully written directory into place.

    The previous directory is first renamed to ``final.old``; a crash between the two renames
    leaves ``final.old`` complete, and :func:`recover_dir` puts it back.
    """
    old = final.with_name(final.name + ".old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp_dir, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise RunFailure(f"could not move {tmp_dir} into place at {final}: {e.strerror or e}") from e
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_writer(target: str | Path):
    """Hold a lock on ``target`` (an advisory flock on a hidden sibling file) while writing it.

    A second process that tries to write the same checkpoint gets a clear error instead of
    interleaving its checkpoints with the first one's. The lock dies with its process.
    """
    import fcntl

    from hybrid_gpt.errors import HybridGPTError

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise HybridGPTError(
            f"another process{f' (pid {holder})' if holder else ''} is writing {target}; "
            "wait for it to finish, or pass another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so no one else sees it held and then gone
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def recover_dir(final: Path) -> None:
    """Undo a swap interrupted by a crash: restore ``final.old`` if ``final`` is missing."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        os.rename(old, final)
