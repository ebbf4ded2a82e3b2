"""Safe files: every write goes to a temp file that is renamed into place (a crash never leaves half a file),
and checkpoints load as plain tensors (`torch.load(..., weights_only=True)`), never unpickled objects."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def shipped(name: str) -> Path:
    """A folder we ship beside the package (`pretrained`, `configs`): the source tree's in a checkout or an
    editable install, else the copy a wheel installs under <prefix>/share/trajformer/."""
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "trajformer" / name


def set_aside(path: Path) -> Path:
    """Where `trajformer collect --overwrite` keeps a dataset directory's old copy until the new one is whole: a
    hidden sibling, which Minari's listing skips."""
    return path.with_name(f".{path.name}.replaced")


def writing_mark(path: Path) -> Path:
    """A hidden sibling that `trajformer collect` keeps beside a dataset directory while it writes it: found with no
    collect running, it marks a write killed outright (SIGKILL, power), whose dataset may be partial."""
    return path.with_name(f".{path.name}.writing")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename the temp file onto `path`. The temp file ends in `path`'s suffix, for
    writers that pick the format from it (imageio's video writers). Its bytes reach the disk before the rename,
    and the rename before this returns, so a power loss leaves the old file or the new one, never an empty one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync(path: str | Path) -> None:
    """Flush a file's or a directory's pending writes to the disk (a directory: its renames). Filesystems that
    cannot sync a directory say so with an OSError, which is ignored: there the rename is as durable as it gets."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def writable_dir(path: Path, fix: str = "pass --out DIR somewhere writable") -> None:
    """Check before a long job that `path` is, or can be made, a directory this process can write into."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "not writable"
        raise ValueError(f"cannot write into {path} ({existing} is {why}); {fix}")


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An advisory lock on `path` (created if missing) for the duration of the block, so processes sharing a file
    (two evaluations of one run directory) read, merge and write it in turn. Yields False if `wait` is False and
    another process holds it. No-op (always True) where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_json(path: Path, obj: dict) -> None:
    save_text(path, json.dumps(obj, indent=1) + "\n")


def load_json(path: Path, fix: str):
    """A JSON file's content; a damaged one (cut short, hand-edited) is a one-line error naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


def save_torch(path: Path, obj) -> None:
    """torch.save through an open file, so the archive's inner names (and the file's bytes, its sha256) do not
    depend on the temp file's random name; a failed write (a full disk) is an OSError naming the file."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    try:
        atomic_write(path, write)
    except RuntimeError as err:  # torch's zip writer reports a short write this way
        raise OSError(f"cannot write {path} ({str(err).strip().splitlines()[0]}); free disk space or check "
                      "that the directory is writable") from None


def load_state(module: torch.nn.Module, state, what: str, fix: str) -> None:
    """module.load_state_dict(state), with a mismatch as a one-line ValueError that names it (`what`, `fix`)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[:2])[:300]  # the first line only says "Error(s) in loading state_dict"
        raise ValueError(f"{what} ({detail}); {fix}") from None


def load_torch(path: Path):
    """Load a tensor checkpoint without unpickling objects; a corrupt file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train a model into {path.parent} first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ValueError(
            f"checkpoint {path} is corrupt or not a trajformer checkpoint ({type(err).__name__}); "
            f"delete it and retrain, or restore it from a backup"
        ) from None
