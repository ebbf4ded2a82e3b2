"""MOPO, MOReL and COMBO: policy optimisation inside the ensemble's model env, one Dyna loop (DESIGN.md §9).

Read top to bottom. The training split's transitions fill the real buffer. Every `rollout_every` SAC steps,
`rollout_batch` model rollouts of h steps branch from real states under the current policy (actions sampled)
and go into a model buffer holding the last `retain_rounds` rounds. Each SAC step trains on a batch mixing a
`real_ratio` share of real transitions with model ones. The three methods differ only in their pessimism:

- mopo:  the model env's reward is r - lambda * u(s, a) (u: the largest predicted std norm over members).
- morel: the model env halts (terminal, reward -kappa) where member disagreement d(s, a) exceeds the data's
         `morel_quantile` of d. The paper optimises its pessimistic MDP with NPG over full-length rollouts; we
         use SAC on branched h-step rollouts of the same MDP (the halt penalty reaches Q by bootstrapping).
- combo: no reward penalty; the critic loss adds beta * (log-sum-exp of Q over uniform and policy actions at
         model-rollout states - Q at the data's (s, a)), CQL(H)'s form on COMBO's state distribution.

Files: <method>.pt (plain tensors), <method>.json (settings, ensemble, termination rule, MOReL threshold,
training record, dataset references) and <method>.metrics.jsonl (SAC losses, Q and rollout counts once a round).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from trajformer.baselines.model_env import ModelEnv, elite_members, morel_threshold, termination_rule
from trajformer.baselines.policy import Batch, data_references
from trajformer.baselines.sac import SAC, SACAgent
from trajformer.config import Config
from trajformer.data import OfflineData, load_episodes, same_split, split_episodes, split_record
from trajformer.ensemble import Ensemble, load_ensemble, train_ensemble
from trajformer.files import load_json, load_state, load_torch, save_json, save_text, save_torch, writable_dir

METHODS = ("mopo", "morel", "combo")


def check_ensemble(ensemble: Ensemble, data: OfflineData, cfg: Config | None = None) -> None:
    """The ensemble must model this data: its dims, and the same dataset (its id, and its digest or, for a copy
    collected on another machine, its episode count); with `cfg` (an ensemble this job left in its --out), also
    the config's split and [ensemble] settings. A one-line error otherwise."""
    meta, fix = ensemble.meta, "train the ensemble on this dataset: trajformer train-ensemble CONFIG --dataset ID"
    theirs = (meta["obs_dim"], meta["act_dim"], meta["obs_indices"])
    if theirs != (data.obs_dim, data.act_dim, data.obs_indices.tolist()):
        raise ValueError(f"ensemble {ensemble.path} models {theirs[0]} observation and {theirs[1]} action dims, "
                         f"the data {data.dataset_id} has {data.obs_dim} and {data.act_dim} (or other selected "
                         f"dims); {fix}")
    episodes = len(meta["split"]["train_episodes"]) + len(meta["split"]["validation_episodes"])
    if meta["dataset_id"] != data.dataset_id or (meta.get("dataset_sha256") != data.sha256
                                                 and episodes != len(data.episodes)):
        raise ValueError(f"ensemble {ensemble.path} was trained on {episodes} episodes of {meta['dataset_id']}, not "
                         f"on these {len(data.episodes)} of {data.dataset_id}; {fix}")
    if cfg is None:
        return
    changed = [f"ensemble.{k}" for k, v in dataclasses.asdict(cfg.ensemble).items() if meta["ensemble"].get(k) != v]
    if not same_split(meta["split"], split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)):
        changed.append("the split (data.split_seed, data.validation_fraction)")
    if changed:
        raise ValueError(f"{ensemble.path} holds an ensemble trained with other settings ({', '.join(changed)}); "
                         "delete it to train one with this config, or choose another --out")


def provide_ensemble(cfg: Config, data: OfflineData, out: Path, given: str = "",
                     progress: bool = True) -> tuple[Path, float | None]:
    """The ensemble MOPO, MOReL and COMBO work in: `given` (checked against the data), else the one an earlier
    run left in `out`, else one trained with [ensemble] into `out` (a half-trained one is replaced). Returns its
    directory and its training seconds (None for a given one: not this run's to count)."""
    if given:
        check_ensemble(load_ensemble(given), data)
        return Path(given), None
    if (out / "ensemble.json").is_file():
        check_ensemble(load_ensemble(out), data, cfg)
    else:
        shutil.rmtree(out, ignore_errors=True)
        print(f"training the ensemble into {out}", flush=True)
        train_ensemble(cfg, out, progress=progress)
    return out, float(load_ensemble(out).meta["training"]["seconds"])


def action_bounds(data: OfflineData) -> tuple[np.ndarray, np.ndarray]:
    """The env's Box action bounds where the env can be made, else the data's own range."""
    acts = np.concatenate([e.act for e in data.episodes])
    try:
        space = gym.make(data.env_spec["id"]).action_space
        return space.low.astype(np.float32), space.high.astype(np.float32)
    except Exception:  # an env this machine cannot make: the data's range is the best bound we have
        return acts.min(0).astype(np.float32), acts.max(0).astype(np.float32)


class Buffer:
    """A fixed-size ring of transitions (tensors) sampled uniformly."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.head = capacity, 0, 0
        self.data = Batch(torch.zeros(capacity, obs_dim), torch.zeros(capacity, act_dim), torch.zeros(capacity),
                          torch.zeros(capacity, obs_dim), torch.zeros(capacity))

    @classmethod
    def holding(cls, batch: Batch) -> Buffer:
        """A full buffer over `batch`'s own tensors (no copy): the real transitions."""
        buffer = cls.__new__(cls)
        buffer.capacity = buffer.size = len(batch.obs)
        buffer.head, buffer.data = 0, batch
        return buffer

    def add(self, batch: Batch) -> None:
        n = len(batch.obs)
        keep = slice(max(0, n - self.capacity), n)  # more than fits: the newest
        idx = (self.head + torch.arange(keep.stop - keep.start)) % self.capacity
        for f in dataclasses.fields(Batch):
            getattr(self.data, f.name)[idx] = getattr(batch, f.name)[keep]
        self.head, self.size = int((self.head + len(idx)) % self.capacity), min(self.capacity, self.size + len(idx))

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        i = torch.randint(self.size, (n,), generator=generator)
        return Batch(*(getattr(self.data, f.name)[i] for f in dataclasses.fields(Batch)))


def combo_regulariser(model_obs: torch.Tensor, real: Batch, beta: float, n_actions: int):
    """COMBO's critic term as a function of the agent: beta * (logsumexp over 2n importance-weighted actions,
    uniform and policy, of Q at model-rollout states - Q at the data's (s, a)), summed over both critics."""

    def term(agent: SACAgent) -> torch.Tensor:
        s = model_obs.repeat_interleave(n_actions, 0)
        d_act = agent.act_low.numel()
        uniform = torch.rand(len(s), d_act) * 2 - 1
        with torch.no_grad():
            policy, logp = agent.sample(s)
        total = torch.zeros(())
        data_q = agent.q(real.obs, agent.unscale(real.act))
        for q_u, q_p, q_d in zip(agent.q(s, uniform), agent.q(s, policy), data_q, strict=True):
            cat = torch.cat([(q_u + d_act * math.log(2.0)).view(-1, n_actions),  # uniform density 2^-dA
                             (q_p - logp).view(-1, n_actions)], dim=1)
            total = total + torch.logsumexp(cat, dim=1).mean() - q_d.mean()
        return beta * total

    return term


def train_model_based(method: str, cfg: Config, out_dir: str | os.PathLike, ensemble_dir: str | os.PathLike,
                      dataset_id: str | None = None, progress: bool = True) -> Path:
    """Train MOPO, MOReL or COMBO on cfg's dataset and split with the ensemble in ensemble_dir; writes
    <method>.pt and <method>.json into out_dir and returns it."""
    if method not in METHODS:
        raise ValueError(f"unknown model-based method {method!r}: choose one of {', '.join(METHODS)}")
    mb = cfg.model_based
    writable_dir(Path(out_dir))  # now, not after the training
    ensemble = load_ensemble(ensemble_dir)
    data = load_episodes(dataset_id or cfg.data.dataset, cfg.data)
    check_ensemble(ensemble, data)
    train_idx, _ = split_episodes(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)
    eps = [data.episodes[i] for i in train_idx]
    real = Batch.of_episodes(eps)
    horizon = getattr(mb, f"{method}_rollout_length")
    real_ratio = getattr(mb, f"{method}_real_ratio")
    terminated_fn, rule = termination_rule(data.env_spec, data.obs_indices, data.raw_obs_dim)
    threshold = (morel_threshold(ensemble, real.obs.numpy(), real.act.numpy(), mb.morel_quantile)
                 if method == "morel" else None)
    low, high = action_bounds(data)
    env = ModelEnv(ensemble, real.obs.numpy(), low, high, mb.rollout_batch, horizon, mb.elites,
                   penalty={"mopo": "mopo", "morel": "morel", "combo": "none"}[method], mopo_lambda=mb.mopo_lambda,
                   mopo_uncertainty=mb.mopo_uncertainty,
                   morel_threshold=threshold if threshold is not None else np.inf, morel_kappa=mb.morel_kappa,
                   terminated_fn=terminated_fn, seed=mb.seed)

    torch.manual_seed(mb.seed)
    agent = SACAgent(data.obs_dim, data.act_dim, mb.hidden)
    agent.fit_data(real.obs, real.act, data.obs_indices)
    agent.act_low.copy_(torch.as_tensor(low))
    agent.act_high.copy_(torch.as_tensor(high))
    sac = SAC(agent, mb.learning_rate, mb.discount, mb.polyak)
    model = Buffer(mb.rollout_batch * horizon * mb.retain_rounds, data.obs_dim, data.act_dim)
    generator = torch.Generator().manual_seed(mb.seed)
    n_real = round(real_ratio * mb.batch_size)
    real_buffer = Buffer.holding(real)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{method}.metrics.jsonl"  # its own name: --out may hold a run's or another method's log
    save_text(log_path, "")
    start, log, stats = time.perf_counter(), {}, {"model_transitions": 0, "terminated": 0, "halted": 0}
    for step in tqdm(range(mb.steps), desc=method, unit="step", disable=None if progress else True):
        if step % mb.rollout_every == 0:  # a rollout round under the current policy
            if step:  # the last update's losses and the rollouts so far, once a round
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **log, **stats}) + "\n")
            obs, _ = env.reset(seed=mb.seed + step)
            for _ in range(horizon):
                with torch.no_grad():
                    act = agent.scale(agent.sample(torch.as_tensor(obs))[0]).numpy()
                nxt, rew, term, trunc, info = env.step(act)
                landed = np.where(info["_final_obs"][:, None], info["final_obs"], nxt) if "final_obs" in info else nxt
                model.add(Batch(torch.as_tensor(obs), torch.as_tensor(act), torch.as_tensor(rew, dtype=torch.float32),
                                torch.as_tensor(landed), torch.as_tensor(term, dtype=torch.float32)))
                stats["model_transitions"] += len(obs)
                stats["terminated"] += int(term.sum())
                stats["halted"] += int(info.get("halted", np.zeros(1)).sum())
                obs = nxt
        parts = [real_buffer.sample(n_real, generator)] if n_real else []
        if n_real < mb.batch_size:
            parts.append(model.sample(mb.batch_size - n_real, generator))
        batch = Batch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Batch)))
        regulariser = None
        if method == "combo":
            model_obs = parts[-1].obs if n_real < mb.batch_size else batch.obs
            real_part = parts[0] if n_real else real_buffer.sample(mb.batch_size // 2, generator)
            regulariser = combo_regulariser(model_obs, real_part, mb.combo_beta, mb.combo_actions)
        log = sac.update(batch, regulariser)
    save_torch(out_dir / f"{method}.pt", agent.state_dict())
    save_json(out_dir / f"{method}.json", {
        "method": method, "config": dataclasses.asdict(mb), "rollout_length": horizon, "real_ratio": real_ratio,
        "dataset_id": data.dataset_id, "dataset_sha256": data.sha256, "env": data.env_spec, "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "ensemble": {"path": str(ensemble.path), "elites": elite_members(ensemble, mb.elites).tolist(),
                     "members": ensemble.meta["ensemble"]["members"]},
        "termination_rule": rule, "morel_threshold": threshold,
        "split": split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed),
        "training": {"steps": mb.steps, "seconds": round(time.perf_counter() - start, 1),
                     "threads": torch.get_num_threads(), "real_transitions": len(real.obs), **stats, **log},
        **data_references(data),
    })
    return out_dir


def load_model_based(path: str | os.PathLike, method: str | None = None) -> tuple[SACAgent, dict]:
    """The SAC agent and <method>.json of a directory written by train_model_based (no pickle)."""
    path = Path(path)
    found = [m for m in ([method] if method else METHODS) if (path / f"{m}.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{path} has no {method or 'mopo/morel/combo'}.json; train one with "
                                f"`trajformer {method or 'mopo'} CONFIG.toml --out {path}`")
    meta = load_json(path / f"{found[0]}.json", f"train it again with `trajformer {found[0]} CONFIG.toml --out {path}`")
    agent = SACAgent(meta["obs_dim"], meta["act_dim"], meta["config"]["hidden"])
    load_state(agent, load_torch(path / f"{found[0]}.pt"), f"{path / found[0]}.pt does not fit its .json",
               "train it again (a retrain was stopped between its two files?)")
    return agent.eval(), meta
