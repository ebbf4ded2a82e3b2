"""What every baseline's policy shares: the data's observation statistics, action bounds and observation
selection as buffers (saved with the weights), and the rollout.Agent interface around its mean action; and the
transitions they learn from as tensors (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trajformer.config import DataConfig
from trajformer.data import Episode, OfflineData, load_episodes, prefix_return_mean, return_stats

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the Gaussian policies' log-std range (SAC; IQL's official policy)


@dataclass
class Batch:
    """Transitions as tensors: obs (n, dS), act (n, dA) in the env's units, rew (n,), nxt (n, dS), done (n,)."""

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    nxt: torch.Tensor
    done: torch.Tensor

    @classmethod
    def of_episodes(cls, episodes: list[Episode]) -> Batch:
        """Every transition of `episodes` as float32 tensors; done marks true terminations only (a time limit
        bootstraps)."""
        def cat(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.as_tensor(np.concatenate(arrays), dtype=torch.float32)

        return cls(cat([e.obs[:-1] for e in episodes]), cat([e.act for e in episodes]), cat([e.rew for e in episodes]),
                   cat([e.obs[1:] for e in episodes]), cat([e.terminated.astype(np.float32) for e in episodes]))


class DatasetPolicy(nn.Module):
    """A Markovian policy on standardised observations; subclasses define `mean_action(normalised obs)`."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        for name, size in (("obs_mean", obs_dim), ("obs_std", obs_dim), ("act_low", act_dim), ("act_high", act_dim)):
            self.register_buffer(name, torch.zeros(size))
        self.register_buffer("obs_indices", torch.zeros(obs_dim, dtype=torch.long))

    def fit_data(self, obs: torch.Tensor, act: torch.Tensor, obs_indices: np.ndarray) -> None:
        """Observation mean/std, action bounds and the selected observation dims of the training data."""
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0, unbiased=False).clamp(min=1e-6))  # one transition: 0, clamped (not NaN)
        self.act_low.copy_(act.min(0).values)
        self.act_high.copy_(act.max(0).values)
        self.obs_indices.copy_(torch.as_tensor(obs_indices))

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def scale(self, unit: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> the policy's action bounds (act_low, act_high)."""
        return self.act_low + (unit + 1.0) * 0.5 * (self.act_high - self.act_low)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # The rollout.Agent interface: a stateless policy acting with its mean, clipped to the data's action bounds.
    def reset(self, env: int = 0, seed: int = 0) -> None:
        """Nothing to reset."""

    @torch.no_grad()
    def act_batch(self, envs: list[int], observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(np.asarray(observations)[:, self.obs_indices.numpy()], dtype=torch.float32)
        return torch.maximum(torch.minimum(self.mean_action(self.norm(obs)), self.act_high), self.act_low).numpy()

    def observe_batch(self, envs: list[int], rewards: np.ndarray) -> None:
        """A Markovian policy needs no rewards."""


def data_references(data: OfflineData) -> dict:
    """What a baseline's evaluation is read against, recorded at training so evaluating needs no second load:
    the dataset's mean return over complete episodes and its reference scores."""
    return {"dataset_mean_return": return_stats(data)["complete_return_mean"],
            "ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score}


def prefix_reference(dataset_id: str, data_cfg: DataConfig, steps: int) -> float | None:
    """The dataset's mean return over its episodes' first `steps` steps: the reference for evaluations cut at
    `steps` (--max-steps), as `trajformer plan` reports it."""
    return prefix_return_mean(load_episodes(dataset_id, data_cfg), steps)
