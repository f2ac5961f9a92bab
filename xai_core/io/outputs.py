"""Writing outputs so that a killed run never leaves a partial file, and resuming batch jobs.

Every write goes to a temporary file in the target's folder, is flushed to disk (fsync), then
renamed over the target with :func:`os.replace`, which is atomic on one file system: readers see
the old file or the new one, never half of one. Temporary files are hidden and end in
``.xai-tmp``; a run that is killed leaves at most such a file, which nothing mistakes for output
and :meth:`RunLedger.clean_temp` removes.

:class:`RunLedger` records which inputs of a batch are finished: after all of an input's
outputs are written, :meth:`RunLedger.mark_done` writes a small JSON record (atomically, last).
An input is done when its record exists, every output it lists is still there with its
recorded size, and (when the caller gives one) the record's *request key* is the one asked for
now: a rerun skips exactly the inputs that finished the same request, and redoes the rest.
The root is made absolute once, when the ledger is created, so a relative output folder means
the same place however its outputs are named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from xai_core.core.errors import OptionError, OutputFileError

TEMP_SUFFIX = ".xai-tmp"
LEDGER_FOLDER = ".xai-run"
STALE_AFTER_S = 6 * 3600.0  # a temporary file this old is abandoned, whoever wrote it
_TEMP_PID = re.compile(r"\.(\d+)-[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

# mkstemp creates files readable by their owner only; outputs get the usual umask instead.
# Reading the umask means setting it: done once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace ``path`` only if the block completes.

    For writers that want a file object (``image.save(f, format="PNG")``). If the block raises,
    the target is untouched (absent, or its previous contents) and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name[:80]}.{os.getpid()}-"
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with suppress(OSError):  # not every file system has POSIX modes
            os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, path)
    except BaseException:  # also KeyboardInterrupt: never leave the temporary file behind
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Indented JSON; numpy scalars and arrays, paths and the like are converted."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def atomic_save_npy(path: str | Path, array: Any) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` is appended), without pickled objects."""
    with atomic_open(path) as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    return str(value)


class RunLedger:
    """Which inputs of a batch job are finished, kept in ``<root>/.xai-run/``.

    Typical use::

        ledger = RunLedger(out_dir)
        for item in items:
            if ledger.done(item.key):
                continue
            ... write the outputs with the atomic_* functions ...
            ledger.mark_done(item.key, {"method": "gradcam"}, outputs=[png, npy])

    Records are per input, so parallel workers on different inputs do not interfere. The
    ledger assumes that one machine writes to ``root`` at a time (temporary files of live
    processes are recognised by process id).
    """

    def __init__(self, root: str | Path, *, clean: bool = True) -> None:
        # Absolute once, here: outputs named relative to the working directory or to the root
        # then both resolve to the same files (a relative root used to be applied twice).
        self.root = Path(root).absolute()
        self.folder = self.root / LEDGER_FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        if clean:
            self.clean_temp()

    def _path(self, key: str, state: str) -> Path:
        if not _KEY.match(key):
            raise OptionError(f"A ledger key must be safe as a file name; got {key!r}.")
        return self.folder / f"{key}.{state}.json"

    def record(self, key: str) -> dict[str, Any] | None:
        """The completion record of ``key``, or None."""
        path = self._path(key, "done")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent, or damaged by something other than us: not done
        return data if isinstance(data, dict) and data.get("key") == key else None

    def done(self, key: str, request: str | None = None) -> bool:
        """True when ``key`` has a record and each output it lists exists with its size.

        With ``request``, the record must also have been made for that request key (see
        :func:`request_key`): a record of another request is not done.
        """
        data = self.record(key)
        if data is None or not isinstance(data.get("outputs"), dict):
            return False
        if request is not None and data.get("request") != request:
            return False
        for name, size in data["outputs"].items():
            path = self.root / name  # an absolute name stays absolute
            try:
                if path.stat().st_size != size:
                    return False
            except OSError:
                return False
        return True

    def pending(self, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if not self.done(key)]

    def mark_done(
        self,
        key: str,
        record: Mapping[str, Any] | None = None,
        *,
        outputs: Iterable[str | Path] = (),
        request: str | None = None,
    ) -> dict[str, Any]:
        """Record ``key`` as finished, with its ``outputs`` (written before: they must exist).

        Outputs are paths relative to the root, or absolute. ``request`` is the key of what was
        asked (:func:`request_key`), checked by :meth:`done`. Returns the record written.
        """
        listed: dict[str, int] = {}
        for output in outputs:
            path = Path(output)
            full = path if path.is_absolute() else self.root / path
            if not full.is_file():
                raise OutputFileError(
                    f"Output {full} of {key!r} does not exist; write the outputs before "
                    f"mark_done()."
                )
            listed[self._name(full)] = full.stat().st_size
        data = {
            "key": key,
            "completed": datetime.now(UTC).isoformat(timespec="seconds"),
            "outputs": listed,
            "request": request,
            "record": dict(record or {}),
        }
        atomic_write_json(self._path(key, "done"), data)
        with suppress(FileNotFoundError):
            self._path(key, "failed").unlink()
        return data

    def mark_failed(self, key: str, error: BaseException | str) -> None:
        """Note why ``key`` failed (for the end-of-run report); it stays not done."""
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        data = {
            "key": key,
            "failed": datetime.now(UTC).isoformat(timespec="seconds"),
            "error": reason,
        }
        atomic_write_json(self._path(key, "failed"), data)

    def failures(self) -> dict[str, dict[str, Any]]:
        """The failure notes of inputs that failed and have not succeeded since, by key."""
        found = {}
        for path in sorted(self.folder.glob("*.failed.json")):
            with suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
                found[data["key"]] = data
        return found

    def forget(self, key: str, *, remove_outputs: bool = False) -> None:
        """Make ``key`` not done; with ``remove_outputs``, also delete the outputs it listed
        (so that a redo that fails leaves no result of the earlier request behind)."""
        data = self.record(key) if remove_outputs else None
        for state in ("done", "failed"):
            with suppress(FileNotFoundError):
                self._path(key, state).unlink()
        for name in (data or {}).get("outputs", {}):
            with suppress(OSError):
                (self.root / name).unlink()

    def finished(self) -> list[dict[str, Any]]:
        """The records of every key that is done (outputs present), sorted by key."""
        found = []
        for path in sorted(self.folder.glob("*.done.json")):
            key = path.name[: -len(".done.json")]
            if _KEY.match(key) and self.done(key):
                found.append(self.record(key))
        return [data for data in found if data is not None]

    def clean_temp(self, *, stale_after_s: float = STALE_AFTER_S) -> int:
        """Remove temporary files left under the root by killed runs; return how many.

        A temporary file is left over when the process that made it is gone, or when it is older
        than ``stale_after_s``; files of live writers are kept.
        """
        removed = 0
        now = time.time()
        for path in self.root.rglob(f".*{TEMP_SUFFIX}"):
            match = _TEMP_PID.search(path.name)
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            owner_gone = match is not None and not _process_alive(int(match.group(1)))
            if owner_gone or age > stale_after_s:
                with suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def _name(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())


def request_key(request: Mapping[str, Any]) -> str:
    """A short stable digest of everything that determines a result (model digest, method,
    plugin version, options, targets, preprocessing...): JSON with sorted keys, hashed."""
    text = json.dumps(request, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def content_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def module_digest(module: Any) -> dict[str, Any]:
    """What identifies a PyTorch module's weights, for resume keys: its class and a sha256 of
    its parameters' and buffers' names, shapes, dtypes and bytes."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return {"module": type(module).__qualname__, "sha256": digest.hexdigest()}
