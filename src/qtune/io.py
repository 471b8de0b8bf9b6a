"""File output that never loses or corrupts a run's folder.

- `atomic_path` / `write_*`: a reader never sees a half-written file; a crash leaves the old one.
- `claim_output_dir`: every command that writes a folder first creates it, proves it can write
  there, and holds an exclusive lock on it, so a second process on the same folder is refused
  before it loads anything ("in use by process N") instead of interleaving its files.
- `disk_full_message`: the one-line wording of ENOSPC, shared by every writer and the CLI.
- `cache_root`, `cache_entry_lock`: where qtune's caches of models lie, and the lock under which
  one process at a time builds or opens an entry of a cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import QTuneError

#: Environment variable that moves qtune's model caches: the testbed's and the pretrained models'.
CACHE_ENV = "QTUNE_CACHE"

#: The lock file inside a claimed output folder. It holds the owner's process id while the lock is held.
LOCK_FILE = ".qtune.lock"


def _umask() -> int:
    """The process's file-mode creation mask, read without changing it where Linux says it (setting
    it to read it back would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename. The
    file gets the mode a plain `open(path, "w")` would give it (0666 less the umask), not the
    owner-only 0600 of the temporary file it starts as."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file written by qtune itself (results, step logs, the testbed's
    splits), skipping any line that is not valid JSON: an appending process killed mid-line leaves a
    partial one, and the next append follows it. Missing file: no records. (User datasets go through
    `qtune.data`, which names the file and line of a bad record instead.)"""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_parquet(path: str | os.PathLike, columns: dict) -> None:
    """A table of equal-length columns as a parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def disk_full_message(path: str | os.PathLike | None = None) -> str:
    where = f" while writing {path}" if path else ""
    return (f"no space left on the device{where}; free some space (or choose another --out) and run the "
            "same command again (with --resume for train)")


def _owner(lock_path: Path) -> str:
    try:
        return lock_path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def claim_output_dir(path: str | os.PathLike, command: str = "qtune") -> Iterator[Path]:
    """Create `path` if needed, check that files can be written there, and hold an exclusive
    lock on it for the duration of the `with` block.

    Raises `QTuneError` before any work starts when the folder cannot be created or written
    (read-only, not a folder, disk full) or when another live process holds it. The lock is an
    advisory `flock` on `path/.qtune.lock`: the kernel releases it when the holder exits, even
    after SIGKILL, so a stale lock file never blocks a later run. Claiming a folder that is
    already claimed fails even inside the same process; claims on nested folders (a bench's
    folder and its cells' folders) are independent.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise QTuneError(f"output folder {str(path)!r} exists and is not a folder") from None
    except OSError as exc:
        raise QTuneError(f"cannot create the output folder {str(path)!r}: {exc.strerror}") from None
    if not path.is_dir():
        raise QTuneError(f"output folder {str(path)!r} exists and is not a folder")
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise QTuneError(f"cannot write in the output folder {str(path)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QTuneError(f"output folder {str(path)!r} is in use by process {_owner(lock_path)} "
                             f"(another qtune command); wait for it to finish or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {command}\n".encode())
            os.fsync(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise QTuneError(disk_full_message(lock_path)) from None
            raise QTuneError(f"cannot write in the output folder {str(path)!r}: {exc.strerror}") from None
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def replace_dir(built: Path, final: Path) -> None:
    """Move the finished folder `built` to `final`, swapping out an existing `final` first (it is
    moved aside into a temporary folder beside it, then deleted), so `final` is never half-written."""
    final = Path(final)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        shutil.rmtree(old)
    os.replace(built, final)


def cache_root(kind: str) -> Path:
    """The root of qtune's cache of `kind` ("testbed" or "models"): `~/.cache/qtune/<kind>`, or with
    `$QTUNE_CACHE` set, that folder itself for the testbed (as it was before other kinds existed)
    and its subfolder `<kind>` for any other kind."""
    moved = os.environ.get(CACHE_ENV)
    if moved:
        return Path(moved) if kind == "testbed" else Path(moved) / kind
    return Path.home() / ".cache" / "qtune" / kind


@contextlib.contextmanager
def cache_entry_lock(root: Path, key: str, what: str, hint: str) -> Iterator[None]:
    """Hold an exclusive flock on `root/.<key>.lock` (creating `root`) for the `with` block, so
    that processes asking for the same cache entry at once build it one at a time: the others
    wait, then find it built. When the lock file cannot be created: a QTuneError naming `what`
    (the cache) and `root`, ending with `hint` (how to use another folder)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise QTuneError(f"cannot write {what} in {root} ({exc.strerror}); {hint}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
