"""Minari datasets → checked episode arrays → joined [s, a, r, V] transitions (DESIGN.md §1).

Loading fails fast with a message that says what to do (missing dataset, non-Box spaces, NaN, bad
observation selection) before any training work starts. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trajformer.config import DataConfig, parse_slice
from trajformer.files import set_aside, writing_mark


@dataclass
class Episode:
    """One episode: obs (T+1, dS) after selection, act (T, dA), rew (T,), terminated/truncated (T,)."""

    obs: np.ndarray
    act: np.ndarray
    rew: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def length(self) -> int:
        return len(self.act)

    @property
    def is_terminal(self) -> bool:
        """True if the episode ended in a real termination (not a time limit)."""
        return bool(self.terminated[-1])


@dataclass
class OfflineData:
    """Episodes plus what is needed to recreate the environment and describe the data."""

    dataset_id: str
    episodes: list[Episode]
    obs_indices: np.ndarray
    raw_obs_dim: int
    env_spec: dict = field(default_factory=dict)
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    sha256: str = ""

    @property
    def obs_dim(self) -> int:
        return len(self.obs_indices)

    @property
    def act_dim(self) -> int:
        return self.episodes[0].act.shape[1]

    @property
    def transition_dim(self) -> int:
        return self.obs_dim + self.act_dim + 2


def datasets_root() -> Path:
    """Where Minari keeps local datasets (MINARI_DATASETS_PATH or ~/.minari/datasets)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def is_local_dataset(dataset_id: str) -> bool:
    """True if the dataset is in MINARI_DATASETS_PATH."""
    from minari.storage.datasets_root_dir import get_dataset_path

    return (Path(get_dataset_path(dataset_id)) / "data").is_dir()


def _hub_address(dataset_id: str = "") -> tuple[str, int]:
    """Where Minari's download would first connect: its remote (the id's own `gcp://` or `hf://` prefix, else
    MINARI_REMOTE, else Hugging Face at HF_ENDPOINT as huggingface_hub reads it), or the proxy the environment sets
    for it (HTTPS_PROXY, ALL_PROXY; NO_PROXY honoured)."""
    remote = dataset_id if "://" in dataset_id else os.environ.get("MINARI_REMOTE") or "hf://"
    url = "https://storage.googleapis.com" if remote.startswith("gcp://") else \
        os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    hub = urllib.parse.urlsplit(url)
    host, port = hub.hostname or "huggingface.co", hub.port or (80 if hub.scheme == "http" else 443)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(hub.scheme or "https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.hostname:
            return via.hostname, via.port or (443 if via.scheme == "https" else 1080 if via.scheme.startswith("socks")
                                              else 80)
    return host, port


def _hub_reachable(dataset_id: str = "", timeout: float = 1.5) -> bool:
    """A quick TCP probe of the dataset hub (or of the proxy to it), so an offline machine fails in seconds, not
    after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or os.environ.get("MINARI_OFFLINE"):
        return False
    try:
        socket.create_connection(_hub_address(dataset_id), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_client_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("huggingface_hub") is not None


def missing_dataset_message(dataset_id: str, reachable: bool = False) -> str:
    """What to do about a dataset that is neither local nor downloadable: the next command to run."""
    if reachable and not _hub_client_installed():
        return (f"dataset '{dataset_id}' is not local and downloading it needs the hub client: "
                f"pip install 'trajformer[hf]' (or make a local one with `trajformer collect --preset NAME`)")
    hub = "" if _hub_client_installed() else "; remote ids also need pip install 'trajformer[hf]' when online"
    return (
        f"dataset '{dataset_id}' is not in MINARI_DATASETS_PATH ({datasets_root()}) and cannot be downloaded "
        f"(offline); make a local one with `trajformer collect --preset hopper-medium` (or `trajformer collect "
        f"ENV_ID --policy random --steps N --dataset-id NAMESPACE/NAME-v0`), or set MINARI_DATASETS_PATH{hub}"
    )


def local_id(dataset_id: str) -> str:
    """The id Minari keeps a dataset under: a remote path's (hf://farama-minari/mujoco/hopper/medium-v0) without its
    remote and repository (mujoco/hopper/medium-v0), as Minari's download stores it."""
    return dataset_id.split("://", 1)[1].split("/", 1)[-1] if "://" in dataset_id else dataset_id


def load_minari(dataset_id: str, download: bool = True):
    """Load a Minari dataset by id (or remote path), downloading remote ones only when the hub is reachable."""
    import minari
    from minari.storage.datasets_root_dir import get_dataset_path

    local = local_id(dataset_id)
    path = Path(get_dataset_path(local))
    if set_aside(path).exists() or writing_mark(path).exists():
        raise ValueError(f"dataset '{local}' is being written by `trajformer collect`, or one was killed mid-write "
                         "(what it left may be partial): wait for it, or run that collect again (it puts an old copy "
                         "back, or removes the partial one, first)")
    if not is_local_dataset(local):
        # Our own ids (`trajformer collect --preset`) are never on the hub: say how to make one, not the hub's error.
        reachable = download and not local.startswith("trajformer/") and _hub_reachable(dataset_id)
        if not reachable or not _hub_client_installed():
            raise FileNotFoundError(missing_dataset_message(dataset_id, reachable))
        from minari.storage.hosting import download_dataset

        download_dataset(dataset_id)  # a remote path names where to download from; Minari keeps it under `local`
    return minari.load_dataset(local)


def select_obs(obs_dims: list[int] | str, raw_obs_dim: int) -> np.ndarray:
    """Indices of the observation dims the model sees ([] = all, a list, or a 'start:stop' slice)."""
    if isinstance(obs_dims, str):
        sl = parse_slice(obs_dims)
        indices = np.arange(raw_obs_dim)[sl]
        if any(end is not None and not -raw_obs_dim <= end <= raw_obs_dim for end in (sl.start, sl.stop)) or (
                sl.start is not None and sl.start == raw_obs_dim):
            raise ValueError(
                f"data.obs_dims = {obs_dims!r} is out of range for {raw_obs_dim}-dim observations; "
                f"use indices below {raw_obs_dim}"
            )
    elif len(obs_dims) == 0:
        indices = np.arange(raw_obs_dim)
    else:
        indices = np.asarray(obs_dims, dtype=np.int64)
        bad = [int(i) for i in indices if i < 0 or i >= raw_obs_dim]
        if bad:
            raise ValueError(
                f"data.obs_dims has indices {bad} out of range for {raw_obs_dim}-dim observations; "
                f"use indices in 0..{raw_obs_dim - 1}"
            )
        if len(set(indices.tolist())) != len(indices):
            raise ValueError("data.obs_dims has repeated indices; list each observation dim once")
    if len(indices) == 0:
        raise ValueError(f"data.obs_dims = {obs_dims!r} selects no observation dims; select at least one")
    return indices


def _check_box(space, what: str, dataset_id: str) -> None:
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(
            f"dataset '{dataset_id}' has a {type(space).__name__}{getattr(space, 'shape', '')} {what} space; "
            f"trajformer needs a flat Box {what} space (flatten Dict spaces when you collect the data)"
        )


def _spec_dict(dataset) -> dict:
    """The env id and kwargs needed to recreate the environment (Minari's recorded EnvSpec)."""
    spec = dataset.spec.env_spec
    if spec is None:
        return {}
    return {
        "id": spec.id,
        "kwargs": json.loads(json.dumps(spec.kwargs, default=str)),
        "max_episode_steps": spec.max_episode_steps,
    }


def env_kwargs(env_spec: dict) -> dict:
    """A recorded env spec's kwargs without its render_mode: how the data was recorded, not how it was watched
    (a dataset recorded with rendering on would open a window, or render every frame, in each env made from it)."""
    return {k: v for k, v in (env_spec.get("kwargs") or {}).items() if k != "render_mode"}


def load_episodes(dataset_id: str, cfg: DataConfig, download: bool = True) -> OfflineData:
    """Read a Minari dataset into checked episodes with the configured observation selection.

    `a+b` joins several datasets of the same spaces (e.g. medium + expert = D4RL's medium-expert); the
    env spec and reference scores come from the first.
    """
    if not dataset_id:
        raise ValueError("no dataset given; set data.dataset in the config or pass --dataset ID")
    ids = dataset_id.split("+")
    if len({local_id(i) for i in ids}) < len(ids):  # a remote path and its local id are one dataset
        raise ValueError(f"'{dataset_id}' names a dataset twice: its episodes would be split into both training and "
                         "validation; name each part once")
    parts = [load_minari(part, download=download) for part in ids]  # all found, or fail now
    first = parts[0]

    def env_of(dataset) -> dict:  # the env spec a join compares: how the data was recorded, not rendered
        spec = _spec_dict(dataset)
        return {**spec, "kwargs": env_kwargs(spec)} if spec else spec

    first_spec = env_of(first)
    for part_id, dataset in zip(ids, parts, strict=True):
        inside = set(dataset.storage.metadata.get("combined_datasets") or []) & {local_id(i) for i in ids}
        if inside:
            raise ValueError(f"cannot join '{dataset_id}': '{part_id}' already holds {', '.join(sorted(inside))} "
                             "(minari.combine_datasets); name each dataset once")
        if (spec := env_of(dataset)) != first_spec:
            raise ValueError(f"cannot join '{dataset_id}': '{part_id}' was recorded in {spec or 'an unknown env'}, "
                             f"the first part in {first_spec or 'an unknown env'}; join datasets of the same env")
        _check_box(dataset.observation_space, "observation", part_id)
        _check_box(dataset.action_space, "action", part_id)
        if (dataset.observation_space.shape, dataset.action_space.shape) != (
                first.observation_space.shape, first.action_space.shape):
            raise ValueError(f"cannot join '{dataset_id}': '{part_id}' has other observation/action shapes than "
                             f"the first dataset; join datasets of the same env")
        if dataset.total_episodes == 0:
            raise ValueError(f"dataset '{part_id}' has no episodes; collect data into it first")
    raw_obs_dim = int(first.observation_space.shape[0])
    indices = select_obs(cfg.obs_dims, raw_obs_dim)

    episodes: list[Episode] = []
    digest = hashlib.sha256()
    for part_id, dataset in zip(dataset_id.split("+"), parts, strict=True):
        n = dataset.total_episodes if cfg.max_episodes == 0 else min(cfg.max_episodes, dataset.total_episodes)
        for ep in dataset.iterate_episodes(list(range(n))):
            obs = np.asarray(ep.observations, dtype=np.float64)
            act = np.asarray(ep.actions, dtype=np.float64).reshape(len(ep.actions), -1)
            rew = np.asarray(ep.rewards, dtype=np.float64)
            term = np.asarray(ep.terminations, dtype=bool)
            trunc = np.asarray(ep.truncations, dtype=bool)
            for name, arr in (("observations", obs), ("actions", act), ("rewards", rew)):
                if not np.all(np.isfinite(arr)):
                    raise ValueError(
                        f"dataset '{part_id}' episode {ep.id} has NaN or inf in its {name}; "
                        f"remove or repair those episodes before training"
                    )
            if len(act) == 0:
                continue
            for arr in (obs, act, rew, term, trunc):
                digest.update(np.ascontiguousarray(arr).tobytes())
            episodes.append(Episode(obs[:, indices], act, rew, term, trunc))
    if not episodes:
        raise ValueError(f"dataset '{dataset_id}' has no non-empty episodes; collect data into it first")

    meta = first.storage.metadata
    return OfflineData(
        dataset_id=dataset_id,
        episodes=episodes,
        obs_indices=indices,
        raw_obs_dim=raw_obs_dim,
        env_spec=_spec_dict(first),
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
        sha256=digest.hexdigest(),
    )


def penalized_rewards(ep: Episode, termination_penalty: float) -> np.ndarray:
    """Rewards with the final reward replaced by the penalty at a true termination (official)."""
    rew = ep.rew.copy()
    if ep.is_terminal:
        rew[-1] = termination_penalty
    return rew


def values_to_go(rew: np.ndarray, discount: float) -> np.ndarray:
    """V_t = sum_{k>=1} discount^(k-1) r_{t+k}: the discounted return from t+1, excluding r_t."""
    values = np.zeros_like(rew)
    running = 0.0
    for t in range(len(rew) - 1, -1, -1):
        values[t] = running
        running = rew[t] + discount * running
    return values


def joined_transitions(ep: Episode, cfg: DataConfig) -> np.ndarray:
    """The (T, dS + dA + 2) array of [s, a, r, V] per transition of one episode."""
    rew = penalized_rewards(ep, cfg.termination_penalty)
    values = values_to_go(rew, cfg.discount)
    return np.concatenate([ep.obs[:-1], ep.act, rew[:, None], values[:, None]], axis=1)


def split_episodes(n_episodes: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/validation split of episode indices (at least one training episode)."""
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(validation_fraction * n_episodes))
    n_val = min(n_val, n_episodes - 1)
    if validation_fraction > 0 and n_episodes > 1:
        n_val = max(n_val, 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_record(n_episodes: int, validation_fraction: float, seed: int) -> dict:
    """The split `split_episodes` draws, as every trained directory records it (run, ensemble, BC, IQL,
    MOPO/MOReL/COMBO): seed, validation fraction and both episode lists, so any two records can be checked."""
    train_idx, val_idx = split_episodes(n_episodes, validation_fraction, seed)
    return {"seed": int(seed), "validation_fraction": validation_fraction,
            "train_episodes": train_idx.tolist(), "validation_episodes": val_idx.tolist()}


def same_split(a: dict, b: dict) -> bool:
    """Whether two recorded splits agree: seed, validation fraction and each episode list both record (compared
    by count where one holds a count: BC, IQL and MOPO/MOReL/COMBO records before 2026-12-07 stored counts)."""
    if (a["seed"], a["validation_fraction"]) != (b["seed"], b["validation_fraction"]):
        return False
    for key in ("train_episodes", "validation_episodes"):
        x, y = a.get(key), b.get(key)
        if isinstance(x, list) and isinstance(y, list):
            if sorted(x) != sorted(y):
                return False
        elif x is not None and y is not None and _count(x) != _count(y):
            return False
    return True


def describe_split(split: dict) -> str:
    """A recorded split in words, for error messages: seed, validation fraction and episode counts."""
    counts = " + ".join(str(_count(split[k])) for k in ("train_episodes", "validation_episodes") if k in split)
    return f"seed {split['seed']}, validation fraction {split['validation_fraction']}, {counts} episodes"


def _count(episodes: list | int) -> int:
    return len(episodes) if isinstance(episodes, list) else int(episodes)


def complete_episodes(data: OfflineData) -> list[Episode]:
    """Episodes that ended by termination or at the env's time limit: not the pieces the end of collection cut
    (all episodes when the data records no time limit)."""
    limit = data.env_spec.get("max_episode_steps")
    return [e for e in data.episodes if e.is_terminal or limit is None or e.length >= limit]


def prefix_return_mean(data: OfflineData, steps: int) -> float | None:
    """Mean return over the first `steps` steps of the episodes that reach them or terminate before (the data's
    reference for episodes cut at `steps`; past the env's time limit, where no episode goes on, at the limit);
    None if no episode qualifies."""
    limit = data.env_spec.get("max_episode_steps")
    steps = min(steps, limit) if limit else steps
    returns = [e.rew[:steps].sum() for e in data.episodes if e.length >= steps or e.is_terminal]
    return float(np.mean(returns)) if returns else None


def return_stats(data: OfflineData) -> dict:
    """Episode count, steps, undiscounted return statistics of the raw rewards, and the mean return over complete
    episodes (the dataset's behaviour reference, DESIGN.md §6)."""
    returns = np.array([e.rew.sum() for e in data.episodes])
    lengths = np.array([e.length for e in data.episodes])
    complete = np.array([e.rew.sum() for e in complete_episodes(data)])
    return {
        "complete_episodes": len(complete),
        "complete_return_mean": float(complete.mean()) if len(complete) else None,
        "episodes": len(data.episodes),
        "steps": int(lengths.sum()),
        "terminated_episodes": int(sum(e.is_terminal for e in data.episodes)),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "length_mean": float(lengths.mean()),
    }
