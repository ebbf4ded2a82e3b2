"""The ensemble as an environment (DESIGN.md §9): a Gymnasium vector env whose every step samples a random elite
member's Gaussian over (s', r), batched over many rollouts that start from dataset states.

Two kinds of pessimism, both on the trained ensemble (trajformer/ensemble.py):

- `mopo` (Yu et al. 2020): reward r - lambda * u(s, a), u = the largest norm over members of the predicted
  standard deviation of (s', r), in raw units (or, as an option, the norm of the ensemble mixture's std).
- `morel` (Kidambi et al. 2020): the unknown-state detector d(s, a) = the largest distance between two members'
  predicted mean s'; where d exceeds a threshold the rollout halts (terminated) with reward -kappa. The threshold
  is a quantile of d over the dataset's own transitions (`morel_threshold`).

Termination uses the task's own healthy rule on the predicted state where we know it (Hopper, Walker2d: their
healthy height/angle/state ranges; Ant, Humanoid: their healthy height; each read from the env itself, so env
kwargs count) and nothing elsewhere
(`termination_rule` says which). Rollouts truncate after `horizon` steps and restart from new dataset states
in the same step (autoreset mode SAME_STEP: the finished rollout's last state is in info["final_obs"]).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from trajformer.data import env_kwargs
from trajformer.ensemble import Ensemble

PENALTIES = ("none", "mopo", "morel")


def elite_members(ensemble: Ensemble, elites: int) -> np.ndarray:
    """The `elites` members with the lowest validation NLL (MOPO/MBPO's elites); all of them if elites >= members."""
    nll = np.asarray(ensemble.meta["validation"]["val_nll_members"])
    return np.sort(np.argsort(nll, kind="stable")[: max(1, min(elites, len(nll)))])


def termination_rule(env_spec: dict, obs_indices: np.ndarray, raw_obs_dim: int
                     ) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """The env's own termination on a predicted observation batch, and a line saying which rule it is.

    Known for Hopper and Walker2d with their full default observation (z and torso angle first), and for Ant and
    Humanoid while the data keeps z (observation dim 0); with other dims, other envs, or
    terminate_when_unhealthy=False no rollout terminates (said so)."""
    env_id = env_spec.get("id") or ""
    family = env_id.split("-")[0].split("/")[-1]
    if family not in ("Hopper", "Walker2d", "Ant", "Humanoid"):
        return None, f"none ({env_id or 'unknown env'} has no termination rule we know; rollouts only truncate)"
    upright = family in ("Ant", "Humanoid")  # their rule reads z alone
    kept = obs_indices.tolist()
    if upright and 0 not in kept:
        return None, f"none (the {family} healthy rule needs z, observation dim 0, which the data drops)"
    if not upright and kept != list(range(raw_obs_dim)):
        return None, f"none (the {family} healthy rule needs the full observation; the data selects dims)"
    env = gym.make(env_id, **env_kwargs(env_spec))
    u = env.unwrapped
    env.close()
    if not u._terminate_when_unhealthy or u._exclude_current_positions_from_observation is False:
        return None, f"none ({env_id} made with terminate_when_unhealthy=False or with x in the observation)"
    z_lo, z_hi = u._healthy_z_range
    z = kept.index(0)
    if family == "Ant":  # Ant-v5: a finite state (here: the kept dims) and z in [lo, hi], bounds included
        def ant_terminated(obs: np.ndarray) -> np.ndarray:
            return ~(np.isfinite(obs).all(axis=1) & (obs[:, z] >= z_lo) & (obs[:, z] <= z_hi))

        return ant_terminated, f"{env_id} healthy rule: z in [{z_lo}, {z_hi}], finite kept dims"
    if family == "Humanoid":  # Humanoid-v5: z in (lo, hi)
        def humanoid_terminated(obs: np.ndarray) -> np.ndarray:
            return ~((obs[:, z] > z_lo) & (obs[:, z] < z_hi))

        return humanoid_terminated, f"{env_id} healthy rule: z in ({z_lo}, {z_hi})"
    a_lo, a_hi = u._healthy_angle_range
    s_lo, s_hi = getattr(u, "_healthy_state_range", (-np.inf, np.inf))

    def terminated(obs: np.ndarray) -> np.ndarray:
        healthy = (obs[:, 0] > z_lo) & (obs[:, 0] < z_hi) & (obs[:, 1] > a_lo) & (obs[:, 1] < a_hi)
        if family == "Hopper":  # Hopper also bounds every other state entry
            healthy &= np.all((obs[:, 1:] > s_lo) & (obs[:, 1:] < s_hi), axis=1)
        return ~healthy

    rule = f"{env_id} healthy rule: z in ({z_lo}, {z_hi}), angle in ({a_lo}, {a_hi})"
    return terminated, rule + (f", other state in ({s_lo}, {s_hi})" if family == "Hopper" else "")


@torch.no_grad()
def predict_all(ensemble: Ensemble, obs: np.ndarray, act: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's mean and std of [s', r] (E, n, dS+1) in raw units."""
    o = torch.as_tensor(obs, dtype=torch.float32)
    a = torch.as_tensor(act, dtype=torch.float32)
    return ensemble.model.predict(o, a)


UNCERTAINTIES = ("max_std", "ensemble_std")


def mopo_uncertainty(mean: torch.Tensor, std: torch.Tensor, kind: str = "max_std") -> torch.Tensor:
    """MOPO's u(s, a) from every member's mean and std of [s', r] (E, n, d) -> (n,).

    max_std (the paper's): the largest norm over members of the predicted std. ensemble_std: the norm of the
    ensemble mixture's std, sqrt(mean over members of var + variance of the members' means), which adds the
    members' disagreement: learned variances need not grow away from the data (a small ensemble's shrink there),
    the disagreement does (scripts/uncertainty_ood.py measures both)."""
    if kind == "max_std":
        return std.norm(dim=-1).amax(dim=0)
    if kind == "ensemble_std":
        return (std.pow(2).mean(0) + mean.var(0, unbiased=False)).sqrt().norm(dim=-1)
    raise ValueError(f"unknown MOPO uncertainty {kind!r}: choose one of {', '.join(UNCERTAINTIES)}")


def morel_disagreement(mean: torch.Tensor, obs_dim: int) -> torch.Tensor:
    """MOReL's d(s, a): the largest distance between two members' predicted mean s': (E, n, d) -> (n,)."""
    nxt = mean[..., :obs_dim].transpose(0, 1)  # (n, E, dS)
    return torch.cdist(nxt, nxt).flatten(1).amax(dim=1)


def morel_threshold(ensemble: Ensemble, obs: np.ndarray, act: np.ndarray, quantile: float,
                    chunk: int = 16384) -> float:
    """The halting threshold: the `quantile` of d(s, a) over the dataset's own transitions."""
    d = [morel_disagreement(predict_all(ensemble, obs[i : i + chunk], act[i : i + chunk])[0], ensemble.model.obs_dim)
         for i in range(0, len(obs), chunk)]
    return float(torch.quantile(torch.cat(d).double(), quantile))


class ModelEnv(gym.vector.VectorEnv):
    """`num_envs` model rollouts stepped together; each starts from a dataset state drawn at random."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, ensemble: Ensemble, start_obs: np.ndarray, action_low: np.ndarray, action_high: np.ndarray,
                 num_envs: int, horizon: int, elites: int = 5, penalty: str = "none", mopo_lambda: float = 0.0,
                 mopo_uncertainty: str = "max_std",
                 morel_threshold: float = np.inf, morel_kappa: float = 0.0,
                 terminated_fn: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0):
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}: choose one of {', '.join(PENALTIES)}")
        if mopo_lambda < 0 or morel_kappa < 0:
            raise ValueError(f"the MOPO lambda ({mopo_lambda}) and the MOReL kappa ({morel_kappa}) must be >= 0")
        if num_envs < 1 or horizon < 1:
            raise ValueError(f"num_envs ({num_envs}) and horizon ({horizon}) must be >= 1")
        dS = ensemble.model.obs_dim
        if start_obs.ndim != 2 or start_obs.shape[1] != dS or len(action_low) != ensemble.model.act_dim:
            raise ValueError(f"the ensemble models {dS} observation and {ensemble.model.act_dim} action dims; the "
                             f"start states have {start_obs.shape[1:]} and the actions {len(action_low)}; train "
                             "the ensemble on this dataset and data.obs_dims")
        self.ensemble, self.start_obs, self.horizon = ensemble, np.asarray(start_obs, np.float32), horizon
        self.elites = elite_members(ensemble, elites)
        if mopo_uncertainty not in UNCERTAINTIES:
            raise ValueError(f"unknown MOPO uncertainty {mopo_uncertainty!r}: choose one of {', '.join(UNCERTAINTIES)}")
        self.penalty, self.mopo_lambda, self.uncertainty = penalty, mopo_lambda, mopo_uncertainty
        self.morel_threshold, self.morel_kappa = morel_threshold, morel_kappa
        self.terminated_fn = terminated_fn
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (dS,), np.float32)
        self.single_action_space = gym.spaces.Box(np.asarray(action_low, np.float32),
                                                  np.asarray(action_high, np.float32))
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(seed)
        self.obs = np.zeros((num_envs, dS), np.float32)
        self.t = np.zeros(num_envs, np.int64)

    def _restart(self, which: np.ndarray) -> None:
        self.obs[which] = self.start_obs[self.rng.integers(len(self.start_obs), size=int(which.sum()))]
        self.t[which] = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._restart(np.ones(self.num_envs, bool))
        return self.obs.copy(), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        act = np.clip(np.asarray(actions, np.float32), self.single_action_space.low, self.single_action_space.high)
        mean, std = predict_all(self.ensemble, self.obs, act)
        n, dS = self.num_envs, self.ensemble.model.obs_dim
        member = torch.as_tensor(self.elites[self.rng.integers(len(self.elites), size=n)])
        noise = torch.as_tensor(self.rng.standard_normal((n, dS + 1)), dtype=torch.float32)
        rows = torch.arange(n)
        sample = (mean[member, rows] + std[member, rows] * noise).numpy()
        nxt, reward = sample[:, :dS], sample[:, dS].astype(np.float64)
        terminated = self.terminated_fn(nxt) if self.terminated_fn else np.zeros(n, bool)
        info: dict = {}
        if self.penalty == "mopo":
            info["uncertainty"] = mopo_uncertainty(mean, std, self.uncertainty).numpy()
            info["raw_reward"] = reward.copy()
            reward = reward - self.mopo_lambda * info["uncertainty"]
        elif self.penalty == "morel":
            info["disagreement"] = morel_disagreement(mean, dS).numpy()
            info["halted"] = info["disagreement"] > self.morel_threshold
            reward = np.where(info["halted"], -self.morel_kappa, reward)
            terminated = terminated | info["halted"]
        self.t += 1
        truncated = (self.t >= self.horizon) & ~terminated
        done = terminated | truncated
        self.obs = nxt.astype(np.float32)
        if done.any():
            info["final_obs"] = np.where(done[:, None], self.obs, np.nan).astype(np.float32)
            info["_final_obs"] = done
            self._restart(done)
        return self.obs.copy(), reward, terminated, truncated, info
