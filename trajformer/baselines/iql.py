"""Implicit Q-learning (Kostrikov, Nair & Levine 2021) on a run's training episodes, CleanRL-style in one file.

Read top to bottom: transitions of the training split (terminal flags from true terminations only, never time
limits), rewards scaled as the paper does for locomotion (1000 / (max - min episode return); 1 when the returns
are all equal), then one loop of three updates per batch: V by expectile regression (tau) towards the target
twin-Q's minimum, Q by TD towards r + gamma * V(s'), and the policy by advantage-weighted regression, weights
exp(beta * (Q - V)) clipped at 100.
The policy is a Gaussian with a state-conditioned mean, tanh-bounded to the data's action box, and a learned
state-independent log std clipped to [-5, 2] (the official NormalTanhPolicy without the squashed distribution);
it acts with its mean. Files: iql.pt (plain tensors) and iql.json. The twin Qs (their minimum,
unscaled) also score plans for the planner's `critic` objective (`rollout.load_critic`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trajformer.baselines.policy import LOG_STD_MAX, LOG_STD_MIN, Batch, DatasetPolicy, data_references
from trajformer.config import Config
from trajformer.data import OfflineData, load_episodes, same_split, split_episodes, split_record
from trajformer.files import load_json, load_state, load_torch, save_json, save_torch, writable_dir


@dataclass
class IQLConfig:
    """The paper's locomotion settings (tau 0.7, beta 3, 2 x 256 MLPs, lr 3e-4, batch 256, Polyak 0.005); steps
    a CPU budget, 30% of the paper's 1M (on our hopper-medium 100k steps scored 806, 300k 2814: README)."""

    tau: float = 0.7
    beta: float = 3.0
    discount: float = 0.99
    hidden: int = 256
    steps: int = 300_000
    batch_size: int = 256
    learning_rate: float = 3e-4
    polyak: float = 0.005
    seed: int = 0


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


POLICY = "tanh-mean"  # iql.json's name for the policy head below (directories from before it have none)


class IQLAgent(DatasetPolicy):
    """Twin Q(s, a), V(s) and the policy mean; observations standardised with the data's statistics."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__(obs_dim, act_dim)
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)
        self.v = mlp(obs_dim, 1, hidden)
        self.pi = mlp(obs_dim, act_dim, hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def q(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.norm(obs), act], -1)
        return self.q1(x)[:, 0], self.q2(x)[:, 0]

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) of selected observations (batch, obs_dim), in the scaled reward units of training."""
        return self.v(self.norm(obs))[:, 0]

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.scale(torch.tanh(self.pi(obs)))

    def std(self) -> torch.Tensor:
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Asymmetric squared loss |tau - 1(diff < 0)| diff^2: tau > 0.5 pushes V towards the upper expectile."""
    weight = torch.where(diff > 0, tau, 1.0 - tau)
    return (weight * diff**2).mean()


def train_iql(cfg: Config, out_dir: str | os.PathLike, iql: IQLConfig | None = None, dataset_id: str | None = None,
              progress: bool = True) -> Path:
    """Train IQL on the training episodes of cfg's dataset and split; writes iql.pt and iql.json into out_dir."""
    iql = iql or IQLConfig()
    if not 0.5 <= iql.tau < 1.0 or iql.beta <= 0 or min(iql.steps, iql.batch_size, iql.hidden) < 1:
        raise ValueError(f"IQL needs 0.5 <= tau < 1, beta > 0 and positive sizes; got {iql}")
    writable_dir(Path(out_dir))  # now, not after the training
    data = load_episodes(dataset_id or cfg.data.dataset, cfg.data)
    train_idx, _ = split_episodes(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)
    eps = [data.episodes[i] for i in train_idx]
    returns = np.array([e.rew.sum() for e in eps])
    spread = float(returns.max() - returns.min())
    scale = 1000.0 / spread if spread > 1e-6 else 1.0  # the paper's locomotion scaling; none for equal returns
    real = Batch.of_episodes(eps)
    obs, act, rew, nxt, done = real.obs, real.act, real.rew * scale, real.nxt, real.done

    torch.manual_seed(iql.seed)
    agent = IQLAgent(data.obs_dim, data.act_dim, iql.hidden)
    agent.fit_data(obs, act, data.obs_indices)
    target = copy.deepcopy(agent).requires_grad_(False)
    q_opt = torch.optim.Adam([*agent.q1.parameters(), *agent.q2.parameters()], lr=iql.learning_rate)
    v_opt = torch.optim.Adam(agent.v.parameters(), lr=iql.learning_rate)
    pi_opt = torch.optim.Adam([*agent.pi.parameters(), agent.log_std], lr=iql.learning_rate)
    pi_sched = torch.optim.lr_scheduler.CosineAnnealingLR(pi_opt, iql.steps)
    generator = torch.Generator().manual_seed(iql.seed)
    start, log = time.perf_counter(), {}
    for step in tqdm(range(iql.steps), desc="iql", unit="step", disable=None if progress else True):
        i = torch.randint(len(obs), (min(iql.batch_size, len(obs)),), generator=generator)
        s, a, r, s2, d = obs[i], act[i], rew[i], nxt[i], done[i]
        with torch.no_grad():
            q_target = torch.minimum(*target.q(s, a))
        v_loss = expectile_loss(q_target - agent.value(s), iql.tau)
        v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        v_opt.step()
        with torch.no_grad():  # the updated V, as the official implementation backs up Q
            v_next = agent.value(s2)
        q1, q2 = agent.q(s, a)
        backup = r + iql.discount * (1.0 - d) * v_next
        q_loss = ((q1 - backup) ** 2).mean() + ((q2 - backup) ** 2).mean()
        q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        q_opt.step()
        with torch.no_grad():
            weights = torch.exp(iql.beta * (q_target - agent.value(s))).clamp(max=100.0)
        dist = torch.distributions.Normal(agent.mean_action(agent.norm(s)), agent.std())
        pi_loss = -(weights * dist.log_prob(a).sum(-1)).mean()
        pi_opt.zero_grad(set_to_none=True)
        pi_loss.backward()
        pi_opt.step()
        pi_sched.step()
        with torch.no_grad():
            for p, tp in zip([*agent.q1.parameters(), *agent.q2.parameters()],
                             [*target.q1.parameters(), *target.q2.parameters()], strict=True):
                tp.lerp_(p, iql.polyak)
        if step == iql.steps - 1:
            log = {"v_loss": v_loss.item(), "q_loss": q_loss.item(), "pi_loss": pi_loss.item()}
    out_dir = Path(out_dir)
    save_torch(out_dir / "iql.pt", agent.state_dict())
    save_json(out_dir / "iql.json", {
        "config": dataclasses.asdict(iql), "policy": POLICY, "dataset_id": data.dataset_id, "env": data.env_spec,
        "dataset_sha256": data.sha256, "obs_indices": data.obs_indices.tolist(),
        "obs_dim": data.obs_dim, "act_dim": data.act_dim, "reward_scale": scale,
        "split": split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed),
        "training": {"steps": iql.steps, "seconds": round(time.perf_counter() - start, 1), "transitions": len(obs),
                     "threads": torch.get_num_threads(), **log},
        **data_references(data),
    })
    return out_dir


def check_iql(path: Path, meta: dict, data: OfflineData, cfg: Config, iql: IQLConfig) -> None:
    """An IQL directory (its iql.json `meta`) reused for `cfg`: trained with `iql`'s settings on this data, split and
    observation dims (the twin of model_based.check_ensemble); a one-line error otherwise."""
    kept, wanted = meta["config"], dataclasses.asdict(iql)
    changed = [k for k in wanted if kept.get(k) != wanted[k]]
    if meta["dataset_id"] != data.dataset_id or meta.get("dataset_sha256", data.sha256) != data.sha256:
        changed.append(f"its data ({meta['dataset_id']})")
    if not same_split(meta["split"], split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)):
        changed.append("its split")
    if meta.get("obs_indices", data.obs_indices.tolist()) != data.obs_indices.tolist():
        changed.append("its observation dims")
    if changed:
        raise ValueError(f"{path} holds an IQL trained with other settings ({', '.join(changed)}); delete it to "
                         "train one with this config, or compare into a new --out directory")


def load_iql(path: str | os.PathLike) -> tuple[IQLAgent, dict]:
    """The agent and iql.json of a directory written by train_iql (no pickle)."""
    path = Path(path)
    if not (path / "iql.json").is_file():
        raise FileNotFoundError(f"{path} has no iql.json; train one with `trajformer iql CONFIG.toml --out {path}`")
    meta = load_json(path / "iql.json", f"delete {path} to train it again")  # by `trajformer iql` or a comparison
    if meta.get("policy") != POLICY:  # its weights would load, and act differently under today's head
        raise ValueError(f"{path} was trained before IQL's policy mean was tanh-bounded (2026-12-06); train it again "
                         f"with `trajformer iql CONFIG.toml --out {path}`")
    agent = IQLAgent(meta["obs_dim"], meta["act_dim"], meta["config"]["hidden"])
    load_state(agent, load_torch(path / "iql.pt"), f"{path / 'iql.pt'} does not fit {path / 'iql.json'}",
               "train it again (a retrain was stopped between its two files?)")
    return agent.eval(), meta
