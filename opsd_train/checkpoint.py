"""Crash-safe checkpoints: atomic writes, a completion marker, ``latest``, pruning, and
the configuration check on resume.

Layout of one checkpoint ``<run>/checkpoints/step_N/``::

    trainer_state.pt   weights (or adapter), optimizer, scheduler, teacher, step, RNG
    config.json        the effective configuration of the run (read before any model load)
    COMPLETE.json      written last: format, step, byte count and SHA-256 of both files

A checkpoint is first written into a hidden sibling ``.step_N.partial-<pid>/``: each file is
flushed and fsynced, the marker is written last, then the folder is renamed to
``step_N`` (an atomic rename) and the parent folder fsynced. A process killed at any
moment therefore leaves either the previous state or a complete checkpoint; only a
``.partial`` folder can be torn, and :func:`find_latest` skips it with a warning. Reading
verifies the marker (sizes always; the hash when the state is loaded), so a truncated or
corrupted file is reported by name instead of failing inside ``torch.load``. Write errors
(disk full, permissions) are re-raised as :class:`CheckpointWriteError` naming the path;
the partial folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "STATE_FILE",
    "CONFIG_FILE",
    "MARKER_FILE",
    "CheckpointError",
    "IncompleteCheckpointError",
    "CheckpointWriteError",
    "write_checkpoint",
    "verify_checkpoint",
    "read_checkpoint_config",
    "load_checkpoint_state",
    "find_latest",
    "prune_checkpoints",
    "config_differences",
    "check_resume_config",
    "truncate_metrics",
]

FORMAT = "opsd_train.checkpoint.v2"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
MARKER_FILE = "COMPLETE.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20

# How files are opened for writing; tests replace it with a failing writer.
_opener = open


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint is torn (killed during its write) or corrupted."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or a run file) failed; the message names the path (``errno``
    is the underlying error's)."""

    @classmethod
    def wrap(cls, e: OSError, what: str) -> CheckpointWriteError:
        """``what`` (naming the path) plus ``e``'s reason."""
        err = cls(f"{what}: {getattr(e, 'strerror', None) or e}")
        err.errno = getattr(e, "errno", None)
        return err


class _HashingWriter:
    """File wrapper counting and hashing the bytes written through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.error: OSError | None = None  # torch.save hides it behind its own message

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(b)
        self.bytes += len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> dict:
    """Open ``path``, call ``write(file)``, flush and fsync; returns size and hash."""
    with _opener(path, "wb") as f:
        w = _HashingWriter(f)
        try:
            write(w)
        except Exception as e:
            if w.error is not None:
                raise w.error from e
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": w.bytes, "sha256": w.sha.hexdigest()}


def write_checkpoint(
    path: str | Path,
    state: Mapping,
    config: Mapping,
    step: int,
    *,
    extra: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``state`` (``torch.save``) and ``config`` (JSON) atomically into folder ``path``.

    ``extra`` maps names to files or folders already written (e.g. the shards of a
    ``torch.distributed.checkpoint`` save, :mod:`opsd_train.distributed`): each is moved
    into the checkpoint under its name before the marker, and every file in it is
    recorded in the marker (size and SHA-256) like the state file.
    An existing checkpoint at ``path`` is replaced only once the new one is complete.
    Raises :class:`CheckpointWriteError` naming the path when a write fails.
    """
    import torch

    path = Path(path)
    parent = path.parent
    tmp = parent / f".{path.name}.partial-{os.getpid()}"
    current = tmp / STATE_FILE
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {STATE_FILE: _write_file(current, lambda f: torch.save(dict(state), f))}
        current = tmp / CONFIG_FILE
        text = json.dumps({"step": step, "config": dict(config)}, indent=2, default=str)
        files[CONFIG_FILE] = _write_file(current, lambda f: f.write(text.encode()))
        for name, src in (extra or {}).items():
            current = tmp / name
            os.rename(src, current)
            found = sorted(current.rglob("*")) if current.is_dir() else [current]
            for f in found:
                if f.is_file():
                    files[f.relative_to(tmp).as_posix()] = {
                        "bytes": f.stat().st_size,
                        "sha256": _file_sha256(f),
                    }
            _fsync_dir(current if current.is_dir() else tmp)
        marker = {"format": FORMAT, "step": int(step), "files": files}
        current = tmp / MARKER_FILE
        _write_file(current, lambda f: f.write(json.dumps(marker, indent=2).encode()))
        _fsync_dir(tmp)
        current = path
        old = None
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e)
        err = CheckpointWriteError(
            f"cannot write checkpoint {path} (failed at {current}): {reason}"
            " - is the disk full or the folder not writable? The previous checkpoints "
            "are untouched."
        )
        err.errno = getattr(e, "errno", None)
        raise err from e
    return path


def _read_marker(path: Path) -> dict:
    marker = path / MARKER_FILE
    if not marker.is_file():
        if (path / STATE_FILE).is_file():
            raise IncompleteCheckpointError(
                f"checkpoint {path} has no completion marker {MARKER_FILE}: it is "
                "incomplete (killed while being written) or was written by an older "
                "opsd_train without one"
            )
        raise CheckpointError(f"no checkpoint at {path} (no {STATE_FILE})")
    try:
        data = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IncompleteCheckpointError(
            f"{marker} is unreadable: the checkpoint is incomplete or corrupted ({e})"
        ) from e
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: unknown checkpoint format {data.get('format')!r}")
    return data


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | Path, *, deep: bool = False) -> dict:
    """Check that the checkpoint folder ``path`` is complete: the marker exists and every
    file has the recorded size (and, with ``deep``, the recorded SHA-256). Returns the
    marker; raises :class:`IncompleteCheckpointError` naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    marker = _read_marker(path)
    for name, info in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise IncompleteCheckpointError(f"{f} is missing: the checkpoint is incomplete")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise IncompleteCheckpointError(
                f"{f} has {size} bytes, {info['bytes']} were written: the checkpoint is "
                "incomplete (truncated)"
            )
        if deep and _file_sha256(f) != info["sha256"]:
            raise IncompleteCheckpointError(
                f"{f} does not match its recorded SHA-256: the checkpoint is corrupted"
            )
    return marker


def read_checkpoint_config(path: str | Path) -> dict:
    """The effective configuration stored with a (verified) checkpoint; cheap: no model or
    state is loaded."""
    path = Path(path)
    verify_checkpoint(path)
    return json.loads((path / CONFIG_FILE).read_text())["config"]


def load_checkpoint_state(path: str | Path) -> dict:
    """Verify (sizes and hash) and ``torch.load`` the trainer state of folder ``path``."""
    import torch

    path = Path(path)
    verify_checkpoint(path, deep=True)
    f = path / STATE_FILE
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, OSError, ValueError) as e:  # pragma: no cover - hashed
        raise IncompleteCheckpointError(f"{f} cannot be read ({e})") from e


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(root: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` (a ``checkpoints/`` folder), or
    ``None``. Torn ones (``.partial`` folders, step folders that fail
    :func:`verify_checkpoint`) are skipped, each named in a warning."""
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
        warnings.warn("skipped torn/incomplete checkpoint(s): " + "; ".join(torn), stacklevel=2)
    return found


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints under ``root``;
    returns the deleted folders. Incomplete ones are left for inspection."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    complete = []
    for _, p in _step_dirs(Path(root)):
        try:
            verify_checkpoint(p)
        except CheckpointError:
            continue
        complete.append(p)
    doomed = complete[:-keep_last]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


# ---------------------------------------------------------------------------------------
# configuration on resume
# ---------------------------------------------------------------------------------------


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def config_differences(
    stored: Mapping, current: Mapping, policies: Mapping[str, str]
) -> list[tuple[str, object, object]]:
    """``(key, stored, current)`` for each key whose value differs and whose policy is not
    ``"free"`` (keys missing on one side are compared only when both have them)."""
    out = []
    for k in sorted(set(stored) & set(current)):
        if policies.get(k, "override") == "free":
            continue
        if _norm(stored[k]) != _norm(current[k]):
            out.append((k, stored[k], current[k]))
    return out


def check_resume_config(
    stored: Mapping,
    current: Mapping,
    policies: Mapping[str, str],
    allow: Iterable[str] = (),
    where: str = "the checkpoint",
) -> None:
    """Raise :class:`CheckpointError` listing every key that differs from ``stored``,
    unless it is named in ``allow`` and its policy is ``"override"``."""
    allow = set(allow)
    bad_allow = sorted(k for k in allow if policies.get(k) == "fixed")
    if bad_allow:
        raise CheckpointError(
            f"--resume-override cannot change {bad_allow}: these settings cannot take effect "
            "after a resume (optimizer state, adapter shape or teacher state hold them)"
        )
    diffs = [d for d in config_differences(stored, current, policies) if d[0] not in allow]
    if diffs:
        lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs)
        overridable = [k for k, _, _ in diffs if policies.get(k, "override") == "override"]
        hint = ""
        if overridable:
            hint = (
                f". To change {', '.join(overridable)} on purpose, pass "
                f"--resume-override {','.join(overridable)}"
            )
        fixed = [k for k, _, _ in diffs if policies.get(k) == "fixed"]
        if fixed:
            hint += f". {', '.join(fixed)} cannot change in a resumed run"
        raise CheckpointError(f"the configuration differs from {where}: {lines}{hint}")


def truncate_metrics(path: str | Path, phase: str, step: int) -> int:
    """Drop records of ``phase`` written after ``step`` from a ``metrics.jsonl`` (all of the
    phase's records when ``step`` is 0), and any torn (unparsable) line, so a resumed run
    writes no duplicates. Rewrites the file atomically; returns the number dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if rec.get("phase") == phase and (step == 0 or rec.get("step", 0) > step):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
