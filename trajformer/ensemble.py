"""PETS-style probabilistic ensemble of feed-forward Gaussian dynamics models (DESIGN.md §7 baseline).

Each member maps a normalised (s, a) to a Gaussian over the normalised (Δs, r) with a learned, softly
bounded log-variance (Chua et al. 2018); members are trained on their own bootstrap resamples with the
Gaussian NLL, on the same seeded episode split as the transformer; the ensemble keeps the weights of its best
epoch by mean validation NLL (early stopping). Not each member its own best epoch, as MBPO does: the members
share the log-variance bounds, and a member's weights from one epoch beside another epoch's bounds predict
worse variances (humanoid: validation NLL 0.171 against 0.138 at the best epoch). `disagreement(s, a)` is the
spread of the members' means in normalised units, a plotting aid (MOPO and MOReL compute their own signals in
raw units, baselines/model_env.py). The run directory is self-contained like the
transformer's:

    ensemble.json   sizes, dims, dataset, split, training record (epochs, wall-clock, validation metrics)
    model.pt        weights and normalisation statistics (state_dict; weights_only loads)
    metrics.jsonl, loss.png
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trajformer.config import Config, EnsembleConfig
from trajformer.data import Episode, OfflineData, load_episodes, split_episodes, split_record
from trajformer.files import load_state, load_torch, save_json, save_text, save_torch, writable_dir
from trajformer.run import read_metrics


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: (E, n, in) -> (E, n, out)."""

    def __init__(self, members: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(members, n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(members, 1, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class GaussianEnsemble(nn.Module):
    """The ensemble with its input/output normalisation; predicts (Δs, r) for raw (s, a)."""

    def __init__(self, obs_dim: int, act_dim: int, members: int = 5, hidden: int = 200, layers: int = 4):
        super().__init__()
        self.obs_dim, self.act_dim, self.members = obs_dim, act_dim, members
        n_in, n_out = obs_dim + act_dim, obs_dim + 1
        sizes = [n_in] + [hidden] * layers
        self.hidden = nn.ModuleList([EnsembleLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.out = EnsembleLinear(members, sizes[-1], 2 * n_out)
        self.max_logvar = nn.Parameter(torch.full((n_out,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((n_out,), -10.0))
        for name, size in (("in_mean", n_in), ("in_std", n_in), ("out_mean", n_out), ("out_std", n_out)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))

    def set_normalization(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Per-dimension mean/std of the training inputs and targets (constant dims keep std 1)."""
        for prefix, arr in (("in", inputs), ("out", targets)):
            mean, std = arr.mean(0), arr.std(0)
            std = np.where(std < 1e-6, 1.0, std)
            getattr(self, f"{prefix}_mean").copy_(torch.as_tensor(mean))
            getattr(self, f"{prefix}_std").copy_(torch.as_tensor(std))

    def forward_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and bounded log-variance (E, n, dS+1) in normalised target units, for inputs (E, n, dS+dA)."""
        h = (x - self.in_mean) / self.in_std
        for layer in self.hidden:
            h = F.silu(layer(h))
        mean, raw = self.out(h).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean and std (E, n, dS+1) of [s', r] in raw units for raw (n, dS), (n, dA) inputs."""
        x = torch.cat([obs, act], dim=-1).expand(self.members, -1, -1)
        mean, logvar = self.forward_normalized(x)
        mean = mean * self.out_std + self.out_mean
        mean = torch.cat([mean[..., : self.obs_dim] + obs, mean[..., self.obs_dim :]], dim=-1)
        return mean, (0.5 * logvar).exp() * self.out_std

    @torch.no_grad()
    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Std across members of their predicted means, averaged over the normalised outputs: (n,)."""
        x = torch.as_tensor(np.concatenate([obs, act], axis=-1), dtype=torch.float32)
        mean, _ = self.forward_normalized(x.expand(self.members, -1, -1))
        return mean.std(dim=0).mean(dim=-1).numpy()


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element Gaussian negative log-likelihood, including the constant."""
    return 0.5 * ((target - mean) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))


def transitions(episodes: list[Episode]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs [s, a] (n, dS+dA), targets [Δs, r] (n, dS+1) and next states s' (n, dS) of all transitions."""
    obs = np.concatenate([e.obs[:-1] for e in episodes])
    nxt = np.concatenate([e.obs[1:] for e in episodes])
    act = np.concatenate([e.act for e in episodes])
    rew = np.concatenate([e.rew for e in episodes])
    return np.concatenate([obs, act], 1), np.concatenate([nxt - obs, rew[:, None]], 1), nxt


def validation_split(cfg: Config, n_episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's episode split (train, validation), refused when it leaves no validation episode: the ensemble
    stops early on them (compare checks it before training anything)."""
    train_idx, val_idx = split_episodes(n_episodes, cfg.data.validation_fraction, cfg.split_seed)
    if len(val_idx) == 0:
        raise ValueError("the ensemble needs validation episodes for early stopping; set data.validation_fraction > 0")
    return train_idx, val_idx


def obs_std(data: OfflineData) -> np.ndarray:
    """Per-dimension std of the dataset's observations (the error normaliser of DESIGN.md §7)."""
    std = np.concatenate([e.obs for e in data.episodes]).std(0)
    return np.where(std < 1e-8, 1.0, std)


@torch.no_grad()
def validation_metrics(model: GaussianEnsemble, inputs: np.ndarray, targets: np.ndarray, std: np.ndarray,
             chunk: int = 8192) -> dict:
    """Validation metrics: per-member NLL (normalised targets, nats per dim), the mixture's NLL of s' in
    dataset-std units (nats per obs dim), and the RMS one-step error of the mean s' in dataset stds."""
    dS = model.obs_dim
    member, mixture, sq = torch.zeros(model.members, dtype=torch.float64), 0.0, 0.0
    log_std = torch.as_tensor(np.log(std), dtype=torch.float32)
    for lo in range(0, len(inputs), chunk):
        x = torch.as_tensor(inputs[lo : lo + chunk], dtype=torch.float32)
        y = torch.as_tensor(targets[lo : lo + chunk], dtype=torch.float32)
        mean, logvar = model.forward_normalized(x.expand(model.members, -1, -1))
        y_norm = (y - model.out_mean) / model.out_std
        member += gaussian_nll(mean, logvar, y_norm).mean(-1).sum(-1).double()
        # Density of s'_d / std_d: normalised-target density / out_std_d * std_d.
        per_dim = gaussian_nll(mean, logvar, y_norm)[..., :dS] + torch.log(model.out_std[:dS]) - log_std
        mix = -(torch.logsumexp(-per_dim.sum(-1), dim=0) - math.log(model.members))
        mixture += float(mix.sum()) / dS
        pred = (mean.mean(0) * model.out_std + model.out_mean)[:, :dS]
        sq += float((((pred - y[:, :dS]) / torch.as_tensor(std, dtype=torch.float32)) ** 2).mean(-1).sqrt().sum())
    n = len(inputs)
    return {"val_nll": float(member.mean() / n), "val_nll_members": (member / n).tolist(),
            "val_obs_nll_std_units": mixture / n, "val_one_step_error": sq / n}


def train_ensemble(cfg: Config, out_dir: str | os.PathLike, ens: EnsembleConfig | None = None,
                   dataset_id: str | None = None, progress: bool = True) -> Path:
    """Train an ensemble on cfg's dataset and episode split (data.validation_fraction, data.split_seed) into out_dir."""
    ens = ens or cfg.ensemble
    out_dir = Path(out_dir)
    if (out_dir / "ensemble.json").exists():
        raise FileExistsError(f"{out_dir} already holds an ensemble; choose another --out or delete it")
    if _half_trained(out_dir):  # this command's own leftovers from a stop: start over
        if progress:
            print(f"{out_dir} holds an ensemble whose training stopped before it finished: training it again",
                  flush=True)
        for path in out_dir.iterdir():  # only its own files and their temp files (checked above)
            path.unlink()
    taken = [name for name in ("run.json", "model.pt", "metrics.jsonl") if (out_dir / name).exists()]
    if taken:  # a transformer run (or another job's files): its weights and log would be overwritten
        raise FileExistsError(f"{out_dir} already holds {', '.join(taken)} (a run directory?); train the ensemble "
                              "into a new --out directory")
    writable_dir(out_dir)  # now, not after the training
    data = load_episodes(dataset_id or cfg.data.dataset, cfg.data)
    train_idx, val_idx = validation_split(cfg, len(data.episodes))
    x_tr, y_tr, _ = transitions([data.episodes[i] for i in train_idx])
    x_va, y_va, _ = transitions([data.episodes[i] for i in val_idx])
    std = obs_std(data)

    torch.manual_seed(ens.seed)
    rng = np.random.default_rng(ens.seed)
    model = GaussianEnsemble(data.obs_dim, data.act_dim, ens.members, ens.hidden, ens.layers)
    model.set_normalization(x_tr, y_tr)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.Adam([{"params": decay, "weight_decay": ens.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=ens.learning_rate)
    x_t, y_t = torch.as_tensor(x_tr, dtype=torch.float32), torch.as_tensor(y_tr, dtype=torch.float32)
    y_t = (y_t - model.out_mean) / model.out_std
    n, batch = len(x_t), min(ens.batch_size, len(x_t))

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    save_text(metrics_path, "")
    best = math.inf
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    stale, epoch, steps, t0 = 0, 0, 0, time.perf_counter()
    first = validation_metrics(model, x_va, y_va, std)
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"epoch": 0, **first}) + "\n")
    boot = rng.integers(0, n, (ens.members, n))  # each member's bootstrap resample, drawn once (PETS, MOPO)
    while epoch < ens.max_epochs and stale < ens.patience:
        if ens.max_seconds and time.perf_counter() - t0 > ens.max_seconds:
            break
        model.train()
        order = torch.as_tensor(rng.permuted(boot, axis=1))  # each member's own rows, reshuffled every epoch
        total = 0.0
        for lo in range(0, n - batch + 1, batch):
            idx = order[:, lo : lo + batch]
            mean, logvar = model.forward_normalized(x_t[idx])
            loss = gaussian_nll(mean, logvar, y_t[idx]).mean(dim=(1, 2)).sum()
            loss = loss + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        epoch += 1
        model.eval()
        row = validation_metrics(model, x_va, y_va, std)
        if row["val_nll"] < best - 1e-3 * min(abs(best), 1e6):  # a relative improvement of at least 0.1%
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            best, stale = row["val_nll"], 0
        else:
            stale += 1
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "train_loss": total / max(1, n // batch), **row}) + "\n")
        if progress:
            print(f"epoch {epoch}: train {total / max(1, n // batch):.3f} val nll {row['val_nll']:.3f} "
                  f"one-step error {row['val_one_step_error']:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.eval()
    final = validation_metrics(model, x_va, y_va, std)
    save_torch(out_dir / "model.pt", model.state_dict())
    meta = {
        "format": 1, "kind": "gaussian-ensemble",
        "dataset_id": data.dataset_id, "env": data.env_spec, "obs_indices": data.obs_indices.tolist(),
        "raw_obs_dim": data.raw_obs_dim, "obs_dim": data.obs_dim, "act_dim": data.act_dim,
        "ensemble": asdict(ens), "obs_std": std.tolist(),
        "split": split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed),
        "training": {"epochs": epoch, "gradient_steps": steps, "seconds": seconds, "threads": torch.get_num_threads(),
                     "train_transitions": int(n), "validation_transitions": len(x_va),
                     "stopped": "patience" if stale >= ens.patience else
                                "max_epochs" if epoch >= ens.max_epochs else "max_seconds"},
        "validation": final, "initial_validation": first, "dataset_sha256": data.sha256,
    }
    save_json(out_dir / "ensemble.json", meta)
    plot_metrics(metrics_path, out_dir / "loss.png")
    return out_dir


OWN_FILES = ("metrics.jsonl", "model.pt", "loss.png")  # what train_ensemble writes before ensemble.json


def _half_trained(out_dir: Path) -> bool:
    """Whether out_dir holds only what a stopped `train_ensemble` leaves: its metrics.jsonl (empty while the first
    validation runs, else rows that each carry the members' validation NLL), perhaps model.pt and loss.png and the
    temp files of a write killed outright (atomic_write's `.NAME.*.tmp*`)."""
    metrics = out_dir / "metrics.jsonl"
    try:
        names = {p.name for p in out_dir.iterdir()} if metrics.is_file() else set()
        text = metrics.read_text() if names else ""
    except (OSError, UnicodeDecodeError):
        return False
    temps = {n for n in names if any(n.startswith(f".{own}.") and ".tmp" in n for own in OWN_FILES)}
    if not names or not names - temps <= set(OWN_FILES):
        return False
    if not text:
        return names - temps == {"metrics.jsonl"}  # stopped before the first row: nothing else written yet
    try:
        return all("val_nll_members" in json.loads(line) for line in text.splitlines())
    except (json.JSONDecodeError, TypeError):
        return False


def plot_metrics(metrics_path: Path, out_path: Path) -> None:
    """loss.png: training loss and validation NLL per epoch."""
    from trajformer.plots import line_plot

    rows = read_metrics(metrics_path)
    curves = {"train loss (mean member)": [(r["epoch"], r["train_loss"] / len(r["val_nll_members"]))
                                           for r in rows if "train_loss" in r],
              "validation NLL (mean member)": [(r["epoch"], r["val_nll"]) for r in rows]}
    line_plot(curves, out_path, xlabel="epoch", ylabel="Gaussian NLL per dim (normalised targets)")


@dataclass
class Ensemble:
    """A loaded ensemble directory: the model in eval mode and its metadata."""

    path: Path
    model: GaussianEnsemble
    meta: dict

    @property
    def obs_indices(self) -> np.ndarray:
        return np.asarray(self.meta["obs_indices"], dtype=np.int64)

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Member disagreement (n,) for raw (n, dS) observations (after selection) and (n, dA) actions."""
        return self.model.disagreement(obs, act)


def load_ensemble(path: str | os.PathLike) -> Ensemble:
    """Load an ensemble directory written by `trajformer train-ensemble`."""
    path = Path(path)
    if not (path / "ensemble.json").is_file():
        raise FileNotFoundError(f"{path} is not an ensemble directory (no ensemble.json); train one with "
                                f"`trajformer train-ensemble CONFIG.toml --out {path}`")
    try:
        meta = json.loads((path / "ensemble.json").read_text())
        sizes = meta["ensemble"]
        model = GaussianEnsemble(meta["obs_dim"], meta["act_dim"], sizes["members"], sizes["hidden"], sizes["layers"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}/ensemble.json is corrupt ({err}); retrain the ensemble") from None
    load_state(model, load_torch(path / "model.pt"), f"{path}/model.pt does not fit ensemble.json",
               "retrain the ensemble")
    model.eval()
    return Ensemble(path, model, meta)
