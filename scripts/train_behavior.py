"""Train a SAC behaviour policy with stable-baselines3 and save its actor every N steps.

Each checkpoint is `<out>/<name>-sac-<steps/1000:04d>k.pt` (the actor's plain state_dict) plus a JSON card
(env, dims, action bounds, deterministic evaluation return), the format of pretrained/behavior/.
Resumable: after every chunk the full training state (networks, optimisers, replay buffer, RNGs, and the
environment mid-episode) is written to `--work-dir` without pickle, and `--resume` continues from it
exactly where it stopped.

    pip install -e ".[behavior]"
    python scripts/train_behavior.py --env Hopper-v5 --steps 300000
    python scripts/train_behavior.py --env Hopper-v5 --steps 300000 --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

from trajformer.collect import HUMANOID_45


@dataclass
class Args:
    env: str
    steps: int
    checkpoint_every: int
    seed: int
    learning_starts: int
    eval_episodes: int
    env_kwargs: dict
    out: Path
    work_dir: Path
    resume: bool


def parse_args() -> Args:
    """Typed command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Hopper-v5", help="Gymnasium env id")
    p.add_argument("--steps", type=int, default=300_000, help="total environment steps")
    p.add_argument("--checkpoint-every", type=int, default=25_000, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-starts", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=5, help="deterministic, env.reset(seed=10_000 + i)")
    p.add_argument("--env-kwargs", type=json.loads, default=None,
                   help="JSON kwargs for gym.make (default: {} or, for Humanoid-v5, the 45-dim obs flags)")
    p.add_argument("--out", type=Path, default=Path("runs/behavior/checkpoints"), help="where .pt/.json go")
    p.add_argument("--work-dir", type=Path, default=None, help="resume state (default runs/behavior/<env>)")
    p.add_argument("--resume", action="store_true", help="continue from the state in --work-dir")
    a = p.parse_args()
    if a.env_kwargs is None:
        a.env_kwargs = HUMANOID_45 if a.env.startswith("Humanoid") else {}
    a.work_dir = a.work_dir or Path("runs/behavior") / a.env
    return Args(**vars(a))


def atomic_write(path: Path, write) -> None:
    """Write through a temp file and os.replace, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def evaluate(model: SAC, args: Args) -> list[float]:
    """Deterministic returns on env.reset(seed=10_000 + i), the protocol of every card."""
    env = gym.make(args.env, **args.env_kwargs)
    returns = []
    for i in range(args.eval_episodes):
        obs, _ = env.reset(seed=10_000 + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def save_checkpoint(model: SAC, args: Args, wall_s: float) -> Path:
    """Write the actor's state_dict and its card (the pretrained/behavior/ format)."""
    steps = model.num_timesteps
    name = f"{args.env.split('-')[0].lower()}-sac-{steps // 1000:04d}k"
    state = {k: v.detach().clone() for k, v in model.actor.state_dict().items()}
    returns = evaluate(model, args)
    space = model.action_space
    card = {
        "env_id": args.env,
        "env_kwargs": args.env_kwargs,
        "steps": steps,
        "eval_return_mean": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_episodes": args.eval_episodes,
        "obs_dim": int(model.observation_space.shape[0]),
        "act_dim": int(space.shape[0]),
        "action_low": space.low.tolist(),
        "action_high": space.high.tolist(),
        "net_arch": [256, 256],
        "activation": "relu",
        "squash": "tanh of mu, then rescale from [-1,1] to [low, high]",
        "state_dict_keys": list(state),
        "trainer": f"stable-baselines3 SAC defaults, learning_starts={args.learning_starts}, seed={args.seed}",
        "wall_s": round(wall_s),
    }
    atomic_write(args.out / f"{name}.pt", lambda p: torch.save(state, p))
    atomic_write(args.out / f"{name}.json", lambda p: p.write_text(json.dumps(card, indent=1)))
    print(f"{name}: eval return {card['eval_return_mean']:.1f} ± {card['eval_return_std']:.1f}", flush=True)
    return args.out / f"{name}.pt"


def _env_parts(model: SAC):
    """The single training env's Monitor, TimeLimit and MuJoCo env inside SB3's DummyVecEnv."""
    monitor = model.env.envs[0]
    time_limit = monitor.env
    while not isinstance(time_limit, gym.wrappers.TimeLimit):
        time_limit = time_limit.env
    return monitor, time_limit, monitor.unwrapped


def save_state(model: SAC, args: Args, wall_s: float) -> None:
    """Everything training needs to continue bit-for-bit, as tensors and arrays (no pickle)."""
    monitor, time_limit, mj_env = _env_parts(model)
    sim = np.empty(mujoco.mj_stateSize(mj_env.model, mujoco.mjtState.mjSTATE_INTEGRATION))
    mujoco.mj_getState(mj_env.model, mj_env.data, sim, mujoco.mjtState.mjSTATE_INTEGRATION)
    np_state = np.random.get_state()
    state = {
        "policy": model.policy.state_dict(),
        "actor_optim": model.actor.optimizer.state_dict(),
        "critic_optim": model.critic.optimizer.state_dict(),
        "log_ent_coef": model.log_ent_coef.detach().clone(),
        "ent_coef_optim": model.ent_coef_optimizer.state_dict(),
        "counters": {"num_timesteps": model.num_timesteps, "n_updates": model._n_updates,
                     "episode_num": model._episode_num, "elapsed_steps": time_limit._elapsed_steps,
                     "wall_s": wall_s},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        # PCG64 state words are 128-bit ints: store them as strings.
        "env_rng": json.dumps(mj_env.np_random.bit_generator.state),
        "sim": torch.from_numpy(sim),
        "last_obs": torch.from_numpy(model._last_obs),
        "episode_rewards": list(map(float, monitor.rewards)),
    }
    buffer = model.replay_buffer
    n = buffer.buffer_size if buffer.full else buffer.pos
    arrays = {k: getattr(buffer, k)[:n] for k in ("observations", "next_observations", "actions", "rewards",
                                                  "dones", "timeouts")}

    def write_buffer(path: Path) -> None:
        with open(path, "wb") as f:  # a file object, so that numpy keeps the .tmp name
            np.savez(f, pos=buffer.pos, full=buffer.full, **arrays)

    atomic_write(args.work_dir / "buffer.npz", write_buffer)
    atomic_write(args.work_dir / "state.pt", lambda p: torch.save(state, p))


def load_state(model: SAC, args: Args) -> float:
    """Restore what save_state wrote into a freshly built model; returns the wall time spent so far."""
    state = torch.load(args.work_dir / "state.pt", weights_only=True)
    model.policy.load_state_dict(state["policy"])
    model.actor.optimizer.load_state_dict(state["actor_optim"])
    model.critic.optimizer.load_state_dict(state["critic_optim"])
    with torch.no_grad():
        model.log_ent_coef.copy_(state["log_ent_coef"])
    model.ent_coef_optimizer.load_state_dict(state["ent_coef_optim"])
    c = state["counters"]
    model.num_timesteps, model._n_updates, model._episode_num = c["num_timesteps"], c["n_updates"], c["episode_num"]
    torch.set_rng_state(state["torch_rng"])
    keys, *rest = state["numpy_rng"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))

    model.env.reset()  # consumes the seed given at construction; the real state is restored below
    monitor, time_limit, mj_env = _env_parts(model)
    mj_env.np_random.bit_generator.state = json.loads(state["env_rng"])
    mujoco.mj_setState(mj_env.model, mj_env.data, state["sim"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    time_limit._elapsed_steps = c["elapsed_steps"]
    monitor.rewards = state["episode_rewards"]
    model._last_obs = state["last_obs"].numpy()
    model._last_episode_starts = np.array([c["elapsed_steps"] == 0])

    with np.load(args.work_dir / "buffer.npz") as f:
        buffer, n = model.replay_buffer, len(f["observations"])
        for k in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            getattr(buffer, k)[:n] = f[k]
        buffer.pos, buffer.full = int(f["pos"]), bool(f["full"])
    print(f"resumed from {args.work_dir} at step {model.num_timesteps}", flush=True)
    return c["wall_s"]


class Checkpoint(BaseCallback):
    """Save the actor every `args.checkpoint_every` steps, from inside the step as SB3 callbacks run.

    At step k the callback sees the actor before that step's gradient update (k - learning_starts - 1
    updates): the shared checkpoints were taken there, and this reproduces them bit for bit.
    """

    def __init__(self, args: Args, wall_s: float):
        super().__init__()
        self.args, self.wall_s, self.start = args, wall_s, time.time()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.args.checkpoint_every == 0:
            save_checkpoint(self.model, self.args, self.wall_s + time.time() - self.start)
        return True


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the recorded setting; it also keeps float results reproducible
    env = gym.make(args.env, **args.env_kwargs)
    model = SAC("MlpPolicy", env, learning_starts=args.learning_starts, seed=args.seed, device="cpu")
    wall_s = load_state(model, args) if args.resume else 0.0
    while model.num_timesteps < args.steps:
        # Learn in chunks that end on checkpoint steps; the full state is saved after each one.
        chunk = min(args.checkpoint_every - model.num_timesteps % args.checkpoint_every,
                    args.steps - model.num_timesteps)
        callback = Checkpoint(args, wall_s)
        model.learn(total_timesteps=chunk, callback=callback, reset_num_timesteps=False)
        wall_s = callback.wall_s + time.time() - callback.start
        save_state(model, args, wall_s)
        print(f"step {model.num_timesteps}: {wall_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
