"""Long-horizon prediction from held-out start states: the transformer against the ensemble (DESIGN.md §7).

Two protocols, as `trajformer predict` reports them:

- teacher-forced actions (the headline, like for like): both models are fed the episode's true actions.
  The transformer decodes each next observation greedily (argmax token per dimension, decoded as the bin
  midpoint) and its reward token by argmax; past values are the planner's 1e6 placeholder (never attended).
  The ensemble propagates the mean of its members' means. Error per step = RMS over dimensions of
  (predicted - true) / (dataset std per dimension), summarised by mean and quantiles over starts.
- open loop (the paper's Fig. 3): the transformer samples actions and states (full distributions,
  temperature 1) for M rows per start; the ensemble is rolled out on those same sampled action sequences,
  sampling a random member per step and its Gaussian (PETS TS1). Per timestep, each model's M samples make
  a histogram over the transformer's bins; the true state's log-density under it (each bin a uniform
  density, one pseudo-count spread over the bins) is the score, and the true state's own bin with all the
  mass (the "discrete oracle") bounds it from above.

The transformer runs under the planner's sliding window (at most the run's sequence_length transitions;
whole transitions dropped from the front, positions restarting) with the planner's exact KV-cached decoder,
all starts and samples batched as rows. A stop token decoded in an observation ends that row: its later
steps are NaN and the step is reported.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajformer.data import Episode, joined_transitions, load_episodes, return_stats, same_split
from trajformer.decoding import DECODES, CachedDecoder, crop_start, decode_bins, pick
from trajformer.ensemble import Ensemble, load_ensemble, obs_std, transitions, validation_metrics
from trajformer.files import atomic_write, save_json, writable_dir
from trajformer.metrics import dim_errors, error_summary, histogram_loglik, normalized_error
from trajformer.model import GPT, rotary
from trajformer.run import Run, load_run, read_metrics
from trajformer.tokens import context_transition, encode_values

SUMMARY_STEPS = (1, 10, 25, 50, 100)


@dataclass
class HeldOut:
    """Held-out episodes (observations after the run's selection) and the dataset's per-dimension std."""

    dataset_id: str
    episodes: list[Episode]
    obs_std: np.ndarray
    env: dict
    source: str  # how the episodes were chosen
    episode_ids: list[int] | None = None  # their indices in the dataset's episode list (None: a slice without them)
    dataset_episodes: int | None = None  # how many episodes that list has


SLICE_KEYS = ("obs", "act", "rew", "lengths", "terminal", "obs_std", "obs_indices", "dataset_id", "env")


def check_held_out_from(held: HeldOut, dataset_id: str, split: dict, who: str, fix: str) -> None:
    """The held-out episodes must be outside the training episodes of a model trained on `dataset_id` with `split`:
    data sharing no part with it, or the same dataset (its episode count) with every held-out episode among the
    model's validation episodes."""
    if not set(held.dataset_id.split("+")) & set(dataset_id.split("+")):
        return
    total = len(split["train_episodes"]) + len(split["validation_episodes"])
    if held.episode_ids is None:
        why = f"records no episode indices (a slice written before they were), so nothing shows it is outside {who}'s"
        why += " training data"
    elif held.dataset_id != dataset_id or held.dataset_episodes != total:
        why = (f"comes from {held.dataset_episodes} episodes of {held.dataset_id}, which shares data with the {total} "
               f"episodes of {dataset_id} that {who} was trained on")
    elif not set(held.episode_ids) <= set(split["validation_episodes"]):
        inside = sorted(set(held.episode_ids) - set(split["validation_episodes"]))
        why = f"holds episodes {inside[:5]} that {who} was trained on"
    else:
        return
    raise ValueError(f"the held-out data ({held.source}) {why}; {fix}")


def load_heldout(source: str, run: Run) -> HeldOut:
    """The run's validation episodes of a Minari dataset, every episode of data the run never saw, or a .npz
    slice written by `save_heldout`; refused when any of them is among the run's training episodes."""
    run_env = (run.meta.get("env") or {}).get("id")
    if source.endswith(".npz"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"held-out slice {path} not found; pass a Minari dataset id or an .npz "
                                    f"written by trajformer.predict.save_heldout")
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated, not an archive
            raise ValueError(f"{path} is not a readable .npz ({err}); write the slice again with "
                             "trajformer.predict.save_heldout") from None
        if not isinstance(z, np.lib.npyio.NpzFile):  # one array (.npy bytes)
            raise ValueError(f"{path} holds one array, not a held-out slice; pass one written by "
                             "trajformer.predict.save_heldout, or a Minari dataset id")
        missing = [k for k in SLICE_KEYS if k not in z.files]
        with z:
            if missing:
                raise ValueError(f"{path} is not a held-out slice (it lacks {', '.join(missing)}); pass one written "
                                 "by trajformer.predict.save_heldout, or a Minari dataset id")
            indices = z["obs_indices"].tolist()
            if not set(run.obs_indices.tolist()) <= set(indices):
                raise ValueError(f"{path} holds observation dims {indices[:5]}... but the run reads "
                                 f"{run.obs_indices.tolist()[:5]}...; use a slice of the run's dataset")
            env = json.loads(str(z["env"]))
            if run_env and env.get("id") != run_env:
                raise ValueError(f"{path} holds {env.get('id')} episodes but the run was trained in {run_env}; use "
                                 "a slice of the run's dataset")
            if z["act"].shape[-1] != run.act_dim or not len(z["lengths"]):
                raise ValueError(f"{path} holds {len(z['lengths'])} episodes of {z['act'].shape[-1]}-dim actions but "
                                 f"the run acts in {run.act_dim} dims; use a slice of the run's dataset")
            for name in ("obs", "act", "rew", "obs_std"):
                if not np.isfinite(z[name]).all():
                    raise ValueError(f"{path} has NaN or inf in '{name}'; write the slice again from clean data")
            cols = [indices.index(i) for i in run.obs_indices.tolist()]  # a partially observed run: its dims
            episodes = [_episode(z["obs"][i, : n + 1][:, cols], z["act"][i, :n], z["rew"][i, :n],
                                 bool(z["terminal"][i])) for i, n in enumerate(z["lengths"])]
            ids = z["episode_ids"].tolist() if "episode_ids" in z.files else None
            total = int(z["dataset_episodes"]) if "dataset_episodes" in z.files else None
            held = HeldOut(str(z["dataset_id"]), episodes, z["obs_std"].astype(np.float64)[cols], env,
                           f"{path} ({len(episodes)} episodes)", ids, total)
        check_held_out_from(held, run.meta.get("dataset_id") or "", run.meta["split"], f"run {run.path}",
                            "write the slice from this run's validation episodes (trajformer.predict.save_heldout)")
    else:
        trained_on = run.meta.get("dataset_id") or ""
        shared = set(source.split("+")) & set(trained_on.split("+")) if source != trained_on else set()
        if shared:
            raise ValueError(f"dataset '{source}' shares {', '.join(sorted(shared))} with the run's training data "
                             f"'{trained_on}'; pass '{trained_on}' itself (its validation episodes are used) or data "
                             "the run never saw")
        data = load_episodes(source, run.config.data)
        if data.obs_dim != run.obs_dim or data.act_dim != run.act_dim:
            raise ValueError(f"dataset '{source}' gives {data.obs_dim}-dim observations and {data.act_dim}-dim "
                             f"actions but the run expects {run.obs_dim} and {run.act_dim}; use the run's dataset")
        data_env = data.env_spec.get("id")
        if run_env and data_env and data_env != run_env:
            raise ValueError(f"dataset '{source}' holds {data_env} episodes but the run was trained in {run_env}; "
                             "predict on data of the run's env")
        if source == trained_on:
            _check_same_episodes(data, run)
            ids = run.meta["split"]["validation_episodes"]
            if not ids:
                raise ValueError(f"run {run.path} has no validation episodes; pass another dataset to predict on")
            how = f"the run's {len(ids)} validation episodes of {source}"
        else:
            ids = list(range(len(data.episodes)))
            how = f"all {len(ids)} episodes of {source} (not the run's dataset)"
        held = HeldOut(source, [data.episodes[i] for i in ids], obs_std(data), data.env_spec, how, list(ids),
                       len(data.episodes))
    return held


def _check_same_episodes(data, run: Run) -> None:
    """The run's validation indices name the same episodes in `data`: its digest, or (a copy collected on another
    machine, whose floats round differently) its episode count, steps and mean return to 1e-4."""
    if data.sha256 == run.meta["provenance"]["dataset_sha256"]:
        return
    stats, mine = run.meta.get("dataset_stats") or {}, return_stats(data)
    if not stats or (stats["episodes"], stats["steps"]) != (mine["episodes"], mine["steps"]) or \
            abs(stats["return_mean"] - mine["return_mean"]) > 1e-4 * max(1.0, abs(stats["return_mean"])):
        raise ValueError(f"dataset '{data.dataset_id}' is not the data the run was trained on ({mine['episodes']} "
                         f"episodes, {mine['steps']} steps, mean return {mine['return_mean']:.2f}; the run's: "
                         f"{stats.get('episodes')}, {stats.get('steps')}, {stats.get('return_mean', math.nan):.2f}), "
                         "so its validation episodes would be other episodes; point MINARI_DATASETS_PATH at the "
                         "run's dataset or pass a held-out .npz slice")


def _episode(obs: np.ndarray, act: np.ndarray, rew: np.ndarray, terminal: bool) -> Episode:
    """An Episode from stored arrays: terminated (or else truncated) at its last step."""
    end = np.zeros(len(act), dtype=bool)
    end[-1] = True
    return Episode(obs.astype(np.float64), act.astype(np.float64), rew.astype(np.float64), end & terminal,
                   end & (not terminal))


def save_heldout(run_dir: str | os.PathLike, out: str | os.PathLike, episodes: int = 4,
                 dataset_id: str | None = None) -> Path:
    """Write the first `episodes` validation episodes of the run's dataset (float32) as a small .npz slice."""
    run = load_run(run_dir)
    if (dataset_id or "").endswith(".npz"):
        raise ValueError("save_heldout writes a slice of a Minari dataset; pass its id (or none: the run's own)")
    held = load_heldout(dataset_id or run.meta["dataset_id"], run)
    eps, ids = held.episodes[:episodes], held.episode_ids[:episodes]
    T = max(e.length for e in eps)
    dS, dA = run.obs_dim, run.act_dim
    obs, act, rew = np.zeros((len(eps), T + 1, dS)), np.zeros((len(eps), T, dA)), np.zeros((len(eps), T))
    for i, e in enumerate(eps):
        obs[i, : e.length + 1], act[i, : e.length], rew[i, : e.length] = e.obs, e.act, e.rew

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, obs=obs.astype(np.float32), act=act.astype(np.float32), rew=rew.astype(np.float32),
                                lengths=np.array([e.length for e in eps]),
                                terminal=np.array([e.is_terminal for e in eps]),
                                obs_std=held.obs_std, obs_indices=run.obs_indices, dataset_id=np.array(held.dataset_id),
                                env=np.array(json.dumps(held.env)), episode_ids=np.array(ids),
                                dataset_episodes=np.array(held.dataset_episodes))

    atomic_write(Path(out), write)
    return Path(out)


def choose_starts(held: HeldOut, horizon: int, n_starts: int, seed: int = 0) -> list[tuple[int, int]]:
    """(episode, t) pairs with horizon true steps after t: episodes in turn, t uniform among the valid ones.

    A terminated episode's last observation is not a state to predict: in training, the transition after a
    termination is all stop tokens, so a horizon reaching it would score a correct stop as a miss. Its true
    states end one step earlier."""
    if horizon < 1 or n_starts < 1:
        raise ValueError(f"--horizon ({horizon}) and --starts ({n_starts}) must be >= 1")
    steps = [e.length - e.is_terminal for e in held.episodes]  # true next states each episode can be scored on
    longest = max(steps)
    if horizon > longest:
        raise ValueError(f"--horizon {horizon} is longer than every held-out episode (longest {longest} steps in "
                         f"{held.source}, a terminated episode's last state not counted); use --horizon <= "
                         f"{longest}")
    valid = [i for i, n in enumerate(steps) if n >= horizon]
    room = {i: steps[i] - horizon + 1 for i in valid}  # start times t each episode allows
    if n_starts > sum(room.values()):
        raise ValueError(f"--starts {n_starts}: the held-out episodes ({held.source}) allow only "
                         f"{sum(room.values())} distinct starts with {horizon} steps after them; use fewer")
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, int]] = []
    used = dict.fromkeys(valid, 0)
    for k in range(n_starts):  # episodes in turn (the next with a start left), t drawn again until it is new
        i = next(e for e in valid[k % len(valid):] + valid[: k % len(valid)] if used[e] < room[e])
        while (pair := (i, int(rng.integers(0, room[i])))) in chosen:
            pass
        chosen.append(pair)
        used[i] += 1
    return chosen


def context_tokens(run: Run, episode: Episode, t: int) -> torch.Tensor:
    """The true past transitions before t (at most sequence_length - 1, value = placeholder), then s_t."""
    L = run.config.data.sequence_length
    past = []
    for u in range(max(0, t - (L - 1)), t):
        past.append(context_transition(run.discretizer, episode.obs[u], episode.act[u], episode.rew[u]))
    past.append(encode_values(run.discretizer, episode.obs[t], 0))
    return torch.as_tensor(np.concatenate(past))


def true_segments(run: Run, held: HeldOut, chosen: list[tuple[int, int]], horizon: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[torch.Tensor]]:
    """At each chosen (episode, t): the start state s_t (K, dS), the true next states s_t+1.. (K, H, dS), the true
    actions a_t.. (K, H, dA), and the run's context tokens before s_t."""
    eps = [held.episodes[i] for i, _ in chosen]
    at = list(zip(eps, chosen, strict=True))
    return (np.stack([e.obs[t] for e, (_, t) in at]), np.stack([e.obs[t + 1 : t + horizon + 1] for e, (_, t) in at]),
            np.stack([e.act[t : t + horizon] for e, (_, t) in at]), [context_tokens(run, e, t) for e, (_, t) in at])


def stops_possible(run: Run) -> bool:
    """Whether the run's training data had terminations: only then may a rollout decode a stop."""
    return int(run.meta.get("dataset_stats", {}).get("terminated_episodes", 1)) > 0


@torch.inference_mode()
def rollout_transformer(run: Run, prefixes: list[torch.Tensor], horizon: int, samples: int = 1,
                        actions: np.ndarray | None = None, greedy: bool = True, seed: int = 0,
                        decode: str = "argmax") -> dict:
    """Decode `horizon` transitions after each prefix for `samples` rows per prefix.

    `actions` (K, H, dA): the true actions to feed (teacher forcing); None samples them from the model.
    Observations and rewards are decoded greedily (`decode`: argmax, expectation or median of each
    dimension's bin distribution; see decoding.decode_bins) if `greedy`, else sampled. The value position is
    fed the model's own argmax value token (never the 1e6 placeholder, which that position would see itself).
    Stop: impossible when the run's data has no terminations; otherwise a greedy decode stops only where
    p(stop) beats the summed probability of the bins, and a sample stops with probability p(stop).
    Returns numpy arrays obs (K, M, H, dS) (s_1..s_H, NaN from a stop on), act (K, M, H, dA), rew (K, M, H)
    (NaN from a stop on), and stop_step (K, M): the first step whose state decoded a stop token (0 = none).
    """
    model: GPT = run.model
    disc, N, T = run.discretizer, run.discretizer.n_bins, model.config.transition_dim
    dS, dA, K, M = run.obs_dim, run.act_dim, len(prefixes), samples
    if actions is not None and actions.shape != (K, horizon, dA):
        raise ValueError(f"actions have shape {actions.shape}, expected {(K, horizon, dA)}")
    if decode not in DECODES:
        raise ValueError(f"decode {decode!r} is not valid; choose one of {', '.join(DECODES)}")
    dec = CachedDecoder(model, model.config.block_size)
    dec.start(prefixes, K * M)
    dec.reorder(torch.arange(K).repeat_interleave(M))
    generators = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    true_act = None if actions is None else torch.as_tensor(encode_values(disc, actions, dS)).repeat_interleave(M, 0)
    midpoints = torch.as_tensor(disc.midpoints, dtype=torch.float64)
    inner = [torch.as_tensor(disc.edges[d, 1 : disc.n_real[d]]) for d in range(T)]  # what each bin holds
    values = torch.full((K * M, horizon, T), float("nan"), dtype=torch.float64)
    stop_step = torch.zeros(K * M, dtype=torch.long)
    can_stop = stops_possible(run)

    def state_or_reward(logits: torch.Tensor, dim: int) -> torch.Tensor:
        """Local ids of dimension `dim` (N = stop), writing their values; greedy or sampled."""
        if greedy:
            ids, vals = decode_bins(logits[:, :N].double(), midpoints[dim], inner[dim], decode)
            p_stop = logits.double().softmax(-1)[:, N]
            stopped = (p_stop > 0.5) & can_stop if dim < dS else torch.zeros_like(ids, dtype=torch.bool)
        else:
            masked = logits.clone()
            if not can_stop or dim >= dS:
                masked[:, N] = -math.inf
            ids = pick(masked, False, generators)
            stopped = ids == N
            ids = ids.clamp(max=N - 1)
            vals = midpoints[dim][ids]
        values[:, h, dim] = torch.where(stopped, float("nan"), vals)
        return torch.where(stopped, N, ids)

    for h in range(horizon):
        for j in range(dA):
            if true_act is not None:
                local = true_act[:, h, j] - (dS + j) * N
            else:
                logits = dec.logits().clone()
                logits[:, N] = -math.inf  # an action is never stop
                local = pick(logits, False, generators)
            values[:, h, dS + j] = midpoints[dS + j][local]
            dec.append(local + (dS + j) * N)
        local = state_or_reward(dec.logits(), dS + dA)
        dec.append(local + (dS + dA) * N)
        value = dec.logits()[:, :N].argmax(-1)  # the model's own value token at the live value position
        values[:, h, T - 1] = midpoints[T - 1][value]
        dec.append(value + (T - 1) * N)
        for j in range(dS):
            local = state_or_reward(dec.logits(), j)
            stopped = local == N
            stop_step = torch.where(stopped & (stop_step == 0), h + 1, stop_step)
            dec.append(torch.where(stopped, model.config.stop_id, local + j * N))
    values_np, stop_np = values.numpy(), stop_step.numpy()
    dead = (stop_np[:, None] > 0) & (np.arange(1, horizon + 1)[None, :] >= stop_np[:, None])
    values_np[dead, :dS] = np.nan  # states and rewards end at a stop; the actions drawn after it are kept
    values_np[dead, dS + dA :] = np.nan
    shape = (K, M, horizon)
    return {"obs": values_np[..., :dS].reshape(*shape, dS), "act": values_np[..., dS : dS + dA].reshape(*shape, dA),
            "rew": values_np[..., dS + dA].reshape(shape), "stop_step": stop_np.reshape(K, M)}


def rollout_ensemble(ens: Ensemble, start: np.ndarray, actions: np.ndarray, sample: bool = False,
                     seed: int = 0) -> dict:
    """Roll the ensemble from start states (K, dS) through actions (K, M, H, dA).

    Deterministic (`sample=False`): the mean of the members' means each step. Sampled: each row draws a
    random member per step and a sample of its Gaussian (PETS TS1). Returns obs (K, M, H, dS), rew (K, M, H).
    """
    K, M, H, _ = actions.shape
    model = ens.model
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(start, dtype=torch.float32).repeat_interleave(M, dim=0)
    act = torch.as_tensor(actions.reshape(K * M, H, -1), dtype=torch.float32)
    obs, rew = [], []
    rows = torch.arange(K * M)
    for h in range(H):
        mean, std = model.predict(s, act[:, h])
        if sample:
            member = torch.randint(model.members, (K * M,), generator=g)
            out = mean[member, rows] + std[member, rows] * torch.randn(mean.shape[1:], generator=g)
        else:
            out = mean.mean(0)
        s = out[:, : model.obs_dim]
        obs.append(s)
        rew.append(out[:, -1])
    return {"obs": torch.stack(obs, 1).reshape(K, M, H, -1).double().numpy(),
            "rew": torch.stack(rew, 1).reshape(K, M, H).double().numpy()}


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights (n_layer, B, n_head, t, t) of a window (B, t), computed from the model's own modules:
    softmax of the scaled q·k over the keys its mask leaves visible (causal, no value columns, and a window
    model's band, its queries and keys rotated)."""
    B, t = idx.shape
    if t > len(model.mask):
        raise ValueError(f"a window of {t} tokens is longer than the model's {len(model.mask)}; pass fewer tokens")
    positions = torch.arange(t)
    x = model.wte(idx) if model.wpe is None else model.wte(idx) + model.wpe(positions)
    rope = model._rope(positions, x.dtype)
    mask = model.mask[:t, :t]
    maps = []
    for block in model.blocks:
        attn = block.attn
        q, k, _ = attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=2)
        q, k = (z.view(B, t, attn.n_head, -1).transpose(1, 2) for z in (q, k))
        if rope is not None:
            q, k = rotary(q, rope), rotary(k, rope)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        maps.append(F.softmax(scores.masked_fill(~mask, -math.inf), dim=-1))
        x = block(x, model.bias[:t, :t], rope=rope)
    return torch.stack(maps)


def transformer_compute(run: Run) -> dict:
    """Training steps, windows and wall-clock of a run from its metrics.jsonl: the logged `seconds` (summed over
    resumes), or for a run logged before they were, an estimate from the throughput rows."""
    rows = read_metrics(run.path / "metrics.jsonl")
    logged = [r for r in rows if "tokens_per_s" in r]
    batch, block = run.config.train.batch_size, run.model.config.block_size
    last = logged[-1]["step"] if logged else 0
    if logged and "seconds" in logged[-1]:
        seconds, source = float(logged[-1]["seconds"]), "logged"
    else:
        steps = np.diff([0] + [r["step"] for r in logged])
        seconds = float(sum(n * batch * block / r["tokens_per_s"] for n, r in zip(steps, logged, strict=True)))
        source = "estimated from throughput"
    val = [r for r in rows if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    return {"steps": last, "windows_seen": last * batch, "train_seconds": round(seconds, 1),
            "train_seconds_source": source,
            "best_val_step": best["step"] if best else None, "best_val_loss": best["val_loss"] if best else None,
            "best_val_obs_ce": best.get("val_obs") if best else None,
            "parameters": sum(p.numel() for p in run.model.parameters())}


def one_step_transitions(held: HeldOut, n: int = 128, seed: int = 0) -> list[tuple[int, int]]:
    """`n` held-out transitions (episode, t), with replacement: an episode uniformly, then t uniformly among its
    steps with a true next state (a terminated episode's last one leads to the stop tokens training put there)."""
    rng = np.random.default_rng(seed)
    room = [e.length - e.is_terminal for e in held.episodes]
    if not any(room):
        raise ValueError(f"the held-out episodes ({held.source}) have no transition to a next state; use longer ones")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        i = int(rng.integers(len(held.episodes)))
        if room[i]:
            pairs.append((i, int(rng.integers(room[i]))))
    return pairs


@torch.no_grad()
def transformer_one_step(run: Run, held: HeldOut, pairs: list[tuple[int, int]]) -> dict:
    """The transformer's one-step NLL of true next states (nats per obs dim, states in dataset-std units,
    each bin a uniform density) on the held-out transitions `pairs`, given their true context."""
    model, disc, dS = run.model, run.discretizer, run.obs_dim
    N, T = disc.n_bins, model.config.transition_dim
    total, count = 0.0, 0
    for i, t in pairs:
        e = held.episodes[i]
        context = context_tokens(run, e, t)
        # a_t, r_t and the true value-to-go V_t as training saw them (never the placeholder at the live position)
        tail = encode_values(disc, joined_transitions(e, run.config.data)[t, dS:], dS)
        idx = torch.cat([context, torch.as_tensor(tail), torch.as_tensor(encode_values(disc, e.obs[t + 1], 0))])
        idx = idx[crop_start(len(idx) - 1, model.config.block_size, T) :]  # the planner's sliding window
        logits = model(idx[None, :-1])[0, -dS:]
        target = idx[-dS:] - torch.arange(dS) * N
        logp = logits.log_softmax(-1).gather(1, target[:, None])[:, 0].double().numpy()
        widths = disc.bin_widths()[np.arange(dS), target.numpy()] / held.obs_std
        total += float(np.sum(-logp + np.log(widths)))
        count += dS
    return {"obs_nll_std_units": total / count, "transitions": len(pairs)}


def ensemble_one_step(ens: Ensemble, held: HeldOut, pairs: list[tuple[int, int]]) -> dict:
    """The ensemble's one-step NLL of the same true next states (its mixture of members' Gaussians, nats per obs
    dim in the held-out data's std units)."""
    x, y, _ = transitions(held.episodes)
    first = np.cumsum([0] + [len(e.act) for e in held.episodes[:-1]])  # each episode's first row in x and y
    rows = [first[i] + t for i, t in pairs]
    metrics = validation_metrics(ens.model, x[rows], y[rows], held.obs_std)
    return {"obs_nll_std_units": metrics["val_obs_nll_std_units"], "transitions": len(pairs)}


def _check_baseline(ens: Ensemble, run: Run, held: HeldOut) -> None:
    """The ensemble predicts the run's dims in the run's env, and the held-out starts are outside its training data."""
    if (ens.meta["obs_dim"], ens.meta["act_dim"]) != (run.obs_dim, run.act_dim) or \
            not np.array_equal(ens.obs_indices, run.obs_indices):
        raise ValueError(f"baseline {ens.path} was trained on {ens.meta['obs_dim']} observation dims "
                         f"{ens.meta['obs_indices'][:4]}... and {ens.meta['act_dim']} action dims, the run on "
                         f"{run.obs_dim} dims {run.obs_indices.tolist()[:4]}... and {run.act_dim}; train the ensemble "
                         f"on the run's dataset and data.obs_dims")
    ens_env, run_env = (ens.meta.get("env") or {}).get("id"), (run.meta.get("env") or {}).get("id")
    if ens_env != run_env:
        raise ValueError(f"baseline {ens.path} was trained on {ens_env} data, the run on {run_env}; train the "
                         "ensemble on the run's dataset")
    # The same dataset (its id and episode count: a copy from another machine differs in its digest only) split so
    # that every held-out episode is among its validation episodes, or data it never saw.
    check_held_out_from(held, ens.meta["dataset_id"], ens.meta["split"], f"baseline {ens.path}",
                        "train the ensemble with the run's config (its dataset, data.max_episodes, "
                        "data.validation_fraction and split seed), or predict on data it never saw")


def _json(x):
    """Nested numpy -> JSON-safe lists with NaN as None."""
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _json(x.item())
    return x


def load_ablations(ablations: dict[str, str | os.PathLike], run: Run) -> dict[str, Run]:
    """The paper's ablations beside the run: other runs on the same dataset and split (a Markovian model with
    data.sequence_length = 2, so each next state is predicted from the latest transition alone; a partially
    observed one whose data.obs_dims are a subset of the run's)."""
    loaded = {}
    for name, path in ablations.items():
        if name in ("transformer", "ensemble", "oracle"):
            raise ValueError(f"--ablation {name}={path}: '{name}' names the main results; call the ablation "
                             "something else (e.g. markovian)")
        other = load_run(path)
        if other.meta["dataset_id"] != run.meta["dataset_id"] or not same_split(other.meta["split"], run.meta["split"]):
            raise ValueError(f"--ablation {name}={path} was trained on {other.meta['dataset_id']} with another split; "
                             f"ablations must share the run's dataset, data.validation_fraction and split seed")
        if not set(other.obs_indices.tolist()) <= set(run.obs_indices.tolist()):
            raise ValueError(f"--ablation {name}={path} observes dims the run does not; give it a subset of "
                             f"data.obs_dims {run.obs_indices.tolist()}")
        loaded[name] = other
    return loaded


def ablation_errors(run: Run, ablation: Run, dataset: str, chosen: list[tuple[int, int]], horizon: int,
                    main_preds: dict[str, np.ndarray], seed: int) -> dict:
    """Teacher-forced error of an ablation run on the same starts and true actions, on its own observation dims,
    beside the main run's error on those same dims: "error" and "transformer_same_dims" with the argmax decode,
    and under "decodes" both for every decode the main run reports (`main_preds`: its predictions by decode)."""
    held = load_heldout(dataset, ablation)
    _, true, acts, prefixes = true_segments(ablation, held, chosen, horizon)
    dims = [run.obs_indices.tolist().index(i) for i in ablation.obs_indices.tolist()]  # its dims in the run's order
    decodes = {}
    for how, main_pred in main_preds.items():
        tf = rollout_transformer(ablation, prefixes, horizon, 1, actions=acts, greedy=True, seed=seed, decode=how)
        decodes[how] = {"error": error_summary(normalized_error(tf["obs"][:, 0], true, held.obs_std)),
                        "transformer_same_dims": error_summary(normalized_error(main_pred[..., dims], true,
                                                                                held.obs_std))}
    return {"obs_dims": ablation.obs_indices.tolist(), "context_transitions": ablation.config.data.sequence_length,
            **decodes["argmax"], "decodes": decodes}


def predict(run_dir: str | os.PathLike, dataset: str | None = None, horizon: int = 100, starts: int = 8,
            baseline: str | os.PathLike | None = None, samples: int = 32, out: str | os.PathLike | None = None,
            seed: int = 0, render: bool = True, progress: bool = True,
            ablations: dict[str, str | os.PathLike] | None = None) -> dict:
    """`trajformer predict`: both protocols, predict.json and the figures in `out`; returns the record.
    `ablations` ({name: run dir}) adds other runs' teacher-forced errors on the same starts (the paper's
    Markovian and partially observed transformers)."""
    from trajformer import plots

    if samples < 1 or horizon < 1 or starts < 1:
        raise ValueError(f"--samples ({samples}), --horizon ({horizon}) and --starts ({starts}) must be >= 1")
    run = load_run(run_dir)
    others = load_ablations(ablations or {}, run)
    tt_compute = transformer_compute(run)  # read with the weights, not after the (long) rollouts
    ens = load_ensemble(baseline) if baseline is not None else None
    held = load_heldout(dataset or run.meta["dataset_id"], run)
    if ens is not None:
        _check_baseline(ens, run, held)
    chosen = choose_starts(held, horizon, starts, seed)
    out = Path(out) if out is not None else run.path / "predict"
    writable_dir(out)  # now, not after the rollouts
    say = print if progress else (lambda *a, **k: None)

    start, true, true_act, prefixes = true_segments(run, held, chosen, horizon)
    seconds = {}

    say(f"teacher-forced: {len(chosen)} starts x {horizon} steps")
    t0 = time.perf_counter()
    tf = rollout_transformer(run, prefixes, horizon, 1, actions=true_act, greedy=True, seed=seed)
    seconds["transformer_teacher_forced"] = time.perf_counter() - t0
    record_tf = {"transformer": error_summary(normalized_error(tf["obs"][:, 0], true, held.obs_std)),
                 "transformer_stops": [{"start": k, "step": int(s)} for k, s in enumerate(tf["stop_step"][:, 0]) if s]}
    record_tf["decodes"] = {"argmax": record_tf["transformer"]}
    preds = {"argmax": tf["obs"][:, 0]}
    for how in DECODES[1:]:  # the same teacher-forced rollouts with the other greedy decodes, side by side
        other = rollout_transformer(run, prefixes, horizon, 1, actions=true_act, greedy=True, seed=seed, decode=how)
        preds[how] = other["obs"][:, 0]
        record_tf["decodes"][how] = error_summary(normalized_error(preds[how], true, held.obs_std))
    ens_tf = None
    if ens is not None:
        ens_tf = rollout_ensemble(ens, start, true_act[:, None])
        record_tf["ensemble"] = error_summary(normalized_error(ens_tf["obs"][:, 0], true, held.obs_std))
    at = sorted({s for s in SUMMARY_STEPS if s <= horizon} | {horizon})
    record_tf["by_dim"] = {f"transformer_{how}": dim_errors(pred, true, held.obs_std, at)
                           for how, pred in preds.items()}
    if ens_tf is not None:
        record_tf["by_dim"]["ensemble"] = dim_errors(ens_tf["obs"][:, 0], true, held.obs_std, at)
    # The mean of sampled rollouts (true actions, states sampled at temperature 1) is the squared-error-optimal
    # point prediction of each model's own distribution; both models' means, on the same starts and actions.
    say(f"teacher-forced sample means: {len(chosen)} starts x {samples} samples x {horizon} steps")
    t0 = time.perf_counter()
    sampled = rollout_transformer(run, prefixes, horizon, samples, actions=true_act, greedy=False, seed=seed)
    seconds["transformer_sample_mean"] = time.perf_counter() - t0
    record_tf["sample_mean"] = {"transformer": error_summary(normalized_error(sample_mean(sampled["obs"]), true,
                                                                             held.obs_std))}
    if ens is not None:
        ens_sm = rollout_ensemble(ens, start, np.repeat(true_act[:, None], samples, 1), sample=True, seed=seed)
        record_tf["sample_mean"]["ensemble"] = error_summary(normalized_error(sample_mean(ens_sm["obs"]), true,
                                                                              held.obs_std))
    if others:
        say(f"ablations: {', '.join(others)}")
        record_tf["ablations"] = {name: ablation_errors(run, other, dataset or run.meta["dataset_id"], chosen,
                                                        horizon, preds, seed)
                                  for name, other in others.items()}

    say(f"open loop: {len(chosen)} starts x {samples} samples x {horizon} steps")
    t0 = time.perf_counter()
    ol = rollout_transformer(run, prefixes, horizon, samples, actions=None, greedy=False, seed=seed)
    seconds["transformer_open_loop"] = time.perf_counter() - t0
    disc = run.discretizer
    dS = run.obs_dim
    curves = {"transformer": [], "oracle": []}
    ens_ol = rollout_ensemble(ens, start, ol["act"], sample=True, seed=seed) if ens is not None else None
    if ens is not None:
        curves["ensemble"] = []
    for k in range(len(chosen)):
        ll, oracle = histogram_loglik(ol["obs"][k], true[k], disc.edges[:dS], disc.n_real[:dS], held.obs_std)
        curves["transformer"].append(ll)
        curves["oracle"].append(oracle)
        if ens_ol is not None:
            curves["ensemble"].append(histogram_loglik(ens_ol["obs"][k], true[k], disc.edges[:dS],
                                                       disc.n_real[:dS], held.obs_std)[0])
    stops = ol["stop_step"]
    with warnings.catch_warnings():  # a step where every start's rows stopped has no score (NaN -> null)
        warnings.simplefilter("ignore", RuntimeWarning)
        record_ol = {name: np.nanmean(np.stack(c), axis=0) for name, c in curves.items()}
    record_ol["transformer_stopped_fraction"] = [float(np.mean((stops > 0) & (stops <= h)))
                                                 for h in range(1, horizon + 1)]
    # Both models on the same held-out transitions (NLL) and the same starts' first step (error).
    pairs = one_step_transitions(held, seed=seed)
    one_step = {"transformer": {**transformer_one_step(run, held, pairs),
                                "one_step_error": record_tf["transformer"]["mean"][0]}}
    if ens is not None:
        one_step["ensemble"] = {**ensemble_one_step(ens, held, pairs),
                                "one_step_error": record_tf["ensemble"]["mean"][0]}
    summary = {str(s): {"transformer_error": record_tf["transformer"]["mean"][s - 1],
                        **{f"transformer_error_{how}": record_tf["decodes"][how]["mean"][s - 1] for how in DECODES[1:]},
                        "ensemble_error": record_tf["ensemble"]["mean"][s - 1] if ens else None,
                        **{f"{name}_error_sample_mean": by["mean"][s - 1]
                           for name, by in record_tf["sample_mean"].items()},
                        "transformer_loglik": float(record_ol["transformer"][s - 1]),
                        "ensemble_loglik": float(record_ol["ensemble"][s - 1]) if ens else None,
                        "oracle_loglik": float(record_ol["oracle"][s - 1]),
                        **{f"{name}_error" + ("" if how == "argmax" else f"_{how}"): by["error"]["mean"][s - 1]
                           for name, row in record_tf.get("ablations", {}).items()
                           for how, by in row["decodes"].items()}} for s in at}
    record = {
        "config": {"run_dir": str(run.path), "obs_dims": run.obs_indices.tolist(),
                   "baseline": str(baseline) if baseline else None,
                   "ablations": {name: str(other.path) for name, other in others.items()},
                   "dataset": held.dataset_id, "held_out": held.source, "horizon": horizon, "starts": len(chosen),
                   "samples": samples, "seed": seed,
                   "error": "RMS over observation dims of (predicted - true) / dataset std per dim",
                   "teacher_forced": "true actions fed to both; transformer argmax tokens decoded as bin midpoints "
                                     "(expectation and median decodes under decodes), its own argmax value token "
                                     "at each value position, stop only if the data has terminations and p(stop) > "
                                     "1/2; ensemble mean of member means; sample_mean: each model's mean over "
                                     "`samples` rollouts sampled at temperature 1 on the true actions (ensemble: "
                                     "random member + Gaussian sample per step)",
                   "open_loop": "transformer samples actions and states (temperature 1); ensemble on the same "
                                "sampled actions, random member + Gaussian sample per step (TS1); log-likelihood of "
                                "true states under per-step histograms over the transformer's bins, nats per dim, "
                                "states in dataset-std units, 1 pseudo-count per dim; a stopped row counts with "
                                "no mass"},
        "starts": [{"episode": i, "t": t} for i, t in chosen],
        "summary": summary,
        "one_step": one_step,
        "teacher_forced": record_tf,
        "open_loop": record_ol,
        "compute": {"transformer": tt_compute, "ensemble": ens.meta["training"] if ens else None,
                    "prediction_seconds": seconds},
    }
    save_json(out / "predict.json", _json(record))  # the numbers first: a figure that fails keeps them
    record["files"] = plots.prediction_figures(record, out, true=true, tf=tf, ens_tf=ens_tf, ol=ol, ens_ol=ens_ol,
                                               start=start, env=held.env, obs_indices=run.obs_indices, render=render)
    record = _json(record)
    save_json(out / "predict.json", record)
    say(report(record))
    return record


def sample_mean(obs: np.ndarray) -> np.ndarray:
    """Point prediction from sampled rollouts (K, M, H, dS): their mean over the M samples, stopped (NaN) rows
    left out; NaN where every row of a start has stopped."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(obs, axis=1)


def report(record: dict) -> str:
    """The summary table: normalised error (teacher-forced) and open-loop log-likelihood at a few steps."""
    lines = ["step  TT error (argmax  expect.  median)  ensemble error  TT loglik  ensemble loglik  oracle"]

    def fmt(v, w=9):
        return f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"

    for step, row in record["summary"].items():
        lines.append(f"{step:>4} {fmt(row['transformer_error'], 16)} {fmt(row.get('transformer_error_expectation'))}"
                     f"{fmt(row.get('transformer_error_median'))} {fmt(row['ensemble_error'], 16)} "
                     f"{fmt(row['transformer_loglik'], 10)} {fmt(row['ensemble_loglik'], 16)} "
                     f"{fmt(row['oracle_loglik'], 7)}")
    means = {k: v for k, v in record["summary"][str(max(int(s) for s in record["summary"]))].items()
             if k.endswith("_sample_mean")}
    if means:
        lines.append(f"mean of {record['config']['samples']} sampled rollouts (true actions), error at the last "
                     "summary step: " + ", ".join(f"{k.split('_')[0]} {fmt(v, 0).strip()}" for k, v in means.items()))
    for name, row in record["one_step"].items():
        error = row["one_step_error"]
        lines.append(f"one-step {name}: NLL {row['obs_nll_std_units']:.3f} nats/dim (states in dataset stds, "
                     f"{row['transitions']} held-out transitions), error "
                     + ("- (stopped)" if error is None else f"{error:.3f}"))
    for name, row in record["teacher_forced"].get("ablations", {}).items():
        for how, by in row.get("decodes", {"argmax": row}).items():
            err, same = by["error"]["mean"], by["transformer_same_dims"]["mean"]
            lines.append(f"ablation {name} ({row['context_transitions']}-transition context, {len(row['obs_dims'])} "
                         f"obs dims), {how} decode: error at step {len(err)} {fmt(err[-1], 0).strip()}, the "
                         f"transformer on the same dims {fmt(same[-1], 0).strip()}")
    stops = record["teacher_forced"]["transformer_stops"]
    if stops:
        lines.append(f"teacher-forced transformer rollouts ended by a stop token: {stops}")
    frac = record["open_loop"]["transformer_stopped_fraction"]
    if frac and frac[-1]:
        lines.append(f"open-loop rows ended by a stop token by the last step: {frac[-1]:.1%}")
    return "\n".join(lines)
