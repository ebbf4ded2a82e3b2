"""Soft actor-critic (Haarnoja et al. 2018), compact: the policy optimiser of MOPO, MOReL and COMBO.

Ours rather than stable-baselines3's: COMBO adds a term to the critic loss itself and every method feeds SAC
batches mixed from two buffers (real and model transitions) that the model env fills thousands of rollouts at a
time; SB3's SAC exposes neither its critic loss nor a two-buffer sampler, and its one-env-step-per-update
collection loop is the opposite of Dyna's bulk rollouts.

Twin Q networks with Polyak-averaged targets, a tanh-squashed Gaussian policy on standardised observations,
and the entropy temperature tuned towards -|A|. Actions live in [-1, 1] and are scaled to the env's bounds.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trajformer.baselines.iql import mlp
from trajformer.baselines.policy import LOG_STD_MAX, LOG_STD_MIN, Batch, DatasetPolicy


class SACAgent(DatasetPolicy):
    """Policy and twin critics on standardised observations; acts with tanh(mean) scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__(obs_dim, act_dim)
        self.pi = mlp(obs_dim, 2 * act_dim, hidden)
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def unscale(self, act: torch.Tensor) -> torch.Tensor:
        return 2.0 * (act - self.act_low) / (self.act_high - self.act_low).clamp(min=1e-6) - 1.0

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.scale(torch.tanh(self.pi(obs).chunk(2, -1)[0]))

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] and its log-density, for raw observations (n, dS)."""
        mean, log_std = self.pi(self.norm(obs)).chunk(2, -1)
        std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        u = mean + std * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh's Jacobian
        return torch.tanh(u), log_prob

    def q(self, obs: torch.Tensor, unit_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both critics for raw observations and actions in [-1, 1]."""
        x = torch.cat([self.norm(obs), unit_act], -1)
        return self.q1(x)[..., 0], self.q2(x)[..., 0]


class SAC:
    """The agent, its target critics, optimisers and one `update` per gradient step."""

    def __init__(self, agent: SACAgent, learning_rate: float = 3e-4, discount: float = 0.99, polyak: float = 0.005):
        self.agent, self.discount, self.polyak = agent, discount, polyak
        self.target = copy.deepcopy(agent).requires_grad_(False)
        self.target_entropy = -float(agent.act_low.numel())
        self.q_opt = torch.optim.Adam([*agent.q1.parameters(), *agent.q2.parameters()], lr=learning_rate)
        self.pi_opt = torch.optim.Adam(agent.pi.parameters(), lr=learning_rate)
        self.alpha_opt = torch.optim.Adam([agent.log_alpha], lr=learning_rate)

    def update(self, batch: Batch, critic_regulariser: Callable[[SACAgent], torch.Tensor] | None = None) -> dict:
        """One SAC step on `batch`; `critic_regulariser(agent)` is added to the critic loss (COMBO's term)."""
        agent, alpha = self.agent, self.agent.log_alpha.exp().detach()
        with torch.no_grad():
            nxt_act, nxt_logp = agent.sample(batch.nxt)
            target_q = torch.minimum(*self.target.q(batch.nxt, nxt_act)) - alpha * nxt_logp
            backup = batch.rew + self.discount * (1.0 - batch.done) * target_q
        q1, q2 = agent.q(batch.obs, agent.unscale(batch.act))
        q_loss = F.mse_loss(q1, backup) + F.mse_loss(q2, backup)
        extra = critic_regulariser(agent) if critic_regulariser is not None else torch.zeros(())
        self.q_opt.zero_grad(set_to_none=True)
        (q_loss + extra).backward()
        self.q_opt.step()

        act, logp = agent.sample(batch.obs)
        q_pi = torch.minimum(*agent.q(batch.obs, act))
        pi_loss = (alpha * logp - q_pi).mean()
        self.pi_opt.zero_grad(set_to_none=True)
        pi_loss.backward()
        self.pi_opt.step()
        alpha_loss = -(agent.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for p, tp in zip([*agent.q1.parameters(), *agent.q2.parameters()],
                             [*self.target.q1.parameters(), *self.target.q2.parameters()], strict=True):
                tp.lerp_(p, self.polyak)
        return {"q_loss": q_loss.item(), "pi_loss": pi_loss.item(), "alpha": float(alpha),
                "regulariser": extra.item(), "q_mean": q1.mean().item()}
