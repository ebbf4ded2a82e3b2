"""Behaviour policies: the shipped SAC actors (pretrained/behavior/NAME.pt + NAME.json card) without SB3, and
their evaluation. Dataset collection (trajformer.collect) rolls them out; scripts/train_behavior.py trains them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from trajformer.files import load_json, load_state, load_torch, shipped

BEHAVIOR_DIR = shipped("pretrained") / "behavior"
"""Shipped behaviour policies: NAME.pt (actor state_dict) + NAME.json (card)."""

Policy = Callable[[np.ndarray], np.ndarray]
"""A batch of observations (n, dS) -> a batch of actions (n, dA) within the action bounds."""


class SACActor(nn.Module):
    """The SB3 SAC `MlpPolicy` actor (same state_dict keys), without SB3: a tanh-squashed Gaussian."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)

    @torch.no_grad()
    def forward(self, obs: torch.Tensor, deterministic: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Squashed action in [-1, 1]: tanh(mu), or tanh of a sample of N(mu, exp(clamp(log_std)))."""
        latent = self.latent_pi(obs)
        mu = self.mu(latent)
        if deterministic:
            return torch.tanh(mu)
        std = self.log_std(latent).clamp(-20, 2).exp()
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return torch.tanh(mu + std * eps)


@dataclass
class BehaviorPolicy:
    """A shipped actor with its card; `.card` holds env id/kwargs, dims, bounds and the eval return."""

    name: str
    actor: SACActor
    card: dict

    def policy(self, deterministic: bool, generator: torch.Generator | None = None) -> Policy:
        """Batched numpy policy, rescaled from [-1, 1] to the card's bounds as SB3 does (float32)."""
        low = np.asarray(self.card["action_low"], dtype=np.float32)
        high = np.asarray(self.card["action_high"], dtype=np.float32)

        def act(obs: np.ndarray) -> np.ndarray:
            squashed = self.actor(torch.as_tensor(obs, dtype=torch.float32), deterministic, generator).numpy()
            return low + 0.5 * (squashed + 1.0) * (high - low)

        return act


def load_behavior_policy(path: str | Path) -> BehaviorPolicy:
    """Load NAME.pt (a plain state_dict, never unpickled) into SACActor, with the sibling NAME.json card."""
    path = Path(path)
    if not path.is_file() and (BEHAVIOR_DIR / f"{path.name}.pt").is_file():
        path = BEHAVIOR_DIR / f"{path.name}.pt"  # a bare shipped name such as hopper-sac-0175k
    card_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} not found: pass 'random', a shipped name "
                                f"(see {BEHAVIOR_DIR}) or the path of a .pt written by scripts/train_behavior.py")
    if not card_path.is_file():
        raise FileNotFoundError(f"policy {path} has no card {card_path}: keep the .json written with the .pt")
    card = load_json(card_path, "restore the .json card written with the .pt (scripts/train_behavior.py)")
    actor = SACActor(card["obs_dim"], card["act_dim"], tuple(card["net_arch"]))
    load_state(actor, load_torch(path), f"policy {path} does not fit its card {card_path}",
               "keep the .pt and the .json that scripts/train_behavior.py wrote together")
    return BehaviorPolicy(path.stem, actor.eval(), card)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: for a batch of a few observations, intra-op threads cost more than they
    save (16 ms instead of 0.4 ms per 8-row forward on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def episode_returns(env: gym.Env, policy: Policy, episodes: int, seed: int = 10_000) -> list[float]:
    """Undiscounted returns of `episodes` episodes, the i-th from env.reset(seed=seed + i) (card protocol)."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs[None])[0])
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def evaluate_policy(path: str | Path, episodes: int = 10, env_kwargs: dict | None = None,
             deterministic: bool = True, seed: int = 0) -> list[float]:
    """Returns of a behaviour policy on its card's env (or env_kwargs), reset seeds 10_000 + i.

    Deterministic is the cards' protocol; stochastic (actions sampled with torch seed `seed`) is how the
    presets collect.
    """
    bp = load_behavior_policy(path)
    env = gym.make(bp.card["env_id"], **(bp.card["env_kwargs"] if env_kwargs is None else env_kwargs))
    with one_thread():
        returns = episode_returns(env, bp.policy(deterministic, torch.Generator().manual_seed(seed)), episodes)
    env.close()
    return returns
