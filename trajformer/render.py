"""MuJoCo renders and videos, from observations (never from plans or models).

`PoseRenderer` sets observation sequences into a copy of the simulator: qpos = [x(, y), obs[:nq - skip]] and
qvel = obs[nq - skip : nq - skip + nv], where `skip` (1 for Hopper/HalfCheetah/Walker2d, 2 for Ant and Humanoid)
is detected by comparing a reset observation with the simulator state; x (and y) are integrated from the
velocities and a free root's quaternion is normalised. Dims the model does not see come from a base
observation. Limits: the velocity clipping of some envs is not undone, and envs whose observation does not start
with [qpos[skip:], qvel] cannot be posed. `EpisodeVideo` puts the real episode beside the planned future, with
labelled panels, at the env's real frame rate (or slower).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering; must precede the first mujoco import

from pathlib import Path

import gymnasium as gym
import numpy as np

from trajformer.data import env_kwargs
from trajformer.files import atomic_write, writable_dir


def make_env(env_id: str, kwargs: dict, max_episode_steps: int | None, render: bool = False) -> gym.Env:
    """gym.make with a one-line error for unknown ids; `render` asks for rgb_array frames."""
    try:
        return gym.make(env_id, max_episode_steps=max_episode_steps, **kwargs,
                        **({"render_mode": "rgb_array"} if render else {}))
    except gym.error.Error as err:
        raise ValueError(f"cannot make env {env_id!r} ({err}); pass a registered Gymnasium id with --env") from None


class PoseRenderer:
    """Renders observation sequences of a MuJoCo env (made with render=True) by setting them as its state."""

    def __init__(self, env: gym.Env, obs_indices: np.ndarray):
        self.env, self.obs_indices = env, np.asarray(obs_indices, dtype=np.int64)
        self.skip: int | None = None

    def detect(self, obs: np.ndarray) -> int | None:
        """Find the observation layout from an observation of a freshly reset copy of the same env."""
        sim = self.env.unwrapped
        if not hasattr(sim, "data") or not hasattr(sim, "set_state"):
            return None
        nq, nv = sim.model.nq, sim.model.nv
        for skip in (1, 2, 0):
            n = nq - skip
            if len(obs) >= n + nv and np.allclose(obs[:n], sim.data.qpos[skip:]) and np.allclose(
                    obs[n : n + nv], sim.data.qvel):
                self.skip = skip
                return skip
        return None

    @property
    def covers_pose(self) -> bool:
        """Whether the model's dims hold the whole [qpos[skip:], qvel] block (no base observation needed)."""
        if self.skip is None:
            return False
        sim = self.env.unwrapped
        n = sim.model.nq - self.skip + sim.model.nv
        return bool(np.array_equal(self.obs_indices[:n], np.arange(n)))

    def render(self, states: np.ndarray, base: np.ndarray | None = None, xy: np.ndarray | None = None,
               stop_at_nan: bool = True) -> list[np.ndarray]:
        """Frames of states (H, dS) in the model's dims; other dims from `base` (a raw observation). A non-finite
        state ends the frames (`stop_at_nan`) or renders black."""
        sim = self.env.unwrapped
        nq, nv, skip = sim.model.nq, sim.model.nv, self.skip
        free_root = skip == 2 and int(sim.model.jnt_type[0]) == 0  # mjJNT_FREE: qpos[3:7] is a quaternion
        xy = np.zeros(skip) if xy is None else np.asarray(xy, dtype=np.float64).copy()
        raw = np.zeros(max(int(self.obs_indices.max()) + 1, nq - skip + nv)) if base is None else base
        frames = []
        for state in states:
            if not np.all(np.isfinite(state)):
                if stop_at_nan:
                    break
                frames.append(np.zeros_like(frames[-1]) if frames else np.zeros_like(self.env.render()))
                continue
            full = np.asarray(raw, dtype=np.float64).copy()
            full[self.obs_indices] = state
            qvel = full[nq - skip : nq - skip + nv]
            xy = xy + qvel[:skip] * sim.dt
            qpos = np.concatenate([xy, full[: nq - skip]])
            if free_root:
                qpos[3:7] /= max(np.linalg.norm(qpos[3:7]), 1e-8)
            sim.set_state(qpos, qvel)
            frames.append(self.env.render())
        return frames


def check_rendering(env: gym.Env) -> np.ndarray:
    """Render one frame of `env` (made with render=True) after a reset: a missing or broken offscreen backend
    (MUJOCO_GL) is a one-line ValueError now, not a traceback after the episodes. Returns the reset's observation."""
    try:
        obs, _ = env.reset(seed=0)
        frame = env.render()
    except Exception as err:  # the GL backends fail in many ways (AttributeError, RuntimeError, mujoco.FatalError)
        raise ValueError(f"cannot render {env.spec.id if env.spec else 'the env'} frames offscreen "
                         f"({type(err).__name__}: {err}; MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}); set "
                         "MUJOCO_GL=egl (or osmesa with OSMesa installed), or drop --video") from None
    if frame is None:
        raise ValueError("the env renders no frames (render_mode is not rgb_array); drop --video")
    return obs


def pose_renderer(env_spec: dict, obs_indices: np.ndarray, size: int = 240) -> PoseRenderer | None:
    """A PoseRenderer for a recorded env spec with a low camera tracking the torso, or None when the env cannot
    be made or the model's dims do not hold its [qpos[skip:], qvel] block."""
    if not env_spec.get("id"):
        return None
    kwargs = env_kwargs(env_spec)
    # A camera that tracks the torso from close by, aimed low: fallen humanoids stay in the frame.
    camera = {"trackbodyid": 1, "distance": 3.5, "lookat": np.array([0.0, 0.0, 0.6]), "elevation": -20.0}
    try:
        env = make_env(env_spec["id"], {**kwargs, "width": size, "height": size, "default_camera_config": camera},
                       None, render=True)
    except (ValueError, TypeError):
        return None
    try:
        obs = check_rendering(env)
    except ValueError as err:
        warnings.warn(f"no filmstrip or video: {err}", stacklevel=2)
        env.close()
        return None
    renderer = PoseRenderer(env, obs_indices)
    renderer.detect(obs)
    if not renderer.covers_pose:
        env.close()
        return None
    return renderer


def label(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with `text` written in its top-left corner (white on a dark box)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((4, 4), text)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    return np.asarray(image)


class EpisodeVideo:
    """Frames of a real episode (left, "real") beside the blend of the planned future states (right, "planned")."""

    def __init__(self, real: gym.Env, ghost: gym.Env | None, obs_indices: np.ndarray):
        self.real = real
        self.ghost = PoseRenderer(ghost, obs_indices) if ghost is not None else None
        self.frames: list[np.ndarray] = []

    @property
    def posed(self) -> bool:
        return self.ghost is not None and self.ghost.skip is not None

    def start(self, obs: np.ndarray) -> None:
        """Detect the observation layout after the real env's reset (the ghost copy is reset to match)."""
        if self.ghost is not None:
            self.ghost.env.reset(seed=0)
            sim = self.real.unwrapped
            if hasattr(sim, "data"):
                self.ghost.skip = PoseRenderer(self.real, self.ghost.obs_indices).detect(obs)

    def add(self, obs: np.ndarray, planned: np.ndarray | None, step: int) -> None:
        """One frame: the real env now and, beside it, the blend of the planned states (H, dS) from `obs`."""
        real = label(self.real.render(), f"real  t={step}")
        if not self.posed:
            self.frames.append(real)
            return
        blend = np.zeros_like(real)
        if planned is not None:
            skip = self.ghost.skip
            xy = self.real.unwrapped.data.qpos[:skip]
            frames = self.ghost.render(planned, base=obs, xy=xy)
            if frames:
                blend = np.mean([f.astype(np.float32) for f in frames], axis=0).astype(np.uint8)
        self.frames.append(np.concatenate([real, label(blend, f"planned  {len(planned) if planned is not None else 0}"
                                                                 " steps")], axis=1))

    def save(self, path: str | os.PathLike, fps: float) -> Path:
        """Write the frames (see save_video)."""
        return save_video(self.frames, path, fps)


VIDEO_SUFFIXES = (".mp4", ".gif")


def video_path(path: str | os.PathLike) -> Path:
    """Where a video asked for at `path` is written: an .mp4 through imageio-ffmpeg, or a .gif when that is missing
    (or asked for). Checked before any episode runs: another suffix, or a directory, is a one-line error."""
    path = Path(path)
    if path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--video {path}: name an .mp4 or .gif file, e.g. --video {path.with_suffix('.mp4')}")
    if path.is_dir():
        raise ValueError(f"--video {path} is a directory; name a file in it, e.g. {path / 'episode.mp4'}")
    writable_dir(path.parent, fix="name a --video file in a folder you can write to")
    if path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            return path.with_suffix(".gif")
    return path


def save_video(frames: list[np.ndarray], path: str | os.PathLike, fps: float = 20) -> Path:
    """Write the frames to `video_path(path)` (temp file, then rename); returns that path."""
    import imageio.v2 as imageio

    path = video_path(path)
    if path.suffix == ".gif":
        atomic_write(path, lambda tmp: imageio.mimsave(tmp, frames, duration=1000 / fps, loop=0))
    else:
        atomic_write(path, lambda tmp: imageio.mimsave(tmp, frames, fps=fps, macro_block_size=1))
    return path
