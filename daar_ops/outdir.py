"""Output folders that are all-or-nothing and never destroy what this package did not write.

A command builds its outputs in a staging folder beside the target (``<name>.partial-<pid>-<tag>``)
and publishes it at the end. Every folder this module creates carries a marker file,
``.daar-ops-output.json``, which names the command, its state (``partial`` / ``complete``) and, once
complete, every file it wrote. The rules:

* A target may be replaced only when it does not exist, is empty, or is a complete output of this
  package whose files are exactly those its marker lists (a file a user added makes it foreign).
  Anything else is refused before any work starts and again at publish time, naming the files.
* Publishing holds an exclusive lock on the parent folder (``flock``), so two runs finishing into
  one target take turns; the swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so a reader sees
  the old output or the new one, never none. Elsewhere it falls back to two renames.
* Staging folders of processes that no longer run (a killed run) are removed at the next start,
  but only when their marker says this package made them.

No Data-Juicer import.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

MARKER = ".daar-ops-output.json"
_WRITER = "daar-ops"


class OutputDirError(ValueError):
    """A target folder this package must not replace."""


def resolve_target(path: str | os.PathLike) -> Path:
    """The absolute target folder; refuses a path without a name (``/``)."""
    final = Path(path).expanduser().absolute()
    final = Path(os.path.normpath(final))
    if not final.name:
        raise OutputDirError(f"output folder '{path}' has no name (the file-system root); "
                             "choose a folder of its own")
    return final


def _read_marker(folder: Path) -> dict | None:
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == _WRITER else None


def _files(folder: Path) -> list[str]:
    """Every entry under ``folder`` that is not a folder, as sorted relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [str(rel / f) for f in files]
        out += [str(rel / d) for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(os.path.normpath(p) for p in out)


def foreign_files(final: Path) -> list[str]:
    """The entries of ``final`` that stop this package from replacing it (empty: replaceable)."""
    if not final.exists() and not final.is_symlink():
        return []
    if final.is_symlink() or not final.is_dir():
        return [final.name]
    present = [f for f in _files(final) if f != MARKER]
    if not present:
        return []
    marker = _read_marker(final)
    written = set(marker.get("files", [])) if marker and marker.get("state") == "complete" else set()
    return [f for f in present if f not in written]


def check_target(final: Path, command: str) -> None:
    """Raise :class:`OutputDirError` unless ``final`` may be replaced by this package."""
    foreign = foreign_files(final)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise OutputDirError(
            f"output folder {final} holds files that {command} did not write ({shown}); nothing "
            f"is overwritten: choose another output folder, or move those files away (or delete "
            f"the folder yourself) to replace it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove staging / old folders of ``final`` left by processes that no longer run and whose
    marker says this package made them; returns what was removed."""
    removed = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    prefixes = (f"{final.name}.partial-", f"{final.name}.old-")
    for entry in sorted(parent.iterdir()):
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)) or _read_marker(entry) is None:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def new_staging(final: Path, command: str) -> Path:
    """A fresh staging folder beside ``final``, marked as a partial output of ``command``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
    staging.mkdir()
    _write_marker(staging, {"writer": _WRITER, "command": command, "state": "partial",
                            "pid": os.getpid()})
    return staging


def _write_marker(folder: Path, data: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MARKER)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange_supported(folder: Path) -> bool:
    """Whether ``folder``'s file system swaps folders atomically (for tests and docs)."""
    a, b = folder / f".xchg-a-{secrets.token_hex(3)}", folder / f".xchg-b-{secrets.token_hex(3)}"
    a.mkdir()
    b.mkdir()
    try:
        return _exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def publish(staging: Path, final: Path, command: str) -> None:
    """Mark ``staging`` complete and move it to ``final`` (see the module docstring)."""
    marker = _read_marker(staging) or {"writer": _WRITER, "command": command}
    files = [f for f in _files(staging) if f not in (MARKER, MARKER + ".tmp")]
    _write_marker(staging, {**marker, "state": "complete", "files": files})
    with _locked(final.parent):
        check_target(final, command)
        if not final.exists():
            os.rename(staging, final)
            return
        if _exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous output
            return
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)


def discard(staging: Path) -> None:
    """Remove a staging folder of this process (a failed run)."""
    if _read_marker(staging) is not None:
        shutil.rmtree(staging, ignore_errors=True)


def write_folder(path: str | os.PathLike, command: str, write: Callable[[Path], T]) -> T:
    """The whole rule for one output folder: refuse a target this package may not replace before
    any work, clean stale staging folders, let ``write`` fill a fresh staging folder, publish it
    (or discard it when ``write`` raises). Returns what ``write`` returns."""
    final = resolve_target(path)
    check_target(final, command)
    clean_stale(final)
    staging = new_staging(final, command)
    try:
        result = write(staging)
        publish(staging, final, command)
    except BaseException:
        discard(staging)
        raise
    return result
