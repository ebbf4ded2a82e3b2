"""The point-line toy task shared by the rollout and comparison tests: an env, its noisy behaviour policy, the
random policy's returns, and a Minari dataset of 250 episodes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

ENV_ID = "trajformer-test/PointLine-v0"
DATASET_ID = "trajformer-test/pointline-v0"
# The seed of every model the end-to-end score tests train on this task (TT, BC, IQL, ensemble, MOPO/MOReL/COMBO;
# it also draws TT's episode split). 0 in the suite; TRAJFORMER_TEST_SEED=1 (2, ...) re-runs those tests with
# other models, to check that their thresholds are margins and not one model's luck (README).
TRAIN_SEED = int(os.environ.get("TRAJFORMER_TEST_SEED", "0"))


class PointLine(gym.Env):
    """A point on [-1, 1] must reach a goal at -0.5 or +0.5, drawn per episode (so no constant action wins).

    Observation [x, goal], action a in [-1, 1] moves x by 0.1 a, reward -|x - goal|, 20 steps, deterministic.
    Episodes reset with a seed in `ends_early` terminate at step 4 (uneven episodes, as falls make them); one reset
    with seed `kills_at` ends the process at its step 10 (a worker killed from outside, as the OOM killer does).
    With `step_seconds` each step sleeps that long (a slow search), and with `log` it appends "seed step" to that
    file, so a test can see how far the episodes went.
    """

    def __init__(self, ends_early: tuple[int, ...] | list[int] = (), kills_at: int | None = None,
                 step_seconds: float = 0.0, log: str | None = None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.ends_early, self.ends_now, self.t = frozenset(ends_early), False, 0
        self.kills_at, self.killing = kills_at, False
        self.step_seconds, self.log, self.seed = step_seconds, log, None

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.goal], np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.goal, self.x = float(self.np_random.choice([-0.5, 0.5])), 0.0
        self.ends_now, self.t, self.killing = seed in self.ends_early, 0, seed == self.kills_at
        self.seed = seed
        return self._obs(), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.1 * np.clip(action[0], -1.0, 1.0), -1.0, 1.0))
        self.t += 1
        if self.killing and self.t == 10:
            os._exit(9)
        time.sleep(self.step_seconds)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{self.seed} {self.t}\n")
        return self._obs(), -abs(self.x - self.goal), self.ends_now and self.t >= 4, False, {}


gym.register(ENV_ID, entry_point=f"{__name__}:PointLine", max_episode_steps=20)


def behaviour_action(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The data's noisy policy: half the time a random speed towards the goal, else a uniform random action.

    (Purely uniform data would make imitation equal to the random policy, leaving nothing to compare.)
    """
    x, goal = obs
    if rng.random() < 0.5:
        return np.array([np.sign(goal - x) * rng.random()], np.float32)
    return rng.uniform(-1.0, 1.0, 1).astype(np.float32)


def random_returns(episodes: int, seed: int) -> np.ndarray:
    env = gym.make(ENV_ID)
    env.action_space.seed(seed)
    out = []
    for e in range(episodes):
        env.reset(seed=seed + e)
        out.append(sum(env.step(env.action_space.sample())[1] for _ in range(20)))
    return np.array(out)


def make_point_dataset(root: Path) -> None:
    """DATASET_ID in MINARI_DATASETS_PATH (set by the caller to root): 250 episodes of the noisy policy."""
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(0)
    buffers = []
    for e in range(250):
        obs, _ = env.reset(seed=e)
        observations, actions, rewards = [obs], [], []
        for _ in range(20):
            action = behaviour_action(obs, rng)
            obs, reward, *_ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
        buffers.append(EpisodeBuffer(observations=np.array(observations), actions=np.array(actions),
                                     rewards=np.array(rewards), terminations=np.zeros(20, bool),
                                     truncations=np.arange(20) == 19))
    minari.create_dataset_from_buffers(
        DATASET_ID, buffers, env=env, eval_env=env.spec, ref_min_score=-10.0, ref_max_score=-1.0,
        algorithm_name="noisy goal-seeking policy", author="trajformer tests", author_email="none",
        code_permalink="tests/pointline.py", description="point on a line, 250 episodes of the noisy policy")
