"""Crash-safe checkpoints for the TRL trainers.

``transformers.Trainer`` writes a checkpoint folder in place: a run killed mid-write (or a
full disk) leaves a folder that looks like a checkpoint. :class:`~opsd_train.recipes.
RecipeMixin` runs the Trainer's own saving inside :func:`atomic_checkpoint`: every file
goes to ``checkpoints/.step_N.partial-PID/``, is fsynced, a ``COMPLETE.json`` marker with
each file's size and SHA-256 is written last, and the folder is renamed to ``step_N``.
:func:`find_latest` (``--resume latest``) skips torn checkpoints and names them.

Resuming goes through ``Trainer.train(resume_from_checkpoint=...)``, which reads the
weights with safetensors and the optimizer, scheduler and RNG states with
``torch.load(weights_only=True)`` (numpy's reconstruct/ndarray/dtype allow-listed for the
RNG state): a crafted checkpoint cannot run code (tested). The trainer state is JSON.

The Trainer methods this relies on are private; they are pinned here, in
:data:`PRIVATE_TRAINER_API`, and a test checks them against the installed transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

__all__ = [
    "MARKER_FILE",
    "PRIVATE_TRAINER_API",
    "CheckpointError",
    "IncompleteCheckpointError",
    "CheckpointWriteError",
    "atomic_checkpoint",
    "verify_checkpoint",
    "find_latest",
    "prune_checkpoints",
    "truncate_metrics",
]

FORMAT = "opsd_train.checkpoint.v3"
MARKER_FILE = "COMPLETE.json"
# transformers.Trainer private methods the recipe overrides or calls (name: parameters)
PRIVATE_TRAINER_API = {"_save_checkpoint": ("self", "model", "trial")}
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint is torn (killed during its write) or corrupted."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint or a run file failed; the message names the path."""

    @classmethod
    def wrap(cls, e: OSError, what: str) -> CheckpointWriteError:
        err = cls(f"{what}: {getattr(e, 'strerror', None) or e}")
        err.errno = getattr(e, "errno", None)
        return err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - directories on some filesystems
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_checkpoint(root: str | Path, step: int, write: bool = True):
    """Yield a temporary folder; the Trainer writes ``checkpoint-<step>/`` into it. On
    success its files are fsynced, the marker is written and the folder becomes
    ``root/step_<step>`` (replacing an older one of that step). On error the temporary
    folder is removed and a :class:`CheckpointWriteError` names the path. ``write=False``
    (non-main processes) yields the folder without finalising it."""
    root = Path(root)
    tmp = root / f".step_{step}.partial-{os.getpid()}"
    final = root / f"step_{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointWriteError.wrap(e, f"cannot create checkpoint folder {tmp}") from e
    try:
        yield tmp
        if not write:
            return
        inner = tmp / f"checkpoint-{step}"
        files = {}
        for f in sorted(p for p in inner.rglob("*") if p.is_file()):
            _fsync(f)
            files[str(f.relative_to(inner))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        marker = inner / MARKER_FILE
        marker.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}))
        _fsync(marker)
        _fsync(inner)
        if final.exists():
            shutil.rmtree(final)
        inner.rename(final)
        _fsync(root)
    except OSError as e:
        raise CheckpointWriteError.wrap(e, f"cannot write checkpoint {final}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_checkpoint(path: str | Path, *, deep: bool = False) -> dict:
    """Check that checkpoint folder ``path`` is complete: the marker exists and every file
    has its recorded size (``deep``: and SHA-256). Returns the marker; raises
    :class:`IncompleteCheckpointError` naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise IncompleteCheckpointError(
            f"checkpoint {path} has no completion marker {MARKER_FILE}: it is incomplete "
            "(killed while being written)"
        )
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise IncompleteCheckpointError(f"{marker} is unreadable ({e})") from e
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise IncompleteCheckpointError(f"{f} is missing: the checkpoint is incomplete")
        if f.stat().st_size != info["bytes"]:
            raise IncompleteCheckpointError(
                f"{f} has {f.stat().st_size} bytes, {info['bytes']} were written: truncated"
            )
        if deep and _sha256(f) != info["sha256"]:
            raise IncompleteCheckpointError(f"{f} does not match its SHA-256: corrupted")
    return data


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()
    )


def find_latest(root: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` (a ``checkpoints/`` folder), or
    ``None``; torn ones (``.partial`` folders, step folders failing
    :func:`verify_checkpoint`) are skipped and named in a warning."""
    root = Path(root)
    torn = sorted(str(p) for p in root.glob(".step_*.partial-*")) if root.is_dir() else []
    found = None
    for _, p in reversed(_step_dirs(root)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            torn.append(f"{p} ({e})")
            continue
        found = p
        break
    if warn and torn:
        warnings.warn("skipped torn checkpoint(s): " + "; ".join(torn), stacklevel=2)
    return found


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints under ``root``; torn
    ones are left for inspection. Returns the deleted folders."""
    complete = []
    for _, p in _step_dirs(Path(root)):
        with contextlib.suppress(CheckpointError):
            verify_checkpoint(p)
            complete.append(p)
    doomed = complete[:-keep_last]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` written after ``step`` (a resumed run writes
    them again); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))
    return len(lines) - len(kept)
