"""The run directory: a self-contained, pickle-free bundle of a trained model.

    config.toml      resolved configuration
    run.json         dims, dataset id and hash, env spec, episode split, model sizes, provenance, discretizer digest
    discretizer.npz  bin edges (plain arrays)
    model.pt         weights (state_dict) of the best checkpoint by validation loss
    last.pt          weights at the last step
    checkpoint.pt    full training state for --resume (weights, optimiser, step, RNG)
    metrics.jsonl, loss.png

Everything loads with `torch.load(..., weights_only=True)` / `np.load(..., allow_pickle=False)`, and is
written to a temp file first, then renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trajformer.config import Config, load_config, to_toml
from trajformer.discretizer import Discretizer
from trajformer.files import atomic_write, load_state, load_torch, save_json, save_text, save_torch, shipped
from trajformer.model import GPT, GPTConfig


def save_discretizer(path: Path, disc: Discretizer) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **disc.state_dict())

    atomic_write(path, write)


def load_discretizer(path: Path) -> Discretizer:
    try:
        with np.load(path, allow_pickle=False) as state:
            return Discretizer.from_state_dict(dict(state))
    except FileNotFoundError:
        raise FileNotFoundError(f"discretizer {path} not found; the run directory is incomplete") from None
    except Exception as err:
        detail = str(err).splitlines()[0] if isinstance(err, ValueError) else type(err).__name__
        raise ValueError(f"discretizer {path} is corrupt ({detail}); retrain the run") from None


def discretizer_sha256(disc: Discretizer) -> str:
    """A digest of the bin edges (not of the .npz's bytes): run.json records it, so a discretizer.npz from another
    run with the same dims and bins is refused rather than planned with."""
    digest = hashlib.sha256()
    for key, value in sorted(disc.state_dict().items()):
        # One form on every platform: little-endian 64-bit (numpy's default int is 32-bit on some), at least 1-d.
        value = np.atleast_1d(np.asarray(value))
        array = np.ascontiguousarray(value, dtype="<f8" if value.dtype.kind == "f" else "<i8")
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_discretizer(path: Path, disc: Discretizer, meta: dict) -> None:
    """The run directory's discretizer.npz is the one its run.json recorded (runs since 2026-12-07 record it)."""
    recorded = meta.get("discretizer_sha256")
    if recorded is not None and recorded != discretizer_sha256(disc):
        raise ValueError(f"{path}/discretizer.npz is not the discretizer this run was trained with (its run.json "
                         "records another digest); the run directory mixes files from different runs: restore the "
                         "run's own discretizer.npz, or retrain the run")


@dataclass
class Run:
    """A loaded run directory: the model in eval mode, its discretizer, config and metadata."""

    path: Path
    model: GPT
    discretizer: Discretizer
    config: Config
    meta: dict

    @property
    def obs_dim(self) -> int:
        return self.model.config.obs_dim

    @property
    def act_dim(self) -> int:
        return self.model.config.act_dim

    @property
    def obs_indices(self) -> np.ndarray:
        return np.asarray(self.meta["obs_indices"], dtype=np.int64)


def shipped_models() -> list[str]:
    """Names of the models shipped in pretrained/models (usable wherever a run directory is asked for)."""
    root = shipped("pretrained") / "models"
    return sorted(p.name for p in root.iterdir() if (p / "run.json").is_file()) if root.is_dir() else []


def find_run(run_dir: str | os.PathLike) -> Path:
    """A run directory by path, or a shipped model by name (`hopper-medium`); errors say what was meant."""
    path = Path(run_dir)
    if (path / "run.json").is_file():
        return path
    named = shipped("pretrained") / "models" / str(run_dir)
    if path.name == str(run_dir) and (named / "run.json").is_file():
        return named
    if (path / "run" / "run.json").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no run.json); did you mean {path / 'run'}?")
    models = ", ".join(shipped_models()) or "none installed"
    raise FileNotFoundError(f"{path} is not a run directory (no run.json) nor a shipped model ({models}); "
                            f"train one with `trajformer train`")


def is_run(target: str | os.PathLike) -> bool:
    """Whether `target` names a run directory or a shipped model."""
    try:
        find_run(target)
    except FileNotFoundError:
        return False
    return True


def model_sha256(run: Run) -> str:
    """The sha256 of a run's model.pt: names the weights a fine-tune started from or an evaluation planned with."""
    return hashlib.sha256((Path(run.path) / "model.pt").read_bytes()).hexdigest()


def load_run(run_dir: str | os.PathLike, weights: str = "model.pt") -> Run:
    """Load a run directory or a shipped model by name (no dataset, no pickle); `weights` picks model.pt (best)
    or last.pt."""
    path = find_run(run_dir)
    try:
        meta = json.loads((path / "run.json").read_text())
        gpt_config = GPTConfig(**meta["model"])
        model = GPT(gpt_config)  # sizes of the wrong type fail here
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}/run.json is corrupt ({type(err).__name__}: {err}); retrain the run") from None
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(f"{path} has no config.toml: the run directory is incomplete; copy the whole "
                                "directory, or retrain the run")
    config = load_config(path / "config.toml")
    discretizer = load_discretizer(path / "discretizer.npz")
    if (discretizer.dim, discretizer.n_bins) != (gpt_config.transition_dim, gpt_config.n_bins):
        raise ValueError(
            f"{path}: discretizer has {discretizer.dim} dims and {discretizer.n_bins} bins but the model expects "
            f"{gpt_config.transition_dim} and {gpt_config.n_bins}; the run directory mixes files from different runs"
        )
    check_discretizer(path, discretizer, meta)
    state = load_torch(path / weights)
    load_state(model, state, f"{path / weights} does not fit the model in run.json", "retrain the run")
    model.eval()
    return Run(path, model, discretizer, config, meta)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl log (training or ensemble), oldest first; [] when there is none. Rows are
    appended as training goes, so a last row cut by a kill (no newline after it) is left out; a resumed run
    rewrites the log without it."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()  # the row being written when the process stopped
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {i} is not JSON ({err}); delete that line") from None
    return rows


def write_run_files(out_dir: Path, config_toml: str, discretizer: Discretizer, meta: dict) -> None:
    """Write a run directory's self-description (each file atomically): config.toml, discretizer.npz, run.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_text(out_dir / "config.toml", config_toml)
    save_discretizer(out_dir / "discretizer.npz", discretizer)
    save_json(out_dir / "run.json", {**meta, "discretizer_sha256": discretizer_sha256(discretizer)})


def save_run(out_dir: str | os.PathLike, cfg: Config, model: GPT, discretizer: Discretizer, meta: dict) -> Path:
    """A complete run directory for `model` in the format load_run reads: run.json is `meta` (dataset id, env
    spec, obs_indices, raw_obs_dim, ...) plus the model's sizes; weights go to model.pt."""
    out_dir = Path(out_dir)
    write_run_files(out_dir, to_toml(cfg), discretizer, {**meta, "model": asdict(model.config)})
    save_torch(out_dir / "model.pt", model.state_dict())
    return out_dir
