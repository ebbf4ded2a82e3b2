"""Make local Minari datasets offline: shipped SAC behaviour policies rolled out in vectorised envs.

`collect(...)` rolls out a policy (uniform random, or a shipped actor from pretrained/behavior/) and writes
the episodes with `minari.create_dataset_from_buffers`; `collect_preset(name)` makes the named datasets
(hopper-medium, halfcheetah-medium-expert, ...) the way D4RL made its own, from a fixed seed.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import torch
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path
from tqdm import tqdm

from trajformer.behavior import Policy, episode_returns, load_behavior_policy, one_thread
from trajformer.files import file_lock, set_aside, writing_mark
from trajformer.metrics import D4RL_REFERENCE, env_family

HUMANOID_45 = {f"include_{k}_in_observation": False for k in ("cinert", "cvel", "qfrc_actuator", "cfrc_ext")}
"""Humanoid-v5 observation trimmed to qpos[2:] + qvel (45 dims), as the shipped humanoid actors expect."""


def random_policy(space: gym.spaces.Box, rng: np.random.Generator) -> Policy:
    """Uniform actions within the bounds: the reference 'random' behaviour (and ref_min_score)."""
    return lambda obs: rng.uniform(space.low, space.high, (len(obs), *space.shape)).astype(space.dtype)


def _rollouts(make_env: Callable[[], gym.Env], policy: Policy, steps: int, seed: int, num_envs: int,
              action_noise: float, rng: np.random.Generator, bar: tqdm) -> tuple[list[dict], list[bool]]:
    """Run `steps` transitions over a same-step-autoreset vector env; episodes end exactly where they end.

    Returns the episodes in the order they finished and, per episode, whether it was cut by the step
    budget (then its last step is marked truncated) rather than ended by the env.
    """
    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    space = envs.single_action_space
    quota = [steps // num_envs + (i < steps % num_envs) for i in range(num_envs)]
    obs, _ = envs.reset(seed=[seed + i for i in range(num_envs)])
    current = [{"observations": [o], "actions": [], "rewards": [], "terminations": [], "truncations": []}
               for o in obs]
    episodes, cut = [], []
    while any(q > 0 for q in quota):
        actions = policy(obs)
        if action_noise > 0:
            actions = actions + action_noise * 0.5 * (space.high - space.low) * rng.standard_normal(actions.shape)
        actions = np.clip(actions, space.low, space.high).astype(space.dtype)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        for i, ep in enumerate(current):
            if quota[i] == 0:
                continue
            done = bool(terminated[i] or truncated[i])
            ep["actions"].append(actions[i])
            ep["rewards"].append(float(rewards[i]))
            ep["terminations"].append(bool(terminated[i]))
            ep["truncations"].append(bool(truncated[i]))
            ep["observations"].append(info["final_obs"][i] if done else obs[i])
            quota[i] -= 1
            bar.update()
            if done or quota[i] == 0:
                if not done:  # cut by the step budget: a truncation, not an end of the task
                    ep["truncations"][-1] = True
                cut.append(not done)
                episodes.append(ep)
                current[i] = {"observations": [obs[i]], "actions": [], "rewards": [], "terminations": [],
                              "truncations": []}
    envs.close()
    return episodes, cut


def _check_env(env_id: str, env_kwargs: dict, max_episode_steps: int | None) -> gym.Env:
    """Make the env, turning the ways it can be wrong into one-line errors that say the fix."""
    try:
        gym.spec(env_id)
    except gym.error.Error:
        raise ValueError(f"unknown env id {env_id!r}: pass a registered Gymnasium id such as Hopper-v5 "
                         "(gymnasium.pprint_registry() lists them)") from None
    if max_episode_steps is not None and max_episode_steps < 1:
        raise ValueError(f"--max-episode-steps must be >= 1, got {max_episode_steps}; or leave it out for the env's "
                         "own time limit")

    def rejected(err: Exception) -> ValueError:
        return ValueError(f"env kwargs {json.dumps(env_kwargs)} rejected by {env_id} ({type(err).__name__}: {err}): "
                          "fix --env-kwargs")

    try:
        env = gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise rejected(err) from None
    for name, space in (("action", env.action_space), ("observation", env.observation_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"{env_id} has a {type(space).__name__} {name} space: trajformer collects "
                             "envs with flat Box observations and actions only (e.g. Hopper-v5)")
    if not (np.isfinite(env.action_space.low).all() and np.isfinite(env.action_space.high).all()):
        raise ValueError(f"{env_id} has unbounded actions: random actions, action noise (in half action ranges) "
                         "and the behaviour policies need finite bounds; wrap the env in gymnasium's ClipAction")
    try:  # a value the env is made with but cannot run with (frame_skip 0) fails here, not mid-collection
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except (TypeError, ValueError, ArithmeticError) as err:
        raise rejected(err) from None
    return env


def _check_dataset_id(dataset_id: str) -> None:
    """Refuse a malformed id."""
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # TypeError: no -vN version
        raise ValueError(f"bad dataset id {dataset_id!r}: use NAMESPACE/NAME-vVERSION, "
                         "e.g. mine/hopper-random-v0") from None


_HELD: set[str] = set()  # the dataset ids this process holds (_writing)


def _deleting(path: Path) -> Path:
    """Where an old copy goes once the new one is whole, to be deleted (never put back from there)."""
    return path.with_name(f".{path.name}.deleting")


def _put_back(path: Path, aside: Path) -> None:
    """The old copy set aside back in place of a new one that may be partial."""
    if path.exists():
        shutil.rmtree(path)
    aside.rename(path)


@contextmanager
def _writing(dataset_id: str) -> Iterator[Path]:
    """Hold `dataset_id` while this process checks and writes it: another `trajformer collect` of it is refused
    (rather than one putting back or deleting what the other is writing), and a copy that a killed --overwrite left
    aside is put back first. Re-entrant within a process; yields the dataset's path."""
    path = get_dataset_path(dataset_id)
    if dataset_id in _HELD:
        yield path
        return
    lock = get_dataset_path() / f".lock-{dataset_id.replace('/', '--')}"  # a hidden file: Minari lists dirs only
    with file_lock(lock, wait=False) as held:
        if not held:
            raise ValueError(f"dataset {dataset_id} is being written by another trajformer collect (it holds "
                               f"{lock}); wait for it to finish")
        _HELD.add(dataset_id)
        try:
            aside, gone, mark = set_aside(path), _deleting(path), writing_mark(path)
            if gone.exists():  # an old copy whose deletion was cut short
                shutil.rmtree(gone)
            if aside.exists():  # a replace killed outright: its new copy may be partial, the old one is whole
                _put_back(path, aside)
                print(f"{dataset_id}: put back the copy that a killed --overwrite had moved aside to {aside}")
            elif mark.exists() and path.exists():  # a new dataset's write killed outright: what it left is partial
                shutil.rmtree(path)
                print(f"{dataset_id}: removed the partial copy that a killed collect had left in {path}")
            mark.unlink(missing_ok=True)
            yield path
        finally:
            _HELD.discard(dataset_id)


@contextmanager
def _replacing(dataset_id: str) -> Iterator[None]:
    """Write `dataset_id` (held with _writing) whole or not at all: an old copy is moved aside (a hidden sibling,
    which Minari's listing skips) and deleted only once the new one is written; an error or Ctrl-C puts it back (or
    removes a new dataset's partial copy), and after a kill (SIGKILL, power) the next _writing of the id does."""
    path = get_dataset_path(dataset_id)
    aside, mark = set_aside(path), writing_mark(path)
    if path.exists():
        path.rename(aside)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()  # until the new copy is whole (an old one is aside first): a kill leaves it for _writing to clean
    try:
        yield
    except BaseException:
        if aside.exists():
            _put_back(path, aside)
        elif path.exists():
            shutil.rmtree(path)
        mark.unlink(missing_ok=True)
        raise
    mark.unlink()
    if aside.exists():
        aside.rename(gone := _deleting(path))  # atomic: from here on the old copy is never put back, only deleted
        shutil.rmtree(gone)


def collect(env_id: str, policy: str | Path | list[str] = "random", steps: int = 1_000_000,
            dataset_id: str = "trajformer/collected-v0", seed: int = 0, action_noise: float = 0.0,
            env_kwargs: dict | None = None, overwrite: bool = False, deterministic: bool = False,
            max_episode_steps: int | None = None, num_envs: int = 16, description: str | None = None,
            metadata: dict | None = None) -> minari.MinariDataset:
    """Roll out `policy` ('random', a .pt path or shipped name, or a list of them sharing the steps
    equally) for `steps` transitions and write them as the local Minari dataset `dataset_id`.

    Every input is checked before any rollout, and nothing is written when one is wrong.
    """
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise ValueError(f"--env-kwargs {json.dumps(env_kwargs)} is not a JSON object; pass e.g. "
                         "'{\"ctrl_cost_weight\": 0.1}'")
    env_kwargs = dict(env_kwargs or {})
    if steps <= 0 or num_envs <= 0:
        raise ValueError(f"--steps {steps} / --num-envs {num_envs}: both must be positive integers")
    if not action_noise >= 0 or not np.isfinite(action_noise):
        raise ValueError(f"--action-noise {action_noise}: pass a finite standard deviation >= 0")
    if seed < 0:
        raise ValueError(f"--seed {seed}: pass a seed >= 0")
    _check_dataset_id(dataset_id)
    with _writing(dataset_id) as path:
        if path.exists() and not overwrite:
            raise FileExistsError(f"dataset {dataset_id} already exists at {path}: pass --overwrite to replace it "
                                  "or choose another --dataset-id")
        env = _check_env(env_id, env_kwargs, max_episode_steps)
        names = [str(policy)] if isinstance(policy, str | Path) else list(policy)
        behaviors = [None if name == "random" else load_behavior_policy(name) for name in names]
        dims = (env.observation_space.shape[0], env.action_space.shape[0])
        for bp in filter(None, behaviors):
            if (bp.card["obs_dim"], bp.card["act_dim"]) != dims or bp.card["env_id"] != env_id:
                raise ValueError(f"policy {bp.name} is for {bp.card['env_id']} with obs/act dims "
                                 f"{(bp.card['obs_dim'], bp.card['act_dim'])}, but {env_id} "
                                 f"{json.dumps(env_kwargs)} has {dims}: pass a policy trained on this env "
                                 "(and its observation kwargs) or --policy random")

        def make_env() -> gym.Env:
            return gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)

        rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        episodes, cut = [], []
        start = time.perf_counter()
        with tqdm(total=steps, desc=f"collect {dataset_id}", unit="step", smoothing=0.1,
                  disable=None) as bar, one_thread():
            for j, bp in enumerate(behaviors):
                share = steps // len(behaviors) + (j < steps % len(behaviors))
                act = random_policy(env.action_space, rng) if bp is None else bp.policy(deterministic, generator)
                eps, c = _rollouts(make_env, act, share, seed + j * num_envs, num_envs, action_noise, rng, bar)
                episodes += eps
                cut += c
        elapsed = time.perf_counter() - start
        print(f"{steps} steps in {elapsed:.1f} s: {steps / elapsed:.0f} steps/s ({num_envs} envs)")

        returns = [sum(ep["rewards"]) for ep, c in zip(episodes, cut, strict=True) if not c]  # complete episodes
        # Its own action stream: the reference is the env's, not the collection's (its size, seed and policy).
        ref_min = float(np.mean(episode_returns(env, random_policy(env.action_space, np.random.default_rng(10_000)),
                                                10)))
        # D4RL v2's expert return as ref_max_score (D4RL measured it on the v2 envs); scores use
        # metrics.score_reference.
        family = env_family(env_id)
        ref_max = D4RL_REFERENCE[family][1] if family in D4RL_REFERENCE and not env_kwargs and \
            max_episode_steps in (None, 1000) else None  # D4RL's expert return: the default env's 1000-step episodes
        buffers = [EpisodeBuffer(id=k, observations=np.array(ep["observations"]), actions=np.array(ep["actions"]),
                                 rewards=np.array(ep["rewards"]), terminations=np.array(ep["terminations"]),
                                 truncations=np.array(ep["truncations"]))
                   for k, ep in enumerate(episodes)]
        mode = "deterministic (tanh of the mean)" if deterministic else "stochastic (sampled from the SAC Gaussian)"
        description = description or (
            f"{steps} transitions of {env_id} {json.dumps(env_kwargs)} from behaviour policy {', '.join(names)}"
            + ("" if names == ["random"] else f", {mode} actions")
            + (f", Gaussian action noise {action_noise} x half the action range" if action_noise else "")
            + f"; seed {seed}, {num_envs} vectorised envs. Episodes end at terminations and time-limit "
            "truncations; the last episode of each env is cut (truncated) where the step budget ran out.")
        with _replacing(dataset_id):  # an existing one (only with overwrite=True) goes once the new one is whole
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(code_permalink|author_email).*")
                dataset = minari.create_dataset_from_buffers(
                    dataset_id, buffers, env=env, eval_env=env.spec, algorithm_name="trajformer collect",
                    author="trajformer", ref_min_score=ref_min, ref_max_score=ref_max, description=description)
            dataset.storage.update_metadata({
                "behavior_policy": names,
                "behavior_policy_eval_return": [None if bp is None else bp.card["eval_return_mean"]
                                                for bp in behaviors],
                "deterministic": deterministic,
                "action_noise": action_noise,
                "env_kwargs": env_kwargs,
                "seed": seed,
                "num_envs": num_envs,
                "steps": steps,
                # Over complete episodes; None when the step budget cut every episode.
                "return_mean": float(np.mean(returns)) if returns else None,
                "return_std": float(np.std(returns)) if returns else None,
                "ref_min_score": ref_min,
                "num_episodes_average_score": 10,
                "ref_min_score_protocol": "uniform random policy (actions from np.random.default_rng(10_000)), 10 "
                                           "episodes, env.reset(seed=10_000 + i)",
                **(metadata or {}),
            })
        env.close()
        return minari.load_dataset(dataset_id)


@dataclass(frozen=True)
class Preset:
    """A named dataset: env, behaviour policies sharing the steps equally, and why it is made this way."""

    env_id: str
    policies: tuple[str, ...]
    description: str
    env_kwargs: tuple[tuple[str, bool], ...] = ()
    combine: tuple[str, ...] = ()  # presets merged with minari.combine_datasets instead of collecting


STOCHASTIC = ("Actions are sampled from the SAC Gaussian (tanh-squashed), not its mean, so the data covers "
              "more than the one deterministic trajectory per start state.")


def _replay(env_id: str, prefix: str, medium_k: int) -> Preset:
    """The D4RL medium-replay analogue: every shipped checkpoint, 25k steps apart, up to the medium one."""
    names = tuple(f"{prefix}-sac-{k:04d}k" for k in range(25, medium_k + 1, 25))
    return Preset(env_id, names, "D4RL medium-replay analogue: equal numbers of transitions rolled out by "
                  f"every shipped SAC checkpoint, {names[0]} up to the medium one, {names[-1]}. {STOCHASTIC}")


PRESETS = {
    "hopper-medium": Preset("Hopper-v5", ("hopper-sac-0175k",),
                            f"D4RL-style hopper-medium: SAC checkpoint hopper-sac-0175k. {STOCHASTIC}"),
    "hopper-replay": _replay("Hopper-v5", "hopper", 175),
    "halfcheetah-medium": Preset("HalfCheetah-v5", ("halfcheetah-sac-0050k",),
                                 f"D4RL-style halfcheetah-medium: SAC checkpoint halfcheetah-sac-0050k. "
                                 f"{STOCHASTIC}"),
    "halfcheetah-replay": _replay("HalfCheetah-v5", "halfcheetah", 50),
    "halfcheetah-expert": Preset("HalfCheetah-v5", ("halfcheetah-sac-0250k",),
                                 "Expert-ish halfcheetah: SAC checkpoint halfcheetah-sac-0250k (~7.5k return, "
                                 f"below D4RL's 10.6k expert). {STOCHASTIC}"),
    "halfcheetah-medium-expert": Preset("HalfCheetah-v5", (), "D4RL-style medium-expert: trajformer/"
                                        "halfcheetah-medium-v0 and trajformer/halfcheetah-expert-v0 combined "
                                        "with minari.combine_datasets, --steps transitions each (2x in all, as D4RL).",
                                        combine=("halfcheetah-medium", "halfcheetah-expert")),
    "walker2d-medium": Preset("Walker2d-v5", ("walker2d-sac-0150k",),
                              f"D4RL-style walker2d-medium: SAC checkpoint walker2d-sac-0150k. {STOCHASTIC}"),
    "walker2d-replay": _replay("Walker2d-v5", "walker2d", 150),
    "humanoid-medium": Preset("Humanoid-v5", ("humanoid-sac-0200k",),
                              "Humanoid from SAC checkpoint humanoid-sac-0200k, the best we ship (~600 return, "
                              "it falls after ~100 steps). Collected with terminate_when_unhealthy=False so "
                              "every episode runs the full 1000 steps (the fallen humanoid keeps moving on the "
                              "ground), long enough for 100-step predictions; observations are the 45 dims "
                              f"qpos[2:] + qvel (the four include_*_in_observation=False flags). {STOCHASTIC}",
                              env_kwargs=(("terminate_when_unhealthy", False),
                                          *HUMANOID_45.items())),
}
"""The named datasets `trajformer collect --preset NAME` makes as trajformer/NAME-v0."""


def _made_as(name: str, settings: dict) -> bool:
    """Whether preset NAME's dataset exists and was made with `settings` (its metadata records them)."""
    dataset_id = f"trajformer/{name}-v0"
    if not get_dataset_path(dataset_id).exists():
        return False
    return all(minari.load_dataset(dataset_id).storage.metadata.get(k) == v for k, v in settings.items())


def collect_preset(name: str, steps: int | None = None, seed: int = 0, overwrite: bool = False,
                   num_envs: int = 16) -> minari.MinariDataset:
    """Make (or reuse from MINARI_DATASETS_PATH) the preset dataset trajformer/NAME-v0: same seed, same data."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset, steps = PRESETS[name], 1_000_000 if steps is None else steps
    if steps <= 0 or num_envs <= 0:
        raise ValueError(f"--steps {steps} / --num-envs {num_envs}: both must be positive integers")
    if seed < 0:
        raise ValueError(f"--seed {seed}: pass a seed >= 0")
    dataset_id = f"trajformer/{name}-v0"
    settings = {"preset": name, "steps": steps, "seed": seed, "num_envs": num_envs}  # the data depends on all
    with _writing(dataset_id) as path:
        if path.exists() and not overwrite:
            if _made_as(name, settings):
                print(f"{dataset_id}: cached in {path}")
                return minari.load_dataset(dataset_id)
            raise FileExistsError(f"dataset {dataset_id} exists with other settings than {settings}: "
                                  "pass --overwrite to recollect it")
        if not preset.combine:
            return collect(preset.env_id, list(preset.policies), steps, dataset_id, seed,
                           env_kwargs=dict(preset.env_kwargs), overwrite=overwrite, num_envs=num_envs,
                           description=preset.description, metadata=settings)
        # Parts made with these settings are reused; others are recollected with --overwrite, refused (before any
        # collecting) without it.
        stale = []
        for part in preset.combine:
            with _writing(f"trajformer/{part}-v0") as part_path:
                if part_path.exists() and not _made_as(part, {**settings, "preset": part}):
                    stale.append(part)
        if stale and not overwrite:
            raise FileExistsError(f"dataset trajformer/{stale[0]}-v0 (part of {name}) exists with other settings "
                                  f"than {settings}: pass --overwrite to recollect it")
        parts = [collect_preset(part, steps, seed, part in stale, num_envs) for part in preset.combine]
        with _replacing(dataset_id):
            dataset = minari.combine_datasets(parts, dataset_id)
            dataset.storage.update_metadata({
                "description": preset.description, **settings, "behavior_policy": [
                    p for part in parts for p in part.storage.metadata["behavior_policy"]],
                "return_mean_per_part": [part.storage.metadata["return_mean"] for part in parts],
                **{k: parts[0].storage.metadata[k] for k in ("ref_min_score", "ref_max_score", "env_kwargs")}})
        return minari.load_dataset(dataset_id)
