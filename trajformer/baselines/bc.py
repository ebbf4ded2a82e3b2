"""Behaviour cloning: an MLP regressing actions on normalised observations, trained on the training episodes of
the same split a TT run uses, and evaluated with the shared protocol (rollout.run_episodes).

It is the reference an offline-RL score is read against (DESIGN.md §6): a planner that does not beat BC on the
same transitions has learned nothing the data's actions did not already say. Files: bc.pt (state_dict, plain
tensors) and bc.json (settings, dims, env, split, training and evaluation records).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trajformer.baselines.policy import DatasetPolicy, data_references
from trajformer.config import Config
from trajformer.data import load_episodes, split_episodes, split_record
from trajformer.files import load_json, load_state, load_torch, save_json, save_torch, writable_dir


@dataclass
class BCConfig:
    """MLP size and training length (20k steps of 256: about a minute of one CPU core for Hopper)."""

    hidden: int = 256
    layers: int = 2
    steps: int = 20_000
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0


class BCPolicy(DatasetPolicy):
    """obs (raw env observation) -> action: select the run's dims, standardise, MLP, clip to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__(obs_dim, act_dim)
        widths = [obs_dim] + [hidden] * layers
        body = [m for a, b in zip(widths[:-1], widths[1:], strict=True) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*body, nn.Linear(widths[-1], act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Actions for already selected observations (batch, obs_dim)."""
        return self.net(self.norm(obs))

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def train_bc(cfg: Config, out_dir: str | os.PathLike, bc: BCConfig | None = None, dataset_id: str | None = None,
             progress: bool = True) -> Path:
    """Fit BC on the training episodes of cfg's dataset and split (data.validation_fraction, data.split_seed);
    writes bc.pt and bc.json into out_dir and returns it. Validation MSE is reported on the held-out episodes."""
    bc = bc or BCConfig()
    if min(bc.hidden, bc.layers, bc.steps, bc.batch_size) < 1 or bc.learning_rate <= 0:
        raise ValueError(f"BC settings must be positive: {bc}")
    writable_dir(Path(out_dir))  # now, not after the training
    data = load_episodes(dataset_id or cfg.data.dataset, cfg.data)
    train_idx, val_idx = split_episodes(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)

    def arrays(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        obs = np.concatenate([data.episodes[i].obs[:-1] for i in idx])
        act = np.concatenate([data.episodes[i].act for i in idx])
        return torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32)

    x, y = arrays(train_idx)
    torch.manual_seed(bc.seed)
    policy = BCPolicy(data.obs_dim, data.act_dim, bc.hidden, bc.layers)
    policy.fit_data(x, y, data.obs_indices)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=bc.learning_rate)
    generator = torch.Generator().manual_seed(bc.seed)
    start = time.perf_counter()
    for _ in tqdm(range(bc.steps), desc="bc", unit="step", disable=None if progress else True):
        ids = torch.randint(len(x), (min(bc.batch_size, len(x)),), generator=generator)
        loss = ((policy(x[ids]) - y[ids]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_mse, val_mse = float(((policy(x) - y) ** 2).mean()), None
        if len(val_idx):
            xv, yv = arrays(val_idx)
            val_mse = float(((policy(xv) - yv) ** 2).mean())
    out_dir = Path(out_dir)
    save_torch(out_dir / "bc.pt", policy.state_dict())
    save_json(out_dir / "bc.json", {
        "config": dataclasses.asdict(bc), "dataset_id": data.dataset_id, "dataset_sha256": data.sha256,
        "env": data.env_spec,
        "obs_dim": data.obs_dim, "act_dim": data.act_dim, "raw_obs_dim": data.raw_obs_dim,
        "split": split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed),
        "training": {"steps": bc.steps, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                     "train_mse": train_mse, "validation_mse": val_mse, "transitions": len(x)},
        **data_references(data),
    })
    return out_dir


def load_bc(path: str | os.PathLike) -> tuple[BCPolicy, dict]:
    """The policy and bc.json of a directory written by train_bc (no pickle)."""
    path = Path(path)
    if not (path / "bc.json").is_file():
        raise FileNotFoundError(f"{path} has no bc.json; train one with `trajformer bc CONFIG.toml --out {path}`")
    meta = load_json(path / "bc.json", f"train it again with `trajformer bc CONFIG.toml --out {path}`")
    policy = BCPolicy(meta["obs_dim"], meta["act_dim"], meta["config"]["hidden"], meta["config"]["layers"])
    load_state(policy, load_torch(path / "bc.pt"), f"{path / 'bc.pt'} does not fit {path / 'bc.json'}",
               "train it again (a retrain was stopped between its two files?)")
    return policy.eval(), meta
