"""Training: dataset → discretizer → windows → GPT, into a run directory (DESIGN.md §1–4).

Read top to bottom: `prepare` checks and tokenizes the data, `train` runs the loop. The loop is
deterministic given the seed: the batch order of step k is a function of (seed, k), so `--resume` from a
checkpoint (weights, AdamW state, RNG, step) reaches bit-identical weights. Under torchrun every rank
builds the same data, takes its share of each global batch, and normalises by the global mask count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from trajformer import __version__
from trajformer.config import Config, load_config, to_toml
from trajformer.data import OfflineData, joined_transitions, load_episodes, return_stats, split_episodes, split_record
from trajformer.discretizer import Discretizer
from trajformer.files import file_lock, load_state, load_torch, save_text, save_torch, writable_dir
from trajformer.model import GPT, GPTConfig, native_bf16, token_losses, usable_device
from trajformer.run import (
    Run,
    check_discretizer,
    load_discretizer,
    load_run,
    model_sha256,
    read_metrics,
    write_run_files,
)
from trajformer.stopping import stop_requests
from trajformer.tokens import TokenWindows, loss_weights

TOKEN_TYPES = ("obs", "action", "reward", "value")

RESUMABLE_KEYS = ("train.num_threads", "train.log_every", "train.checkpoint_every", "train.eval_every",
                  "train.device", "train.compile")
"""Keys a resumed run may change: they cannot change the weights trained so far or the schedule ahead (eval_every
changes which steps are validated, so which of them model.pt can hold; device and compile change speed and float
rounding, not the maths: with train.dtype = "auto" a device with native bf16 trains the steps after the resume under
bf16 autocast, as run.json's compute.sessions records). Not eval_windows: the best validation loss so far would
compare losses over other windows."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the checkpoint is written; the message holds the command that resumes."""


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """{section.key: (old, new)} for every key of [data], [discretizer], [model] and [train] that differs."""
    changes = {}
    for section in ("data", "discretizer", "model", "train"):
        a, b = asdict(getattr(old, section)), asdict(getattr(new, section))
        changes.update({f"{section}.{k}": (a[k], b[k]) for k in a if a[k] != b[k]})
    return changes


@dataclass
class Prepared:
    """Checked episodes, their split, the fitted discretizer and the training/validation windows."""

    data: OfflineData
    transitions: list[np.ndarray]
    discretizer: Discretizer
    train_episodes: np.ndarray
    val_episodes: np.ndarray
    train_windows: TokenWindows
    val_windows: TokenWindows | None


def fit_discretizer(transitions: list[np.ndarray], cfg: Config, obs_dim: int, act_dim: int) -> Discretizer:
    """Fit on all real transitions; reward and value columns always use quantile bins, so the -100
    termination penalty cannot squeeze ordinary rewards into a few uniform bins."""
    reward_col = obs_dim + act_dim
    return Discretizer.fit(
        np.concatenate(transitions), cfg.discretizer.n_bins, cfg.discretizer.kind,
        quantile_columns=(reward_col, reward_col + 1),
    )


def prepare(cfg: Config, dataset_id: str | None = None, discretizer: Discretizer | None = None,
            mismatch_hint: str = "use a new --out directory") -> Prepared:
    """Load and check the dataset, split episodes, fit (or reuse) the discretizer, build windows; a reused
    discretizer that does not fit the data fails with `mismatch_hint` as the fix."""
    data = load_episodes(dataset_id or cfg.data.dataset, cfg.data)
    transitions = [joined_transitions(ep, cfg.data) for ep in data.episodes]
    if discretizer is None:
        discretizer = fit_discretizer(transitions, cfg, data.obs_dim, data.act_dim)
    elif (discretizer.dim, discretizer.n_bins) != (data.transition_dim, cfg.discretizer.n_bins):
        raise ValueError(
            f"the run's discretizer is for {discretizer.dim}-dim transitions with {discretizer.n_bins} bins, "
            f"this data and config give {data.transition_dim} dims and {cfg.discretizer.n_bins} bins; "
            f"{mismatch_hint}"
        )
    train_idx, val_idx = split_episodes(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)

    def windows(idx: np.ndarray) -> TokenWindows:
        return TokenWindows([discretizer.encode(transitions[i]) for i in idx],
                            [data.episodes[i].is_terminal for i in idx], cfg.discretizer.n_bins,
                            cfg.data.sequence_length)

    val_windows = windows(val_idx) if len(val_idx) else None
    return Prepared(data, transitions, discretizer, train_idx, val_idx, windows(train_idx), val_windows)


def gpt_config(cfg: Config, obs_dim: int, act_dim: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig(
        obs_dim=obs_dim, act_dim=act_dim, n_bins=cfg.discretizer.n_bins,
        block_size=cfg.data.sequence_length * (obs_dim + act_dim + 2) - 1,
        n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout,
        attention=m.attention, window=m.window_transitions * (obs_dim + act_dim + 2) if m.attention == "window" else 0,
    )


def check_training_length(cfg: Config) -> None:
    """Refuse a config that sets no training length, before any data is read (compare checks it too)."""
    if not (cfg.train.max_steps or cfg.train.max_windows or cfg.train.epochs):
        raise ValueError("training length is not set; set train.max_windows, train.max_steps or train.epochs "
                         "(e.g. --set train.max_windows=250000)")


def schedule(cfg: Config, n_windows: int, world_size: int = 1) -> tuple[int, int, int, int]:
    """(batch size, steps per epoch, total steps, warmup steps) for this dataset size."""
    batch = min(cfg.train.batch_size, n_windows)
    if batch < world_size:
        raise ValueError(f"batch of {batch} windows cannot be split over {world_size} processes; use fewer")
    steps_per_epoch = max(1, n_windows // batch)
    if cfg.train.max_steps > 0:
        total = cfg.train.max_steps
    elif cfg.train.max_windows > 0:
        total = max(1, math.ceil(cfg.train.max_windows / batch))
    else:
        check_training_length(cfg)
        total = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = min(steps_per_epoch, int(cfg.train.warmup_fraction * total))
    return batch, steps_per_epoch, total, warmup


def resolve_dtype(name: str, device: torch.device) -> str:
    """The compute dtype for `train.dtype`: "auto" is bfloat16 where the hardware has native bf16 matmuls."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def learning_rate(step: int, cfg: Config, total: int, warmup: int) -> float:
    """Linear warmup, then one cosine decay to final_lr_fraction * lr, then flat."""
    lr, floor = cfg.train.learning_rate, cfg.train.learning_rate * cfg.train.final_lr_fraction
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, seed: int, n_windows: int, batch: int, steps_per_epoch: int) -> torch.Tensor:
    """Window ids of global step `step`: a seeded permutation per epoch, read in order (drop last)."""
    epoch, j = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return torch.from_numpy(order[j * batch : (j + 1) * batch])


def batch_loss(model, windows: TokenWindows, ids: torch.Tensor, weights: torch.Tensor, autocast: bool):
    """(weighted CE sum, mask count, per-position CE, mask) of one batch."""
    x, y, mask = windows.batch(ids)
    with torch.autocast(weights.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    ce = token_losses(logits, y)
    return (ce * weights[: ce.shape[1]] * mask).sum(), mask.sum(), ce, mask


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, windows: TokenWindows, ids: torch.Tensor,
               weights: torch.Tensor, autocast: bool, grad_clip: float, world: int = 1) -> torch.Tensor:
    """One optimiser step on windows `ids` (this rank's share): weighted masked loss normalised by the global
    mask count, backward, gradient clipping, AdamW. Returns this rank's loss. benchmarks/ times this function."""
    w_sum, m_sum, _, _ = batch_loss(net, windows, ids, weights, autocast)
    count = m_sum.detach().clone()
    if world > 1:
        dist.all_reduce(count)
    loss = w_sum / count.clamp(min=1.0)
    optimizer.zero_grad(set_to_none=True)
    (loss * world).backward()  # DDP averages gradients over ranks; * world makes it the global sum
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def validation_losses(model: GPT, windows: TokenWindows, cfg: Config, weights: torch.Tensor, autocast: bool) -> dict:
    """Validation loss (weighted, as trained) and mean CE per token type over evenly spaced windows."""
    model.eval()
    n = min(len(windows), cfg.train.eval_windows)
    ids = torch.from_numpy(np.linspace(0, len(windows) - 1, n).round().astype(np.int64))
    obs_dim, act_dim = model.config.obs_dim, model.config.act_dim
    slot = windows.target_slot.cpu()
    types = torch.full_like(slot, 0)
    types[(slot >= obs_dim) & (slot < obs_dim + act_dim)] = 1
    types[slot == obs_dim + act_dim] = 2
    types[slot == obs_dim + act_dim + 1] = 3
    sums, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    weighted, total = 0.0, 0.0
    for chunk in ids.split(cfg.train.batch_size):
        w_sum, m_sum, ce, mask = batch_loss(model, windows, chunk, weights, autocast)
        weighted, total = weighted + float(w_sum), total + float(m_sum)
        ce, mask = ce.float().cpu(), mask.cpu()
        index = types[None, : ce.shape[1], None].expand(len(chunk), -1, 1)
        per_type = torch.zeros(len(chunk), ce.shape[1], 4).scatter_(2, index, 1)
        sums += torch.einsum("bp,bpk->k", (ce * mask).double(), per_type.double())
        counts += torch.einsum("bp,bpk->k", mask.double(), per_type.double())
    model.train()
    out = {"val_loss": weighted / max(total, 1.0)}
    out.update({f"val_{name}": float(sums[i] / max(counts[i], 1.0)) for i, name in enumerate(TOKEN_TYPES)})
    return out


def provenance(data: OfflineData) -> dict:
    """Package, torch and git versions (and whether the checkout had uncommitted changes, which the commit does not
    hold) and the dataset hash, recorded in run.json."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = None if commit is None else git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status)
    return {
        "trajformer": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "git_commit": commit, "git_dirty": dirty, "dataset_sha256": data.sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_metadata(prep: Prepared, cfg: Config, model_cfg: GPTConfig, compute: dict) -> dict:
    data = prep.data
    return {
        "format": 1,
        "dataset_id": data.dataset_id,
        "env": data.env_spec,
        "obs_indices": data.obs_indices.tolist(),
        "raw_obs_dim": data.raw_obs_dim,
        "obs_dim": data.obs_dim,
        "act_dim": data.act_dim,
        "transition_dim": data.transition_dim,
        "n_bins": cfg.discretizer.n_bins,
        "model": asdict(model_cfg),
        "split": split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed),
        "ref_min_score": data.ref_min_score,
        "ref_max_score": data.ref_max_score,
        "dataset_stats": return_stats(data),
        "discretizer_error": _reconstruction(prep),
        "provenance": provenance(data),
        "compute": compute,
    }


def _reconstruction(prep: Prepared) -> dict:
    """Per-dimension mean |x - decode(encode(x))| and std of the data, for `trajformer info`."""
    joined = np.concatenate(prep.transitions)
    return {"mean_abs_error": prep.discretizer.reconstruction_error(joined).tolist(),
            "std": joined.std(axis=0).tolist(), "n_bins": prep.discretizer.n_real.tolist()}


def trained_steps(out_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(steps done, total steps) of a run directory's checkpoint, or None when it has none to resume."""
    out_dir = Path(out_dir)
    if not (out_dir / "checkpoint.pt").is_file() or not (out_dir / "run.json").is_file():
        return None
    try:
        total = json.loads((out_dir / "run.json").read_text()).get("compute", {}).get("total_steps")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{out_dir}/run.json is corrupt ({err}); delete {out_dir} to train again, or use another "
                         "--out") from None
    step = int(load_torch(out_dir / "checkpoint.pt")["step"])
    return (step, int(total)) if total is not None else None


def _resumed_compute(old: dict, new: dict, step: int) -> dict:
    """run.json's compute record after a resume at `step`: the sessions that trained the steps before it (their
    device, dtype and threads) and this one; a fine-tune keeps the record of its start. A finished run resumed
    (nothing left to train) keeps its record as it was."""
    if step >= new["total_steps"] and old:
        return old
    first = {"from_step": 0, **{k: old[k] for k in ("device", "dtype", "threads") if k in old}}
    before = old.get("sessions") or [first]
    out = {**new, "sessions": [s for s in before if s["from_step"] < step] + new["sessions"]}
    if old.get("init_from"):
        out["init_from"] = old["init_from"]
    return out


def _finished_weights_hint(out_dir: Path) -> str:
    """What to do with a directory that holds weights but no checkpoint to resume (a shipped or copied model)."""
    return (f"{out_dir} holds finished weights but no checkpoint.pt to resume (a shipped or copied model?); fine-tune "
            f"from them with `--set train.init_from={out_dir} --out NEW_DIR`")


def _load_checkpoint(out_dir: Path) -> tuple[dict, dict]:
    """The checkpoint to resume from and the run's run.json, checked before any data loads: both exist and load."""
    if not (out_dir / "checkpoint.pt").is_file():
        if (out_dir / "model.pt").is_file():
            raise FileNotFoundError(f"--resume: {_finished_weights_hint(out_dir)}")
        raise FileNotFoundError(f"--resume: {out_dir} has no checkpoint.pt; train without --resume to start a run")
    try:
        state = load_torch(out_dir / "checkpoint.pt")
    except ValueError as err:
        raise ValueError(f"--resume: {str(err).split(';')[0]}; restore it from a backup, or fine-tune from the run's "
                         f"model.pt with `--set train.init_from={out_dir} --out NEW_DIR`") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "best_val", "rng"} <= set(state):
        raise ValueError(f"--resume: {out_dir}/checkpoint.pt is not a training checkpoint; train into another --out")
    try:
        meta = json.loads((out_dir / "run.json").read_text())
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"--resume: {out_dir}/run.json, the run's record, is missing or corrupt ({err}); the "
                         "checkpoint cannot be checked against this data: use a new --out directory") from None
    return state, meta


def _check_resume(out_dir: Path, meta: dict, prep: Prepared) -> None:
    """The run being resumed (its run.json `meta`) was trained on this data's dims and bins and on this data."""
    dims = (meta.get("obs_dim"), meta.get("act_dim"), meta.get("n_bins"))
    want = (prep.data.obs_dim, prep.data.act_dim, prep.discretizer.n_bins)
    if dims != want:
        raise ValueError(
            f"--resume: {out_dir} was trained for (obs, act, bins) = {dims}, this data and config give {want}; "
            f"use a new --out directory"
        )
    recorded = meta.get("provenance", {}).get("dataset_sha256")
    if recorded is not None and recorded != prep.data.sha256:
        raise ValueError(
            f"--resume: {out_dir} was trained on other data than {meta.get('dataset_id')} holds now (sha256 "
            f"{recorded[:12]} -> {prep.data.sha256[:12]}: collected again with other settings?); recollect it as "
            "it was, or use a new --out directory"
        )


def _load_init(cfg: Config) -> Run:
    """The run named by train.init_from (weights and discretizer), or a one-line error naming it; refused before the
    data loads when it defined values or rewards otherwise (its discretizer's bins were fitted to them)."""
    try:
        init = load_run(cfg.train.init_from)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"train.init_from: {err}") from None
    defined = [f"data.{k} {getattr(init.config.data, k)} -> {getattr(cfg.data, k)}"
               for k in ("discount", "termination_penalty") if getattr(init.config.data, k) != getattr(cfg.data, k)]
    if defined:
        raise ValueError(f"train.init_from: {init.path} tokenised its values and rewards with other "
                         f"{', '.join(defined)}; set them as in its config.toml (its discretizer's bins fit those)")
    return init


def _check_init(init: Run, prep: Prepared, model_cfg: GPTConfig) -> None:
    """Refuse to start from a run whose observation columns or network shape differ from this run's."""
    columns = init.meta.get("obs_indices")
    if columns != prep.data.obs_indices.tolist():
        raise ValueError(f"train.init_from: {init.path} was trained on observation columns {columns}, this data "
                         f"gives {prep.data.obs_indices.tolist()}; set data.obs_dims as in its config.toml")
    have, want = asdict(init.model.config), asdict(model_cfg)
    diff = [k for k in want if k != "dropout" and have.get(k) != want[k]]
    if diff:
        detail = ", ".join(f"{k} {have.get(k)} -> {want[k]}" for k in diff)
        raise ValueError(f"train.init_from: {init.path} is a different network ({detail}); set model.*, "
                         f"data.sequence_length and discretizer.n_bins as in its config.toml")


def _init_record(init: Run) -> dict:
    """What run.json keeps of the run a fine-tune started from."""
    return {"run": str(init.path), "model_sha256": model_sha256(init), "dataset_id": init.meta.get("dataset_id"),
            "total_steps": init.meta.get("compute", {}).get("total_steps"),
            "batch_size": init.meta.get("compute", {}).get("batch_size")}


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # NCCL reduces the gradients on the cards; gloo the host tensors (the stop flag, the RNG states), which
        # NCCL cannot take.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """loss.png: training loss and validation losses per token type against step."""
    from trajformer.plots import line_plot

    rows = read_metrics(metrics_path)
    val = [r for r in rows if "val_loss" in r]
    curves = {"train (weighted)": [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]}
    curves |= {key.replace("_", " "): [(r["step"], r[key]) for r in val]
               for key in ("val_loss", *(f"val_{t}" for t in TOKEN_TYPES))}
    line_plot(curves, out_path, xlabel="step", ylabel="cross-entropy (nats)", logy=True)


def train(cfg: Config, out_dir: str | os.PathLike, dataset_id: str | None = None, resume: bool = False,
          progress: bool = True) -> Path:
    """Train a Trajectory Transformer into `out_dir`; returns the run directory. One training at a time writes a
    directory: another started on it while it runs (a double launch, a --resume of a run still training) is
    refused, instead of both writing one run's files."""
    out_dir = Path(out_dir)
    writable_dir(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        return _train(cfg, out_dir, dataset_id, resume, progress)  # torchrun: rank 0 holds the lock, writes the files
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / ".train.lock", wait=False) as free:
        if not free:  # another process holds it (and may have made the directory): nothing here is ours to remove
            raise ValueError(f"another `trajformer train` is writing {out_dir}; wait for it to end, or train into "
                             "another --out")
        try:
            return _train(cfg, out_dir, dataset_id, resume, progress)
        finally:
            if created and [p.name for p in out_dir.iterdir()] == [".train.lock"]:  # refused before any write
                shutil.rmtree(out_dir)


def _train(cfg: Config, out_dir: Path, dataset_id: str | None, resume: bool, progress: bool) -> Path:
    """train()'s work, with the directory's lock held."""
    if dataset_id:
        cfg.data.dataset = dataset_id
    # A directory whose run stopped before writing any weights (run.json comes first) holds nothing to lose or
    # resume: it is trained again from the start.
    if not resume and any((out_dir / name).exists() for name in ("checkpoint.pt", "model.pt", "last.pt")):
        if not (out_dir / "run.json").is_file():  # an ensemble's directory, say
            raise FileExistsError(f"{out_dir} holds weights but no run.json: not a run directory; choose another --out")
        if not (out_dir / "checkpoint.pt").is_file():
            raise FileExistsError(f"{_finished_weights_hint(out_dir)}, or choose another --out")
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    usable_device("train.device", cfg.train.device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    rank, world = _distributed()

    # Everything that can fail on bad input happens before anything is written.
    check_training_length(cfg)
    changed = {}
    if resume and (out_dir / "config.toml").is_file():
        changed = config_changes(load_config(out_dir / "config.toml"), cfg)
        refused = [k for k in changed if k not in RESUMABLE_KEYS]
        if refused:
            detail = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
            raise ValueError(f"--resume would change the run ({detail}); resume with the run's own config "
                             f"(omit CONFIG and those --set), or train a new run into another --out")
    saved = out_dir / "discretizer.npz"
    # A fine-tune starts from init_from's weights and discretizer; a resumed one from its own checkpoint.
    init = _load_init(cfg) if cfg.train.init_from and not resume else None
    if resume and saved.exists():
        discretizer = load_discretizer(saved)
    else:
        discretizer = init.discretizer if init is not None else None
    hint = (f"train.init_from: set data.obs_dims and discretizer.n_bins as in {init.path}/config.toml"
            if init is not None else "use a new --out directory")
    state, resumed = _load_checkpoint(out_dir) if resume else (None, None)
    if resume and saved.exists():
        check_discretizer(out_dir, discretizer, resumed)
    prep = prepare(cfg, discretizer=discretizer, mismatch_hint=hint)
    if resume:
        _check_resume(out_dir, resumed, prep)
    windows = prep.train_windows
    batch, steps_per_epoch, total, warmup = schedule(cfg, len(windows), world)
    model_cfg = gpt_config(cfg, prep.data.obs_dim, prep.data.act_dim)
    if init is not None:
        _check_init(init, prep, model_cfg)

    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    optimizer = model.configure_optimizers(cfg.train.weight_decay, cfg.train.learning_rate)
    step, best = 0, math.inf
    if state is not None:
        fix = "its checkpoint.pt comes from another run; use a new --out directory"
        load_state(model, state["model"], f"--resume: {out_dir}/checkpoint.pt does not fit this model", fix)
        load_state(optimizer, state["optimizer"], f"--resume: {out_dir}/checkpoint.pt's optimizer does not fit", fix)
        step, best = int(state["step"]), float(state["best_val"])
    torch.manual_seed(cfg.train.seed + 1000 * rank)  # dropout stream, distinct per rank
    if state is not None:
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])

    device = torch.device(cfg.train.device)
    if device.type == "cuda" and world > 1:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    model.to(device)
    if state is not None and device.type == "cuda" and "cuda_rng" in state:  # dropout on a card draws from its stream
        cuda_rng = state["cuda_rng"]  # one per rank (a single tensor in checkpoints before 2026-12-07)
        if isinstance(cuda_rng, list):
            cuda_rng = cuda_rng[rank] if rank < len(cuda_rng) else cuda_rng[0]
        torch.cuda.set_rng_state(cuda_rng, device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    weights = loss_weights(prep.data.obs_dim, prep.data.act_dim, cfg.data.sequence_length,
                           cfg.model.action_weight, cfg.model.reward_weight, cfg.model.value_weight).to(device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    autocast = dtype == "bfloat16"
    windows.to(device)
    if prep.val_windows is not None:
        prep.val_windows.to(device)

    metrics_path = out_dir / "metrics.jsonl"
    seconds_before = 0.0  # training wall-clock of the sessions before a resume, from the kept log rows
    if rank == 0:
        here = {"device": str(device), "dtype": dtype, "threads": torch.get_num_threads()}
        compute = {**here, "world_size": world, "compile": cfg.train.compile, "total_steps": total,
                   "batch_size": batch, "sessions": [{"from_step": step, **here}]}
        if init is not None:
            compute["init_from"] = _init_record(init)
        elif resumed is not None:  # the run.json _load_checkpoint read
            compute = _resumed_compute(resumed.get("compute", {}), compute, step)
        write_run_files(out_dir, to_toml(cfg), prep.discretizer, run_metadata(prep, cfg, model_cfg, compute))
        if state is not None and metrics_path.exists():  # drop lines logged after the checkpoint
            kept = [row for row in read_metrics(metrics_path) if row["step"] <= step]
            save_text(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
            seconds_before = max((row.get("seconds", 0.0) for row in kept), default=0.0)
        elif state is None:
            save_text(metrics_path, "")
        if changed:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "resumed_with": {k: v[1] for k, v in changed.items()}}) + "\n")

    def log(row: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def gather_rng(mine: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's RNG state (a host tensor), in rank order."""
        if world == 1:
            return [mine]
        states = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(states, mine)
        return states

    checkpointed = state is not None  # a checkpoint.pt of this run exists

    def diverged(value: float) -> None:
        """Stop before a non-finite loss's weights are saved (a NaN is never below `best`, but model.pt is written
        when there is none yet)."""
        if not math.isfinite(value):
            raise ValueError(f"training diverged: the loss is {value} at step {step}; nothing from it on is saved "
                             f"(model.pt and checkpoint.pt, if any, are from before); train a new run (another "
                             f"--out) with a lower train.learning_rate (now {cfg.train.learning_rate}) or "
                             f"train.grad_clip (now {cfg.train.grad_clip})")

    def checkpoint() -> None:
        nonlocal checkpointed
        diverged(float(loss))
        rng = gather_rng(torch.get_rng_state())
        extra = {"cuda_rng": gather_rng(torch.cuda.get_rng_state(device))} if device.type == "cuda" else {}
        if rank == 0:
            save_torch(out_dir / "checkpoint.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                   "step": step, "best_val": best, "rng": rng, **extra})
            save_torch(out_dir / "last.pt", model.state_dict())
            if prep.val_windows is None or not (out_dir / "model.pt").exists():
                save_torch(out_dir / "model.pt", model.state_dict())
        checkpointed = True

    def validate() -> bool:
        """Log the validation losses; True when they are the best so far (model.pt then holds these weights)."""
        nonlocal best
        if prep.val_windows is None:
            return False
        row = {"step": step, **validation_losses(model, prep.val_windows, cfg, weights, autocast)}
        log(row)
        diverged(row["val_loss"])
        if row["val_loss"] < best:
            best = row["val_loss"]
            if rank == 0:
                save_torch(out_dir / "model.pt", model.state_dict())
            return True
        return False

    tokens_per_step = batch * windows.block_size
    bar = tqdm(total=total, initial=step, disable=None if progress and rank == 0 else True,
               desc="train", unit="step")  # disable=None: bars only on a terminal
    # Ctrl-C (or SIGTERM: `kill`, a scheduler's time limit) asks to stop; the loop stops at the next step boundary
    # and checkpoints, so a resumed run repeats no step and skips none (a second one stops at once).
    interrupted = False
    model.train()
    tick, tick_step = time.perf_counter(), step
    started = tick
    with stop_requests() as asked, contextlib.closing(bar):
        while step < total:
            ids = batch_indices(step, cfg.train.seed, len(windows), batch, steps_per_epoch)[rank::world]
            lr = learning_rate(step, cfg, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(net, optimizer, windows, ids, weights, autocast, cfg.train.grad_clip, world)
            step += 1
            if step % cfg.train.log_every == 0 or step == total:
                reported = loss.detach().clone()
                if world > 1:
                    dist.all_reduce(reported)
                diverged(float(reported))
                now = time.perf_counter()
                tok_s = tokens_per_step * (step - tick_step) / (now - tick)
                tick, tick_step = now, step
                log({"step": step, "windows": step * batch, "train_loss": float(reported), "lr": lr,
                     "tokens_per_s": tok_s, "seconds": round(seconds_before + now - started, 1)})
                bar.set_postfix(loss=f"{float(reported):.3f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            improved = (step % cfg.train.eval_every == 0 or step == total) and validate()
            interrupted = asked.is_set()
            if world > 1:  # every rank must stop at the same step
                flag = torch.tensor([float(interrupted)])
                dist.all_reduce(flag)
                interrupted = bool(flag.item())
            # A first model.pt comes with a checkpoint: a run killed between them could be neither resumed nor
            # trained again (model.pt marks a run).
            first_best = improved and not checkpointed
            if step % cfg.train.checkpoint_every == 0 or step == total or interrupted or first_best:
                checkpoint()
            if interrupted:
                break
    if rank == 0 and metrics_path.exists():
        plot_losses(metrics_path, out_dir / "loss.png")
    if world > 1:
        dist.barrier()
    if interrupted:
        raise TrainingInterrupted(f"training interrupted at step {step} of {total}; checkpoint written; resume with: "
                                  f"trajformer train --resume --out {out_dir}")
    return out_dir
