"""Token windows for training (DESIGN.md §3).

A transition is T = dS + dA + 2 tokens; dimension d with bin b has id d * N + b and the stop token is
N * T. Windows of `sequence_length` transitions start at every transition of every episode. Steps past
a termination are stop tokens the model must predict; steps past a time-limit end are padding masked out
of the loss. Targets Y are local class ids per slot (bin 0..N-1, stop = N), aligned with the mask.
"""

from __future__ import annotations

import numpy as np
import torch

from trajformer.discretizer import Discretizer

VALUE_PLACEHOLDER = 1e6
"""The value fed for past transitions (official): clipped to the value column's last bin, never attended."""


class TokenWindows(torch.utils.data.Dataset):
    """All training windows of a set of episodes, built by index arithmetic over one padded token array."""

    def __init__(self, episode_tokens: list[np.ndarray], terminal: list[bool], n_bins: int, sequence_length: int):
        if not episode_tokens:
            raise ValueError("no episodes to make windows from; check the dataset and validation_fraction")
        self.n_bins = n_bins
        self.sequence_length = L = sequence_length
        self.transition_dim = T = episode_tokens[0].shape[1]
        self.stop_id = n_bins * T
        offsets = np.arange(T) * n_bins
        blocks, masks, starts = [], [], []
        cursor = 0
        for bins, is_terminal in zip(episode_tokens, terminal, strict=True):
            n = len(bins)
            pad = np.full((L - 1, T), self.stop_id, dtype=np.int64)
            blocks.append(np.concatenate([bins + offsets, pad]))
            # Stop tokens after a termination are learned; padding after a time limit is masked out.
            masks.append(np.concatenate([np.ones(n, bool), np.full(L - 1, is_terminal)]))
            starts.append(cursor + np.arange(n))
            cursor += n + L - 1
        self.tokens = torch.from_numpy(np.concatenate(blocks))  # (rows, T)
        self.valid = torch.from_numpy(np.concatenate(masks))  # (rows,)
        self.starts = torch.from_numpy(np.concatenate(starts))  # one window per real transition
        # Slot (dimension) of every target position, and the local-id conversion for targets.
        self.target_slot = (torch.arange(1, L * T) % T).long()

    def to(self, device: torch.device | str) -> TokenWindows:
        """Move the token arrays to `device` (once, before training), so batches are assembled there."""
        for name in ("tokens", "valid", "starts", "target_slot"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def block_size(self) -> int:
        return self.sequence_length * self.transition_dim - 1

    def batch(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X (B, L*T-1) global token ids, Y (B, L*T-1) local class ids, mask (B, L*T-1) float."""
        rows = self.starts[window_ids.to(self.starts.device)][:, None] + torch.arange(self.sequence_length,
                                                                                      device=self.starts.device)
        tokens = self.tokens[rows].reshape(len(window_ids), -1)
        mask = self.valid[rows].repeat_interleave(self.transition_dim, dim=1)
        x, y = tokens[:, :-1], tokens[:, 1:]
        local = torch.where(y == self.stop_id, self.n_bins, y - self.target_slot * self.n_bins)
        return x, local, mask[:, 1:].float()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, m = self.batch(torch.tensor([i]))
        return x[0], y[0], m[0]


def loss_weights(obs_dim: int, act_dim: int, sequence_length: int, action_weight: float,
                 reward_weight: float, value_weight: float) -> torch.Tensor:
    """Per-target-position loss weight (L*T-1,): obs 1, action/reward/value as configured."""
    per_slot = torch.tensor([1.0] * obs_dim + [action_weight] * act_dim + [reward_weight, value_weight])
    transition_dim = obs_dim + act_dim + 2
    return per_slot[torch.arange(1, sequence_length * transition_dim) % transition_dim]


def encode_values(discretizer: Discretizer, values: np.ndarray, first_dim: int) -> np.ndarray:
    """Token ids (..., n) of values (..., n) of the consecutive dimensions first_dim .. first_dim + n - 1."""
    values = np.asarray(values, dtype=np.float64)
    n, T = values.shape[-1], discretizer.dim
    full = np.zeros((*values.shape[:-1], T))
    full[..., first_dim : first_dim + n] = values
    bins = discretizer.encode(full)[..., first_dim : first_dim + n]
    return bins + discretizer.n_bins * np.arange(first_dim, first_dim + n)


def context_transition(discretizer: Discretizer, obs: np.ndarray, act: np.ndarray, reward: float) -> np.ndarray:
    """Token ids of one past transition as the planner's context holds it: [s, a, r, value placeholder]."""
    return encode_values(discretizer, np.concatenate([obs, act, [reward, VALUE_PLACEHOLDER]]), 0)
