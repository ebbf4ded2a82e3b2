"""Evaluation episodes with the beam-search planner (DESIGN.md §6): K environments stepped together with one
batched search per step, per-episode returns, normalised scores, a JSON record and an optional video.

Episode e is reset with seed `seed + e` and planned with a random stream seeded the same way, so results do
not depend on how many envs run at once (--num-envs changes only the speed: bit for bit in float32 when every
episode starts at once, as then the envs' contexts are equally long; up to float rounding for an episode started in
a freed slot, for its first steps: planner.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from trajformer.config import PlanConfig
from trajformer.data import describe_split, env_kwargs, same_split
from trajformer.files import file_lock, load_json, save_json, writable_dir
from trajformer.metrics import score_reference, summarize
from trajformer.planner import Critic, Planner, plan_config
from trajformer.render import EpisodeVideo, check_rendering, make_env, video_path
from trajformer.run import Run, load_run, model_sha256
from trajformer.stopping import stop_requests


def env_settings(run: Run, env_id: str | None = None) -> tuple[str, dict, int | None]:
    """Env id, kwargs and time limit: the ones recorded in the run unless another env id is given."""
    recorded = run.meta.get("env") or {}
    if env_id is None:
        env_id = recorded.get("id")
        if not env_id:
            raise ValueError(f"{run.path} records no environment (its dataset has no env spec); plan in a named env "
                             "with `trajformer plan --env ENV_ID`")
    if env_id != recorded.get("id"):
        return env_id, {}, None
    return env_id, env_kwargs(recorded), recorded.get("max_episode_steps")


def check_env(env: gym.Env, run: Run, env_id: str) -> None:
    """The env must have flat Box spaces whose dims match the ones the run was trained on."""
    for what, space in (("action", env.action_space), ("observation", env.observation_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(
                f"env {env_id} has a {type(space).__name__} {what} space; the planner needs a flat Box {what} space "
                f"(continuous control), so use a continuous-action env"
            )
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    raw_dim = run.meta.get("raw_obs_dim", obs_dim)
    if obs_dim != raw_dim or act_dim != run.act_dim or obs_dim <= int(run.obs_indices.max()):
        raise ValueError(
            f"run {run.path} was trained on {raw_dim}-dim observations and {run.act_dim}-dim actions "
            f"({run.meta.get('dataset_id')}) but env {env_id} has {obs_dim} and {act_dim}; "
            f"plan in the env the run was trained on (omit --env)"
        )


class EvaluationStopped(Exception):
    """run_episodes was asked to stop; its state went to on_progress."""


class Agent(Protocol):
    """What run_episodes steps: per-env resets, batched actions, and the rewards that follow them. A resumable
    evaluation also needs `state(env) -> dict` and `restore(env, state)` (the planner has them)."""

    def reset(self, env: int = 0, seed: int = 0) -> None: ...

    def act_batch(self, envs: list[int], observations: np.ndarray) -> np.ndarray: ...

    def observe_batch(self, envs: list[int], rewards: np.ndarray) -> None: ...


def replay(env: gym.Env, seed: int, actions: list[list[float]], observation: list[float]) -> np.ndarray:
    """Reset `env` with `seed` and step it through `actions`: an episode interrupted mid-way, back where it was.
    The observation it reaches must be the recorded one, bit for bit."""
    obs, _ = env.reset(seed=seed)
    for i, action in enumerate(actions):
        obs, _, terminated, truncated, _ = env.step(np.asarray(action))
        if (terminated or truncated) and i < len(actions) - 1:
            break
    if not np.array_equal(obs, np.asarray(observation, dtype=obs.dtype)):
        raise ValueError(f"replaying {len(actions)} recorded actions from seed {seed} did not reach the recorded "
                           "state (another environment or MuJoCo version?); delete the \"in_progress\" entry of "
                           "eval.partial.json to plan those episodes from their start")
    return obs


def run_episodes(envs: list[gym.Env], agent: Agent, episodes: int, seed: int = 0, max_steps: int | None = None,
                 limit: int | None = None, desc: str = "episodes", progress: bool = True,
                 on_step: Callable[[int, np.ndarray, int, int], None] | None = None,
                 skip: frozenset[int] = frozenset(), resume: list[dict] | tuple = (),
                 on_progress: Callable[[dict], None] | None = None, progress_every: float = 60.0,
                 stop: Callable[[], bool] | None = None) -> tuple[dict[int, tuple[float, int]], int, float]:
    """The evaluation protocol (DESIGN.md §6): episode e is reset with seed + e, and the agent's slot with the
    same seed, so results do not depend on len(envs); up to max_steps (or the env's limit) steps each. Returns
    ({episode: (return, length)}, env steps, seconds of acting and stepping). `on_step(slot, obs, episode, step)`
    runs before each env step (the planner's video and likelihoods); its time is not counted.

    Resuming (an hour per episode at 128/15 on a CPU): episodes in `skip` (finished earlier) are not run;
    `on_progress(state)` gets {"finished": {episode: [return, length]}, "in_progress": [...], "steps", "seconds"}
    whenever an episode ends and every `progress_every` seconds; passing an earlier state's "in_progress" as
    `resume` replays those episodes' actions in fresh envs, restores the agent's slots, and goes on exactly as
    an uninterrupted run would; a KeyboardInterrupt (Ctrl-C, SIGTERM) reports the state after the last whole env
    step before it propagates, so a stop loses no env step. Slots freed by resumed episodes take new ones, so all
    len(envs) stay in use.
    When `stop()` turns true (checked before each env step), the state goes to `on_progress` and EvaluationStopped
    is raised: another process can go on from it (the workers' re-deal)."""
    resume = [r for r in resume if r["episode"] not in skip]
    if len(resume) > len(envs):
        raise ValueError(f"{len(resume)} episodes to resume but {len(envs)} envs; use at least {len(resume)}")
    n = len(envs)
    obs: list[np.ndarray | None] = [None] * n
    episode_of, ret, length = [-1] * n, [0.0] * n, [0] * n
    taken: list[list[list[float]]] = [[] for _ in range(n)]  # each slot's actions so far, for on_progress
    results: dict[int, tuple[float, int]] = {}
    resumed = {r["episode"] for r in resume}
    queue = [e for e in range(episodes) if e not in skip and e not in resumed]
    started = 0

    def start(k: int) -> None:
        nonlocal started
        episode_of[k], ret[k], length[k], taken[k] = queue[started], 0.0, 0, []
        obs[k], _ = envs[k].reset(seed=seed + queue[started])
        agent.reset(k, seed=seed + queue[started])
        started += 1

    for k, slot in enumerate(resume):
        e = slot["episode"]
        obs[k] = replay(envs[k], seed + e, slot["actions"], slot["observation"])
        agent.reset(k, seed=seed + e)
        agent.restore(k, slot["agent"])
        episode_of[k], ret[k], length[k], taken[k] = e, slot["return"], len(slot["actions"]), list(slot["actions"])
    for k in range(len(resume), min(n, len(resume) + len(queue))):
        start(k)
    total = (len(queue) + len(resume)) * (max_steps or limit) if (max_steps or limit) else None
    # disable=None: progress bars only on a terminal, never in redirected output.
    bar = tqdm(total=total, initial=sum(length), desc=desc, unit="step", disable=None if progress else True)
    steps, t0, hook_seconds = 0, time.perf_counter(), 0.0
    last_report = t0
    ended = False

    def state(now: float) -> dict:
        return {"finished": {str(e): list(r) for e, r in results.items()},
                "in_progress": [{"episode": episode_of[k], "return": ret[k], "actions": list(taken[k]),
                                 "observation": np.asarray(obs[k]).tolist(), "agent": agent.state(k)}
                                for k in range(n) if episode_of[k] >= 0],
                "steps": steps, "seconds": now - t0 - hook_seconds}

    snapshot = None  # the state after the last whole env step: what a Ctrl-C keeps
    try:
        while True:
            active = [k for k in range(n) if episode_of[k] >= 0]
            if not active:
                break
            if stop is not None and stop():
                if on_progress is not None:
                    on_progress(state(time.perf_counter()))
                bar.close()
                raise EvaluationStopped(f"stopped after {steps} env steps; {len(active)} episodes under way")
            actions = agent.act_batch(active, np.stack([obs[k] for k in active]))
            rewards = []
            for k, action in zip(active, actions, strict=True):
                if on_step is not None:
                    tick = time.perf_counter()
                    on_step(k, obs[k], episode_of[k], length[k])
                    hook_seconds += time.perf_counter() - tick
                obs[k], reward, terminated, truncated, _ = envs[k].step(action)
                if on_progress is not None:
                    taken[k].append(np.asarray(action, dtype=np.float64).tolist())
                rewards.append(float(reward))
                ret[k] += float(reward)
                length[k] += 1
                if terminated or truncated or (max_steps is not None and length[k] >= max_steps):
                    results[episode_of[k]] = (ret[k], length[k])
                    ended = True
                    episode_of[k] = -1
            agent.observe_batch(active, np.array(rewards))
            steps += len(active)
            for k in active:
                if episode_of[k] < 0 and started < len(queue):
                    start(k)
            now = time.perf_counter()
            if on_progress is not None:  # its time (the planner's state, the file) is not counted as acting
                snapshot = state(now)
                if ended or now - last_report >= progress_every:
                    on_progress(snapshot)
                    last_report, ended = time.perf_counter(), False
                hook_seconds += time.perf_counter() - now
            bar.update(len(active))
            running = [ret[k] for k in range(n) if episode_of[k] >= 0]
            bar.set_postfix(running_return=f"{np.mean(running):.1f}" if running else "-", done=len(results))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM mid-search: keep every env step taken so far
        if snapshot is not None:
            on_progress(snapshot)
        raise
    bar.close()
    return results, steps, time.perf_counter() - t0 - hook_seconds


def episode_record(results: dict[int, tuple[float, int]], steps: int, seconds: float, env_id: str,
                   meta: dict, kwargs: dict | None = None, limit: int | None = None,
                   max_steps: int | None = None) -> dict:
    """run_episodes' results as the protocol's record: returns and lengths by episode, mean ± standard error,
    normalised score with its reference (metrics.score_reference: the env's kwargs and time limit, and the
    episodes' cut), seconds per env step."""
    reference, label = score_reference(env_id, meta, kwargs, limit, max_steps)
    order = sorted(results)
    record = summarize([results[e][0] for e in order], [results[e][1] for e in order], reference)
    record.update({"score_reference": label, "seconds_per_step": seconds / max(steps, 1)})
    return record


def load_critic(path: str, run: Run) -> Critic:
    """The `critic` objective's Q(s, a) in environment reward units: the min of an IQL directory's twin Qs,
    undoing IQL's reward scaling; its observation dims must be the run's."""
    from trajformer.baselines.iql import load_iql

    agent, meta = load_iql(path)
    if agent.obs_indices.tolist() != run.obs_indices.tolist() or meta["act_dim"] != run.act_dim:
        raise ValueError(f"critic {path} was trained on observation dims {agent.obs_indices.tolist()[:4]}... and "
                         f"{meta['act_dim']} action dims, the run on {run.obs_indices.tolist()[:4]}... and "
                         f"{run.act_dim}; train it on the run's dataset and data.obs_dims")
    scale = float(meta["reward_scale"])

    @torch.no_grad()
    def critic(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*agent.q(obs.float(), act.float())) / scale

    return critic


def check_counts(episodes: int, num_envs: int | None, max_steps: int | None = None) -> None:
    """One-line error, before any work, for an episode, env or step count below 1 (None: not given)."""
    for name, n in (("--episodes", episodes), ("--num-envs", num_envs), ("--max-steps", max_steps)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")


def evaluate_agent(agent: Agent, env: dict, episodes: int = 10, num_envs: int = 10, seed: int = 0,
                   max_steps: int | None = None, meta: dict | None = None, progress: bool = True) -> dict:
    """The evaluation protocol for any agent in a recorded env spec ({id, kwargs, max_episode_steps}): returns,
    mean ± standard error, normalised score (metrics.score_reference), seconds per env step."""
    check_counts(episodes, num_envs)
    if not env.get("id"):
        raise ValueError("the data records no environment; evaluate in a named env")
    kwargs = env_kwargs(env)
    limit = env.get("max_episode_steps")
    envs = [make_env(env["id"], kwargs, limit) for _ in range(min(num_envs, episodes))]
    results, steps, seconds = run_episodes(envs, agent, episodes, seed, max_steps, limit, f"evaluate {env['id']}",
                                           progress)
    for e in envs:
        e.close()
    record = episode_record(results, steps, seconds, env["id"], meta or {}, kwargs, limit, max_steps)
    record["config"] = {"env": env["id"], "env_kwargs": kwargs, "episodes": episodes, "num_envs": num_envs,
                        "max_steps": max_steps, "seed": seed}
    return record


def evaluate(run: Run, plan_cfg: PlanConfig | None = None, env_id: str | None = None, episodes: int = 1,
             num_envs: int = 1, max_steps: int | None = None, seed: int = 0, video: str | Path | None = None,
             progress: bool = True, dtype: torch.dtype | None = None, video_speed: float = 1.0,
             skip: frozenset[int] = frozenset(), resume: list[dict] | tuple = (),
             on_progress: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Plan `episodes` episodes over `num_envs` envs stepped together; returns the JSON record. The video shows
    episode 0 at the env's frame rate times `video_speed`; rendering is not counted in seconds_per_step.
    `skip`, `resume`, `on_progress` and `stop` as in run_episodes (the resumable protocol); the record holds the
    episodes run."""
    check_counts(episodes, num_envs, max_steps)
    if video_speed <= 0:
        raise ValueError(f"--video-speed must be > 0 (1 = real time, 0.25 = four times slower), got {video_speed}")
    if video is not None and resume:
        raise ValueError("a video starts with its episode; resume without --video")
    if video is not None:
        video_path(video)  # a name we cannot write fails now, not after the episodes
    plan_cfg = plan_cfg or run.config.plan
    env_id, kwargs, limit = env_settings(run, env_id)
    if plan_cfg.num_threads > 0:
        torch.set_num_threads(plan_cfg.num_threads)
    num_envs = max(1, len(resume), min(num_envs, episodes - len(skip)))
    first = make_env(env_id, kwargs, limit)
    try:
        check_env(first, run, env_id)
        if video is not None and "rgb_array" not in first.metadata.get("render_modes", []):
            raise ValueError(f"env {env_id} cannot render rgb_array frames; drop --video")
        critic = load_critic(plan_cfg.critic, run) if plan_cfg.objective == "critic" else None
        planner = Planner.from_run(run, plan_cfg, n_envs=num_envs, critic=critic, dtype=dtype)
    finally:
        if video is not None:
            first.close()
    if video is not None:
        first = make_env(env_id, kwargs, limit, render=True)
        try:
            check_rendering(first)  # before any episode
        except ValueError:
            first.close()
            raise
    envs = [first] + [make_env(env_id, kwargs, limit) for _ in range(num_envs - 1)]
    renderer = None
    if video is not None:
        ghost = make_env(env_id, kwargs, limit, render=True)
        renderer = EpisodeVideo(envs[0], ghost, run.obs_indices)

    log_likelihoods: list[float] = []

    def on_step(k: int, obs: np.ndarray, episode: int, length: int) -> None:
        """The planner's extras: each new plan's log-likelihood; episode 0's video frame."""
        if planner.offsets[k] == 1:  # replanned this step
            log_likelihoods.append(planner.last_plans[k].log_likelihood)
        if renderer is not None and episode == 0:
            if length == 0:
                renderer.start(obs)
            plan = planner.last_plans[k]
            future = plan.next_observations[planner.offsets[k] - 1 :] if plan is not None else None
            renderer.add(obs, future, length)

    results, steps, seconds = run_episodes(envs, planner, episodes, seed, max_steps, limit, f"plan {env_id}",
                                           progress, on_step, skip=skip, resume=resume, on_progress=on_progress,
                                           stop=stop)
    record = episode_record(results, steps, seconds, env_id, run.meta, kwargs, limit, max_steps)
    record.update({
        "plan_log_likelihood": float(np.mean(log_likelihoods)),
        "config": {"plan": dataclasses.asdict(plan_cfg), "discount": run.config.data.discount, "env": env_id,
                   "env_kwargs": kwargs, "episodes": episodes, "num_envs": num_envs, "max_steps": max_steps,
                   "seed": seed, "run_dir": str(run.path), "dataset_id": run.meta.get("dataset_id"),
                   "dtype": str(next(planner.search.model.parameters()).dtype).removeprefix("torch.")},
    })
    if renderer is not None:
        fps = float(envs[0].metadata.get("render_fps", 30)) * video_speed
        record["video"] = str(renderer.save(Path(video), fps))
        record["video_fps"] = fps
        if not renderer.posed:
            record["video_note"] = "real episode only: the env is not a MuJoCo env with [qpos, qvel] observations"
    for env in envs:
        env.close()
    return record


def dataset_reference(run: Run, max_steps: int | None = None, download: bool = True) -> float | None:
    """The dataset's own mean return, to read a planned return against: over complete episodes (recorded at
    training, else read from the dataset), or over the first `max_steps` steps of its episodes when episodes are
    cut. Raises FileNotFoundError where the dataset must be read and is not on this machine, ValueError where it
    now holds other data than the run was trained on."""
    from trajformer.data import load_episodes, prefix_return_mean, return_stats

    stats = run.meta.get("dataset_stats", {})
    if max_steps is None and "complete_return_mean" in stats:  # None when the data has no complete episode
        return stats["complete_return_mean"]
    data = load_episodes(run.meta["dataset_id"], run.config.data, download=download)
    trained_on = run.meta.get("provenance", {}).get("dataset_sha256")
    if trained_on is not None and trained_on != data.sha256:
        raise ValueError(f"{run.meta['dataset_id']} holds other data than {run.path} was trained on (collected again "
                         "with other settings?)")
    return return_stats(data)["complete_return_mean"] if max_steps is None else prefix_return_mean(data, max_steps)


def report(record: dict) -> str:
    """Human-readable summary: per-episode return and length, mean ± standard error, normalised score."""
    lines = [f"episode {i}: return {r:.2f}, length {n}"
             for i, (r, n) in enumerate(zip(record["returns"], record["lengths"], strict=True))]
    stderr = record["stderr"]
    lines.append(f"mean return {record['mean_return']:.2f}" + (f" ± {stderr:.2f} (stderr)" if stderr else "")
                 + f" over {len(record['returns'])} episodes")
    if record["normalized_score"] is not None:
        nse = record["normalized_stderr"]
        lines.append(f"normalised score ({record['score_reference']}) {record['normalized_score']:.1f}"
                     + (f" ± {nse:.1f}" if nse else ""))
    elif record.get("config", {}).get("max_steps"):
        lines.append(f"normalised score: none for episodes cut at {record['config']['max_steps']} steps (the "
                     "reference returns are of whole episodes)")
    else:
        lines.append("normalised score: no reference returns for this env or dataset")
    if record.get("dataset_mean_return") is not None:
        steps = record.get("config", {}).get("max_steps")
        lines.append(f"the dataset's own episodes: mean return {record['dataset_mean_return']:.2f}"
                     + (f" over their first {steps} steps" if steps else " (complete episodes)"))
    elif record.get("dataset_mean_return_note"):
        lines.append(f"the dataset's own episodes: not read ({record['dataset_mean_return_note']})")
    lines.append(f"{record['seconds_per_step']:.3g} s per env step"
                 + (f", plan log-likelihood {record['plan_log_likelihood']:.2f} per plan"
                    if "plan_log_likelihood" in record else ""))
    if "video" in record:
        lines.append(f"video: {record['video']}" + (f" ({record['video_note']})" if "video_note" in record else ""))
    return "\n".join(lines)


def plan_command(run_dir: str, env_id: str | None = None, episodes: int = 1, num_envs: int = 1,
                 max_steps: int | None = None, seed: int = 0, overrides: list[str] | None = None,
                 json_path: str | None = None, video: str | None = None, video_speed: float = 1.0) -> dict:
    """`trajformer plan`: load the run, validate the settings, evaluate, print the report, write JSON."""
    if json_path is not None and Path(json_path).is_dir():
        raise ValueError(f"--json {json_path} is a directory; name a file in it, e.g. {Path(json_path) / 'plan.json'}")
    if json_path is not None:  # now, not after the episodes
        writable_dir(Path(json_path).parent, fix="name a --json file in a folder you can write to")
    if seed < 0:
        raise ValueError(f"--seed {seed}: pass a seed >= 0 (episode i resets with seed + i)")
    run = load_run(run_dir)
    plan_cfg = plan_config(run, overrides or [])
    try:  # an extra beside the record, read before the episodes: none where the dataset cannot serve as one
        reference, unread = dataset_reference(run, max_steps, download=False), None
    except (FileNotFoundError, KeyError, ValueError) as err:
        reference, unread = None, str(err).split(";")[0]
    record = evaluate(run, plan_cfg, env_id=env_id, episodes=episodes, num_envs=num_envs, max_steps=max_steps,
                      seed=seed, video=video, video_speed=video_speed)
    record["dataset_mean_return"] = reference
    if unread:
        record["dataset_mean_return_note"] = unread
    print(report(record))
    if json_path is not None:
        save_json(Path(json_path), record)
        print(f"wrote {json_path}")
    return record


CHEAP = {"beam_width": 32, "horizon": 5}
"""The cheap planner setting every evaluation also reports (DESIGN.md §6), beside the official one."""

OFFICIAL = {"beam_width": 128, "horizon": 15, "n_expand": 2, "cdf_act": 0.6, "k_act": None,
            "max_context_transitions": 5, "k_obs": 1, "plan_freq": 1}
OFFICIAL_OVERRIDES = {  # (env family, dataset kind) -> the official code's per-task overrides (DESIGN.md §5)
    ("halfcheetah", "medium"): {"beam_width": 32, "horizon": 5},
    ("halfcheetah", "replay"): {"beam_width": 32, "horizon": 5},
    ("halfcheetah", "medium-expert"): {"beam_width": 32},
    ("walker2d", "medium-expert"): {"horizon": 5},
    ("walker2d", "replay"): {"beam_width": 32, "horizon": 20, "k_act": 40, "cdf_act": None},
    ("ant", ""): {"horizon": 5},
}
SETTING_KEYS = frozenset(OFFICIAL) | {"objective"}
"""Keys only the evaluation's settings decide; `--set` may change the rest (device, dtype, threads, and a window
model's carry_context, which the setting then names)."""


def official_plan(env_id: str, dataset_id: str) -> dict:
    """The official planner setting for a task: the defaults plus the official per-task overrides, the task read
    from the env id and the dataset name (medium-expert before medium-replay before medium). The official config
    names no expert-only, random or simple task: those take the defaults (the family's own override for ant)."""
    family = env_id.split("-")[0].split("/")[-1].lower()
    name = dataset_id.lower().replace("_", "-")
    kind = ("medium-expert" if "medium-expert" in name else "replay" if "replay" in name
            else "medium" if "medium" in name else "")
    for key in ((family, kind), (family, "")):
        if key in OFFICIAL_OVERRIDES:
            return {**OFFICIAL, **OFFICIAL_OVERRIDES[key]}
    return dict(OFFICIAL)


_EVAL_FIX = "move it aside and run `trajformer eval` again: it plans again what it held"  # a damaged eval.json


def evaluation_protocol(run_dir: str, episodes: int = 10, settings: tuple[str, ...] = ("official", "32x5"),
                        bc_dirs: tuple[str, ...] = (), num_envs: int | None = None, progress: bool = True,
                        overrides: list[str] | tuple[str, ...] = (), again: bool = False, workers: int = 1) -> dict:
    """The one evaluation protocol (issue 9): N episodes (seeds 0..N-1) of up to 1000 steps with envs batched,
    at the official planner setting of the run's task ("official", whatever the run's own [plan] says) and at
    beam 32 / horizon 5 ("32x5"), beside the dataset's mean return over complete episodes and behaviour
    cloning's return on the same protocol (the mean over `bc_dirs`, BC of distinct training seeds: one seed's
    return varies more than its standard error says); RUN_DIR/eval.json. `overrides` (plan.key=value) may set how the
    search runs (device, dtype, threads), not what it searches, but for a window model's plan.carry_context (then
    named in its setting). Each finished episode is kept in RUN_DIR/eval.partial.json, and so are the episodes
    under way every minute and at a stop: running it again after an interruption goes on mid-episode where it
    stopped (run_episodes). A setting eval.json already holds for these
    weights, episodes and search is kept, not planned again (so `--bc` can be added later), unless `again` (or
    another plan.dtype than it was planned in is asked for); eval.json's evaluations of these weights on another
    episode count are replaced only with `again`. `workers` processes share the episodes
    (`_evaluate_in_workers`)."""
    check_counts(episodes, num_envs)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    unknown = [s for s in settings if s not in ("official", "32x5")]
    if unknown or not settings:
        raise ValueError(f"--settings {','.join(settings)}: choose from official, 32x5")
    asked = {item.split("=", 1)[0].strip().removeprefix("plan."): item for item in overrides}
    for key, item in asked.items():
        if key in SETTING_KEYS:
            raise ValueError(f"--set {item!r}: the protocol fixes plan.{key}; set how it runs (plan.device, "
                             "plan.dtype, plan.num_threads) or plan with `trajformer plan` instead")
    run = load_run(run_dir)
    env_id = env_settings(run)[0]  # the protocol runs in the run's own env
    # eval.json holds one episode count: rows of these weights on another would be replaced, so only on --again.
    run_dir = Path(run.path)
    weights = model_sha256(run)
    earlier = run_dir / "eval.json"
    older = load_json(earlier, _EVAL_FIX) if earlier.is_file() else {}
    theirs = [name for name, r in older.get("settings", {}).items() if r.get("model_sha256") == weights]
    if theirs and older["episodes"] != episodes and not again:
        raise ValueError(f"{earlier} holds {older['episodes']}-episode evaluations of these weights "
                         f"({', '.join(theirs)}), which {episodes} episodes would replace: evaluate "
                         f"{older['episodes']} episodes, pass --again to replace them, or evaluate a copy of the run")
    _upgrade_partial(run, weights)
    bc = [_bc_reference(d, run, episodes) for d in bc_dirs]
    if len({b["seed"] for b in bc}) < len(bc):
        raise ValueError(f"--bc {' '.join(bc_dirs)}: two directories share a training seed; give BC runs of "
                         "distinct seeds (`trajformer bc CONFIG --hp seed=N`)")
    out = {"episodes": episodes, "dataset_mean_return": dataset_reference(run),
           "bc_mean_return": float(np.mean([b["mean_return"] for b in bc])) if bc else None,
           "bc": bc or None, "settings": {}}
    # Finished episodes are kept in eval.partial.json as they end, so an interrupted evaluation (an hour per
    # episode at 128/15 on a CPU) resumes where it stopped; the file goes once eval.json is written. Evaluations
    # of other settings may run at the same time on the same run directory: each updates only its own entries of
    # the shared files, under a lock, and one setting is evaluated by one process at a time.
    plans: dict[tuple, tuple[dict, PlanConfig]] = {}  # a task whose official setting is 32/5 plans once
    names = {}
    for name in settings:
        setting = official_plan(env_id, run.meta["dataset_id"])
        if name == "32x5":
            setting.update(CHEAP)
        # The official context of 5 transitions, or all an absolute model trained on shorter windows can take.
        setting["max_context_transitions"] = run.model.config.fit_context(setting["max_context_transitions"])
        fixed = [f"plan.{k}={'none' if v is None else v}" for k, v in setting.items()]
        plan_cfg = plan_config(run, [*fixed, "plan.objective=reward", *overrides])
        if plan_cfg.carry_context:  # another search: named in the setting (only when on: older records lack it)
            setting["carry_context"] = True
        key = names[name] = tuple(sorted(setting.items()))
        plans.setdefault(key, (setting, plan_cfg))
    # A setting's entry names the weights it planned with; entries of other (or unnamed) weights are not kept.
    finished = _kept_settings(older, episodes, weights).values()
    done: dict[tuple, dict] = {}
    for key, (setting, plan_cfg) in plans.items():
        kept = [r for r in finished if {k: r["plan"].get(k) for k in setting} == setting
                and bool(r["plan"].get("carry_context")) == plan_cfg.carry_context
                and ("dtype" not in asked or r["plan"]["dtype"] == plan_cfg.dtype)]
        if kept and not again:
            print(f"beam {setting['beam_width']} / horizon {setting['horizon']}: kept from {earlier} (the same "
                  "weights, episodes and search); --again plans it again", flush=True)
            done[key] = _rescored(kept[0], run)
    with contextlib.ExitStack() as held:
        for key, (setting, plan_cfg) in plans.items():
            if key in done:
                continue
            digest = hashlib.sha1(json.dumps(_identity(setting, plan_cfg, episodes, weights),
                                             sort_keys=True).encode())
            if not held.enter_context(file_lock(run_dir / f".eval-{digest.hexdigest()[:12]}.lock", wait=False)):
                raise ValueError(f"another `trajformer eval` is evaluating beam {setting['beam_width']} / horizon "
                                 f"{setting['horizon']} ({episodes} episodes) on {run_dir}; wait for it, or stop it "
                                 "and run again to go on where it stopped")
        for key, (setting, plan_cfg) in plans.items():
            if key not in done:
                done[key] = {**_resumable_setting(run, plan_cfg, _identity(setting, plan_cfg, episodes, weights),
                                                  num_envs or episodes, progress, workers), "model_sha256": weights}
    out["settings"] = {name: done[names[name]] for name in settings}
    with file_lock(run_dir / ".eval.lock"):
        # Settings evaluated earlier on as many episodes (another `--settings`) stay in eval.json beside these.
        latest = load_json(earlier, _EVAL_FIX) if earlier.is_file() else {}  # as other evaluations left it
        kept_rows = _kept_settings(latest, episodes, weights)
        out["settings"] = {**{name: _rescored(r, run) for name, r in kept_rows.items()}, **out["settings"]}
        if not bc and latest.get("episodes") == episodes:
            out["bc_mean_return"], out["bc"] = latest.get("bc_mean_return"), latest.get("bc")
        save_json(earlier, out)
        _update_partial(run_dir, lambda r: r["episodes_total"] != episodes
                        or tuple(sorted(r["setting"].items())) not in done)
    return out


def _bc_reference(bc_dir: str, run: Run, episodes: int) -> dict:
    """One `trajformer bc` directory's evaluation, checked to be on this protocol: the run's dataset and episode
    split, as many episodes from seed 0, full length. Returns its training seed, mean return and standard error."""
    bc_json = Path(bc_dir) / "bc.json"
    if not bc_json.is_file() or "evaluation" not in (bc := load_json(bc_json, f"train BC again into {bc_dir}")):
        raise FileNotFoundError(f"{bc_dir} holds no evaluated BC (bc.json with an evaluation); make one with "
                                f"`trajformer bc CONFIG --episodes {episodes} --out {bc_dir}`")
    used = bc["evaluation"]["config"]
    if used["episodes"] != episodes:
        raise ValueError(f"{bc_dir} was evaluated on {used['episodes']} episodes, not "
                         f"{episodes}; re-run `trajformer bc` with --episodes {episodes}")
    other = [what for what, differs in (
        (f"trained on {bc.get('dataset_id')}, the run on {run.meta.get('dataset_id')}",
         bc.get("dataset_id") != run.meta.get("dataset_id")),
        (f"its episode split is {describe_split(bc['split'])}, the run's {describe_split(run.meta['split'])}",
         not same_split(bc["split"], run.meta["split"])),
        (f"episodes cut at {used.get('max_steps')} steps", used.get("max_steps") is not None),
        (f"seeds from {used.get('seed')}, not 0", used.get("seed", 0) != 0)) if differs]
    if other:
        raise ValueError(f"{bc_dir} is not BC on this protocol ({'; '.join(other)}); re-run `trajformer bc` on "
                         f"the run's dataset and split (its config) with --episodes {episodes}, full episodes and "
                         "seed 0")
    return {"seed": bc["config"]["seed"], "mean_return": bc["evaluation"]["mean_return"],
            "stderr": bc["evaluation"]["stderr"]}


def _kept_settings(record: dict, episodes: int, weights: str) -> dict:
    """The settings of an eval.json `record` evaluated on `episodes` episodes with the weights of this digest."""
    return {name: r for name, r in record.get("settings", {}).items()
            if record.get("episodes") == episodes and r.get("model_sha256") == weights}


def _rescored(row: dict, run: Run) -> dict:
    """An eval.json row normalised with today's reference (metrics.score_reference) from its returns: rows written
    before 2026-12-07 were normalised by the env family alone, whatever the env's kwargs or time limit."""
    env_id, kwargs, limit = env_settings(run)
    reference, label = score_reference(env_id, run.meta, kwargs, limit)
    scored = summarize(row["returns"], row.get("lengths") or [], reference)
    return {**row, "normalized_score": scored["normalized_score"], "normalized_stderr": scored["normalized_stderr"],
            "score_reference": label}


def _upgrade_partial(run: Run, weights: str) -> None:
    """eval.partial.json's entries written before 2026-12-07 name no weights, and their setting took k_obs and
    plan_freq from the run's [plan]: completed as that code planned them (with model.pt's weights, which it did not
    check), so the evaluation goes on from them and replaces them when it finishes."""
    run_dir = Path(run.path)
    with file_lock(run_dir / ".eval.lock"):
        runs = _partial_runs(run_dir)
        old = [r for r in runs if "model_sha256" not in r]
        for r in old:
            r["model_sha256"] = weights
            r["setting"] = {**r["setting"], "k_obs": run.config.plan.k_obs, "plan_freq": run.config.plan.plan_freq}
        if old:
            save_json(run_dir / "eval.partial.json", {"runs": runs})
            print(f"{run_dir / 'eval.partial.json'}: {len(old)} entries written before entries named their weights "
                  "are taken as model.pt's", flush=True)


def _identity(setting: dict, plan_cfg: PlanConfig, episodes: int, weights: str) -> dict:
    """What names one setting's runs in eval.partial.json. Episodes planned in another dtype, or with other weights
    (model.pt replaced between a stop and the rerun), are not mixed in: the same search, but not the same plans."""
    return {"setting": setting, "dtype": plan_cfg.dtype, "episodes_total": episodes, "model_sha256": weights}


def _partial_runs(run_dir: Path) -> list[dict]:
    """The runs eval.partial.json holds (none if it is missing)."""
    path = run_dir / "eval.partial.json"
    if not path.is_file():
        return []
    return load_json(path, "delete it: the episodes it held under way are then planned from their start")["runs"]


def _update_partial(run_dir: Path, keep: Callable[[dict], bool], add: dict | None = None) -> None:
    """Write back eval.partial.json's runs that `keep` accepts, plus `add` (the file removed when none is left).
    Callers hold the run directory's .eval.lock, so concurrent evaluations of other settings never overwrite
    each other's entries."""
    runs = [r for r in _partial_runs(run_dir) if keep(r)] + ([add] if add is not None else [])
    if runs:
        save_json(run_dir / "eval.partial.json", {"runs": runs})
    else:
        (run_dir / "eval.partial.json").unlink(missing_ok=True)


def _resumable_setting(run: Run, plan_cfg: PlanConfig, identity: dict, num_envs: int, progress: bool,
                       workers: int = 1) -> dict:
    """One setting of the protocol: the episodes eval.partial.json already holds for it are kept, the others are
    planned, each written to eval.partial.json as it ends, and the episodes under way every minute and at a stop
    (their actions, the planner's slots), so a rerun goes on mid-episode. Returns the setting's eval.json entry."""
    setting, episodes = identity["setting"], identity["episodes_total"]
    run_dir = Path(run.path)

    def mine(r: dict) -> bool:
        return {k: r.get(k) for k in identity} == identity

    with file_lock(run_dir / ".eval.lock"):
        partial = _partial_runs(run_dir)
    entry = next((r for r in partial if mine(r)), None)
    if entry is None:
        entry = {**identity, "episodes": {}, "steps": 0, "seconds": 0.0}
        for other in partial:  # the same setting under way in another dtype or with other weights: say so
            if other["setting"] == setting and other["episodes_total"] == episodes:
                if other.get("model_sha256") != identity["model_sha256"]:
                    print(f"{run_dir / 'eval.partial.json'} holds this setting under way with other weights than "
                          f"model.pt's ({other['steps']:,} env steps): this run starts over and replaces it when it "
                          "finishes", flush=True)
                else:
                    print(f"{run_dir / 'eval.partial.json'} holds this setting under way in {other['dtype']} "
                          f"({other['steps']:,} env steps): --set plan.dtype={other['dtype']} resumes it; this run, "
                          f"in {plan_cfg.dtype}, starts over and replaces it when it finishes", flush=True)
    elif entry["episodes"]:
        print(f"resuming beam {setting['beam_width']} / horizon {setting['horizon']}: {len(entry['episodes'])} of "
              f"{episodes} episodes kept from {run_dir / 'eval.partial.json'}", flush=True)
    steps0, seconds0, kept = entry["steps"], entry["seconds"], dict(entry["episodes"])
    resume = [r for r in entry.get("in_progress", []) if str(r["episode"]) not in kept]
    if resume:
        print(f"resuming {len(resume)} episodes mid-way ({', '.join(str(len(r['actions'])) for r in resume)} steps "
              "done)", flush=True)

    def saved(state: dict) -> None:
        entry["episodes"] = {**kept, **state["finished"]}
        entry["in_progress"] = state["in_progress"]
        entry["steps"], entry["seconds"] = steps0 + state["steps"], seconds0 + state["seconds"]
        with file_lock(run_dir / ".eval.lock"):
            _update_partial(run_dir, lambda r: not mine(r), entry)

    if len(kept) < episodes:
        try:
            run_setting = evaluate if workers == 1 else functools.partial(_evaluate_in_workers, workers=workers)
            run_setting(run, plan_cfg, episodes=episodes, num_envs=num_envs, progress=progress,
                        skip=frozenset(int(e) for e in kept), resume=resume, on_progress=saved)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`kill`, a time limit): say what was kept and how to go on
            raise KeyboardInterrupt(
                f"interrupted; {len(entry['episodes'])} finished episodes and the episodes under way as of "
                f"{entry['steps']:,} env steps are kept in {run_dir / 'eval.partial.json'}: the same command goes "
                "on where they stopped") from None
        entry.pop("in_progress", None)
    results = {int(e): tuple(r) for e, r in entry["episodes"].items()}
    env_id, kwargs, limit = env_settings(run)
    record = episode_record(results, entry["steps"], entry["seconds"], env_id, run.meta, kwargs, limit)
    return {**{k: record[k] for k in ("returns", "lengths", "mean_return", "stderr", "normalized_score",
                                      "normalized_stderr", "score_reference", "seconds_per_step")},
            "plan": dataclasses.asdict(plan_cfg)}


def _deal(todo: list[int], steps_done: dict[int, int], workers: int, limit: int | None,
          num_envs: int) -> list[list[int]]:
    """The episodes `todo` dealt to at most `workers` groups of about equal steps left (a search's cost grows with
    the envs it plans for, so a worker's time goes with the env steps it has left): longest first, each to the
    least loaded group. Unstarted episodes alone are dealt round-robin, and so are all without a time limit.
    Episodes under way (`steps_done`) start at once in their worker's envs, so a group takes no more of them than
    its share of `num_envs` (or of the episodes under way, when there are more)."""
    left = {e: limit - steps_done.get(e, 0) if limit else 1 for e in todo}
    groups: list[list[int]] = [[] for _ in range(min(workers, len(todo)))]
    load, under_way = [0] * len(groups), [0] * len(groups)
    cap = -(-max(num_envs, len(steps_done)) // len(groups))
    for e in sorted(todo, key=lambda e: (-left[e], e)):
        open_ = [w for w in range(len(groups)) if e not in steps_done or under_way[w] < cap]
        w = min(open_, key=lambda w: (load[w], w))
        groups[w].append(e)
        load[w] += left[e]
        under_way[w] += e in steps_done
    return [sorted(group) for group in groups]


def _merge(base: dict, states: list[dict]) -> dict:
    """One state of run_episodes' form from the earlier deals' `base` and the workers' latest `states`."""
    return {"finished": {**base["finished"], **{e: r for s in states for e, r in s["finished"].items()}},
            "in_progress": [r for s in states for r in s["in_progress"]],
            "steps": base["steps"] + sum(s["steps"] for s in states),
            "seconds": base["seconds"] + sum(s["seconds"] for s in states)}


# A new deal restarts the workers (imports, the model, the envs replayed to their step): a few seconds each. Deal
# again only when the idle worker would take over more than this many seconds of another's work.
REDEAL_SECONDS = 30.0


def _worth_a_deal(groups: list[list[int]], latest: list[dict], running: set[int], limit: int | None) -> bool:
    """Whether a worker that ran out of episodes should take over some of the running workers': one of them holds
    two or more, and half its steps left take more than REDEAL_SECONDS at the seconds per env step so far (when
    the env has a time limit to count steps left by)."""
    steps = sum(s["steps"] for s in latest)
    per_step = sum(s["seconds"] for s in latest) / steps if steps else 0.0
    for v in running:
        done = {r["episode"]: len(r["actions"]) for r in latest[v]["in_progress"]}
        left = [e for e in groups[v] if str(e) not in latest[v]["finished"]]
        if len(left) >= 2 and (not limit or sum(limit - done.get(e, 0) for e in left) / 2 * per_step > REDEAL_SECONDS):
            return True
    return False


def _evaluate_in_workers(run: Run, plan_cfg: PlanConfig, episodes: int, num_envs: int, progress: bool,
                         skip: frozenset[int], resume: list[dict], on_progress: Callable[[dict], None],
                         workers: int) -> None:
    """`evaluate` with the episodes dealt to `workers` processes, each with its own envs, planner and threads
    (plan.num_threads, by default the cores shared out): a search's per-token overhead runs on one core however
    many threads a process has, so N one-thread processes outrun one N-thread process. The workers' reports are
    merged into one state for `on_progress` (this process alone writes eval.partial.json). When a worker runs out
    of episodes while another still holds two or more (episodes that end early leave a worker idle), all save
    their episodes under way and the episodes left are dealt again. Episode e is seeded with e whichever worker
    plays it, so the episodes are those of one process up to the float rounding of other batch sizes (equal in
    float32 in tests). Seconds are summed over the workers. Ctrl-C (or SIGTERM) asks the workers to stop the same
    way, so the episodes under way are saved as of their last env step; a second one stops at once."""
    env_id, _, limit = env_settings(run)
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's OpenMP and torch state
    # What the deals so far leave: finished episodes, episodes under way, env steps and seconds.
    state = {"finished": {}, "in_progress": list(resume), "steps": 0, "seconds": 0.0}
    done_before = sum(len(r["actions"]) for r in resume)
    todo = [e for e in range(episodes) if e not in skip]
    bar = tqdm(total=len(todo) * limit if limit else None, initial=done_before, unit="step",
               desc=f"plan {env_id} ({workers} workers)", disable=None if progress else True)
    try:
        with stop_requests() as asked:
            while todo := [e for e in todo if str(e) not in state["finished"]]:
                if asked.is_set():
                    raise KeyboardInterrupt
                resumed = {r["episode"]: r for r in state["in_progress"]}
                groups = _deal(todo, {e: len(r["actions"]) for e, r in resumed.items()}, workers, limit, num_envs)
                given = [[resumed[e] for e in group if e in resumed] for group in groups]
                cfg = dataclasses.replace(plan_cfg, num_threads=plan_cfg.num_threads
                                          or max(1, (os.cpu_count() or 1) // len(groups)))
                reports = context.Queue()  # one per deal: a worker stopped mid-write cannot leave the next its lock
                stops = [context.Event() for _ in groups]
                procs = [context.Process(target=_worker, daemon=True, args=(
                    w, reports, str(run.path), cfg, gym.spec(env_id), episodes, -(-num_envs // len(groups)),
                    frozenset(range(episodes)) - set(group), given[w], stops[w], os.getpid()))
                    for w, group in enumerate(groups)]
                state = _play_deal(procs, reports, stops, groups, given, state, limit, on_progress, asked,
                                   lambda s: bar.update(done_before + s["steps"] - bar.n))
    finally:
        bar.close()


def _play_deal(procs: list, reports, stops: list, groups: list[list[int]], given: list[list[dict]], base: dict,
               limit: int | None, on_progress: Callable[[dict], None], asked: threading.Event,
               tick: Callable[[dict], None]) -> dict:
    """Run one deal's workers (`groups` of episodes, `given` the ones under way) to their end, their reports merged
    with `base` into one state for `on_progress` (returned). When a worker runs out of episodes while another
    holds two or more, all are stopped (the caller deals again). A stop `asked` for (Ctrl-C, SIGTERM) is passed on
    the same way: each worker saves its episodes under way after the env step it is planning, so nothing since its
    last report is lost; then KeyboardInterrupt."""
    # Until a worker reports, its episodes stand as they were given (an interruption then keeps them so).
    latest = [{"finished": {}, "in_progress": resumed, "steps": 0, "seconds": 0.0} for resumed in given]
    state, running, idle, stopping = base, set(range(len(procs))), False, False
    try:
        _start_without_sigint(procs)  # Ctrl-C reaches the workers too (one process group)
        while running:
            if asked.is_set() and not stopping:
                stopping = True
                for stop in stops:
                    stop.set()
                tqdm.write("stopping: each worker saves its episodes under way after its current env step; "
                           "Ctrl-C again stops now (keeping the state of the last save)")
            try:
                w, report = reports.get(timeout=1.0)
            except queue.Empty:
                for v in list(running):
                    if not procs[v].is_alive() and reports.empty():
                        if stopping:  # killed with the parent (a signal to the process group, in its imports)
                            running.discard(v)
                            continue
                        raise ChildProcessError(f"evaluation worker {v} died (exit code {procs[v].exitcode}, "
                                                "killed for memory?) without a report; the same command goes on "
                                                "from the last saved state") from None
                continue
            if isinstance(report, str):
                raise ValueError(f"evaluation worker {w}: {report}")
            if report is None:
                running.discard(w)
                idle = True
            else:
                latest[w] = report
                state = _merge(base, latest)
                on_progress(state)
                tick(state)
            # A worker ran out: once the reports sent so far are read, deal again if it is worth it.
            if idle and reports.empty() and not any(stop.is_set() for stop in stops):
                idle = False
                if _worth_a_deal(groups, latest, running, limit):
                    tqdm.write(f"worker {w} is out of episodes while others hold two or more: they save the "
                               "episodes under way, and the episodes left are dealt again")
                    for v in running:
                        stops[v].set()
        if stopping:
            raise KeyboardInterrupt
        return state
    except KeyboardInterrupt:
        on_progress(_merge(base, latest))  # a second Ctrl-C may have cut a save short
        raise
    finally:
        for proc in procs:
            if proc.pid is not None:  # started
                proc.join(timeout=10.0 if not running else 0)
                if proc.is_alive():
                    proc.kill()  # not terminate: a worker saves and stops on SIGTERM, after a whole search
                    proc.join()


def _start_without_sigint(procs: list) -> None:
    """Start the processes ignoring SIGINT from their first instruction (an ignored signal stays ignored through
    exec, and Python then installs no KeyboardInterrupt handler): a Ctrl-C during their imports would print their
    tracebacks. The parent ignores it only while it starts them (milliseconds)."""
    held = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if held else None
    try:
        for proc in procs:
            proc.start()
    finally:
        if held:
            signal.signal(signal.SIGINT, old)


def _worker(w: int, reports, run_dir: str, plan_cfg: PlanConfig, spec: gym.envs.registration.EnvSpec,
            episodes: int, num_envs: int, skip: frozenset[int], resume: list[dict], stop, parent: int) -> None:
    """One evaluation worker: its episodes' states go to `reports` as (w, state), then (w, None) when done or
    stopped (the `stop` event set: its last state holds the episodes under way), or (w, message) on an error.
    Ctrl-C is left to the parent, which sets `stop`; SIGTERM (sent to the process group by a time limit) stops it
    the same way, and a worker whose parent (pid `parent`) was killed outright exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as it started (_start_without_sigint)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())

    def stopped() -> bool:
        if os.getppid() != parent:  # the parent was killed outright: nobody reads the reports any more
            os._exit(1)
        return stop.is_set() or terminated.is_set()

    # tqdm's default lock is a multiprocessing RLock, a named semaphore that a worker stopped by the parent would
    # leave behind ("leaked semaphore objects" at exit); this worker's bars are off, a thread lock does.
    tqdm.set_lock(threading.RLock())
    try:
        gym.registry.setdefault(spec.id, spec)  # an env registered at run time in the parent (a user's own)
        with contextlib.suppress(EvaluationStopped):
            evaluate(load_run(run_dir), plan_cfg, episodes=episodes, num_envs=num_envs, progress=False, skip=skip,
                     resume=resume, on_progress=lambda state: reports.put((w, state)), stop=stopped)
        stopped()  # an orphan exits here too: at exit it would wait for ever to flush reports nobody reads
        reports.put((w, None))
    except Exception as err:  # noqa: BLE001 -- the parent raises it with the worker's name
        reports.put((w, f"{type(err).__name__}: {err}"))
