"""Typed configuration: one dataclass per TOML section, strict loading, `--set` overrides, TOML output.

Unknown sections or keys and wrongly typed values are errors that list what is valid, so a typo never
silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class DataConfig:
    """Which dataset, which observation dims, and how rewards become values (DESIGN.md §1, §3)."""

    dataset: str = ""
    # Observation dims the model sees: [] = all, a list of indices, or a slice string such as "0:45".
    obs_dims: list[int] | str = field(default_factory=list)
    discount: float = 0.99
    termination_penalty: float = -100.0
    # Defaults are the CPU recipe the learning curves chose (README "Training budget"): windows of 5 transitions
    # (the planner's context), no dropout, batches of 64. The official configs set the paper's values.
    sequence_length: int = 5
    validation_fraction: float = 0.1
    # Use only the first N episodes (0 = all) of the dataset, of each part of an a+b join (of a dataset made by
    # minari.combine_datasets, such as a medium-expert preset, its first N: all from its first part): tiny runs, tests.
    max_episodes: int = 0
    # Seed of the train/validation episode split; none = train.seed. Set it to keep one split across a sweep of
    # train.seed (TT's weights and batches), as BC's and IQL's own seeds do.
    split_seed: int | None = None


@dataclass
class DiscretizerConfig:
    """Per-dimension binning (DESIGN.md §2)."""

    kind: str = "quantile"
    n_bins: int = 100


@dataclass
class ModelConfig:
    """GPT size and per-token-type loss weights (DESIGN.md §4)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # "absolute": learned positions (official). "window": rotary positions and an attention band of
    # window_transitions transitions, so the planner's KV cache survives its sliding window (DESIGN.md §5b).
    attention: str = "absolute"
    window_transitions: int = 5
    action_weight: float = 5.0
    reward_weight: float = 1.0
    value_weight: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and devices (DESIGN.md §4)."""

    batch_size: int = 64
    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Training length, one of: max_steps (optimiser steps), max_windows (sampled training windows: a budget
    # that does not change with batch_size), epochs (passes over the training windows). The schedule follows it.
    max_steps: int = 0
    max_windows: int = 0
    epochs: float = 0.0
    # Warmup = min(one epoch of steps, warmup_fraction * total steps); cosine to final_lr_fraction * lr.
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 250
    # Validation uses at most this many windows (evenly spaced) so evaluation stays cheap.
    eval_windows: int = 4096
    log_every: int = 10
    device: str = "cpu"
    # "auto": bfloat16 autocast where the hardware computes it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs),
    # else float32. Weights, optimiser state and the loss stay float32 either way.
    dtype: str = "auto"
    compile: bool = False
    # torch.set_num_threads for the training process (0 = leave torch's default).
    num_threads: int = 0
    # Fine-tuning: a run directory (or shipped model name) whose weights start this run and whose discretizer
    # it reuses, so its tokens keep their meaning on new data; the model and data shapes must match it.
    init_from: str = ""


@dataclass
class PlanConfig:
    """Beam-search planner settings (DESIGN.md §5); official defaults."""

    beam_width: int = 128
    horizon: int = 15
    n_expand: int = 2
    max_context_transitions: int = 5
    k_act: int | None = None
    cdf_act: float | None = 0.6
    k_obs: int = 1
    plan_freq: int = 1
    # Carry each env's KV cache across env steps (DESIGN.md §5b): a search starts from the whole episode encoded
    # once, earlier tokens reaching the plan through the layers. Window models only (model.attention = "window");
    # false encodes the last max_context_transitions afresh each search, as an absolute model must. none: carry
    # where the model can (README, The window model).
    carry_context: bool | None = None
    objective: str = "reward"
    penalty_lambda: float = 1.0
    # objective = "critic": a `trajformer iql` directory whose Q(s_t, a_t) replaces the value token in the score.
    critic: str = ""
    # torch.set_num_threads while planning (0 = torch's default); 1 avoids OpenMP spinning on a busy machine.
    num_threads: int = 0
    # What the model computes in while planning: "float32", or "bfloat16" (weights and KV cache; scores stay
    # float32): ~1.6x faster at beam 128 / horizon 15 on a CPU with native bf16 (none at 32 / 5), half the
    # cache's memory; its plans differ from float32's about as much as another seed's do (README, Speed).
    dtype: str = "float32"
    # Where the search runs ("cpu", "cuda", "cuda:1"): model, KV cache, scores and tokens stay on the device, the
    # random draws come from the CPU's streams (the same plans on either device up to float rounding).
    device: str = "cpu"


def carries(plan: PlanConfig, attention: str) -> bool:
    """Whether a search carries each env's context across env steps: plan.carry_context, or where that is none,
    whether the model (of `attention`) is a window model, the only kind that can (true for another one raises)."""
    if plan.carry_context and attention != "window":
        raise ValueError("plan.carry_context = true needs a window model (model.attention = \"window\"); an "
                         "absolute model re-encodes its crop: set plan.carry_context=false or none")
    return attention == "window" if plan.carry_context is None else plan.carry_context


@dataclass
class EnsembleConfig:
    """Sizes and training settings of the ensemble (PETS defaults: 5 members, 4 x 200 swish layers)."""

    members: int = 5
    hidden: int = 200
    layers: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 5
    max_seconds: float = 0.0  # stop after this much training time (0 = no limit)
    seed: int = 0


@dataclass
class ModelBasedConfig:
    """MOPO, MOReL and COMBO on the ensemble (DESIGN.md §9): model rollouts branched from dataset states, SAC on
    batches mixing real and model transitions. Defaults are the papers' Hopper-medium settings; the hopper,
    walker2d and halfcheetah configs carry the papers' settings for their dataset (configs/*.toml)."""

    ensemble: str = ""  # a `trajformer train-ensemble` directory to reuse ("" = train one with [ensemble])
    elites: int = 5  # members sampled by the model env: the best on validation NLL (MOPO: 5 of 7)
    steps: int = 100_000  # SAC gradient steps (the papers: 1M-3M; a CPU budget here)
    batch_size: int = 256
    hidden: int = 256
    learning_rate: float = 3e-4
    discount: float = 0.99
    polyak: float = 0.005
    rollout_every: int = 1000  # SAC steps between rollout rounds (MOPO's epoch)
    rollout_batch: int = 10_000  # rollouts per round, all batched (MOPO: 50k; a CPU budget here)
    retain_rounds: int = 5  # rounds of model transitions kept in the model buffer (MOPO: 5 epochs)
    mopo_rollout_length: int = 5  # h (MOPO D4RL v0: hopper/walker2d-medium 5, halfcheetah-medium 1)
    mopo_lambda: float = 5.0  # reward penalty weight (hopper/walker2d-medium 5, halfcheetah-medium 1)
    mopo_real_ratio: float = 0.05  # share of real transitions in each SAC batch
    # u(s, a): "max_std" (the paper: largest predicted-std norm over members) or "ensemble_std" (the mixture's std,
    # which adds member disagreement: it grows away from the data even where a small ensemble's variances shrink).
    mopo_uncertainty: str = "max_std"
    morel_rollout_length: int = 5  # ours: SAC on branched h-step rollouts of the pessimistic MDP, not NPG
    morel_kappa: float = 100.0  # the halt reward is -kappa
    morel_quantile: float = 0.99  # halt where d(s, a) exceeds this quantile of d over the data's transitions
    morel_real_ratio: float = 0.0  # MOReL optimises in the pessimistic MDP only
    combo_rollout_length: int = 5  # h (COMBO: 5 for hopper/halfcheetah-medium, 1 for walker2d-medium)
    combo_beta: float = 5.0  # conservative weight (COMBO: hopper/walker2d-medium 5, halfcheetah-medium 0.5)
    combo_real_ratio: float = 0.5  # f
    combo_actions: int = 10  # actions per state in the log-sum-exp (uniform and policy, as CQL(H))
    seed: int = 0


@dataclass
class CompareConfig:
    """`trajformer compare`: which methods, their budgets, and the shared evaluation protocol (DESIGN.md §6)."""

    methods: list[str] = field(default_factory=lambda: ["tt", "bc", "iql", "mopo", "morel", "combo", "tt-critic"])
    episodes: int = 10
    num_envs: int = 10
    max_steps: int = 0  # env steps per episode (0 = the env's limit, 1000 for MuJoCo locomotion)
    bc_steps: int = 20_000
    iql_steps: int = 300_000
    tt_run: str = ""  # a trained TT run directory to reuse instead of training one with [model]/[train]


@dataclass
class Config:
    """The whole configuration; each field is one TOML section."""

    data: DataConfig = field(default_factory=DataConfig)
    discretizer: DiscretizerConfig = field(default_factory=DiscretizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    model_based: ModelBasedConfig = field(default_factory=ModelBasedConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def split_seed(self) -> int:
        """The episode split's seed: data.split_seed, or train.seed where that is none."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed


COMPARE_METHODS = ("tt", "bc", "iql", "mopo", "morel", "combo", "tt-critic")
_CHOICES = {
    ("discretizer", "kind"): ("quantile", "uniform"),
    ("train", "dtype"): ("auto", "float32", "bfloat16"),
    ("model", "attention"): ("absolute", "window"),
    ("plan", "objective"): ("reward", "likelihood", "penalized", "critic"),
    ("model_based", "mopo_uncertainty"): ("max_std", "ensemble_std"),
    ("plan", "dtype"): ("float32", "bfloat16"),
}


def _section_types(section: object) -> dict[str, object]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _as_toml(value, example: str) -> str:
    """The fix for a number given as text ('.001', 'abc'): --set values are parsed as TOML, which spells them so."""
    return f"; write a TOML {example}" if isinstance(value, str) else ""


def _coerce(value: object, hint: object, where: str) -> object:
    """Check `value` against the type hint and convert ints to floats where a float is wanted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            example = {str: '["a", "b"]', float: "[0.5, 1.0]"}.get(item, "[0, 1]")
            raise ValueError(f"{where} must be a list, got {value!r}; write e.g. {where.split('.')[-1]} = {example}")
        return [_coerce(v, item, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}" + _as_toml(value, "integer, e.g. 64"))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fix = _as_toml(value, "number, e.g. 0.001 or 1e-3 (a digit before the point)")
            raise ValueError(f"{where} must be a number, got {value!r}{fix}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}; quote it in TOML")
        return value
    raise ValueError(f"{where}: unsupported type {hint}")


def config_from_dict(raw: dict) -> Config:
    """Build a validated Config from nested dicts (as parsed from TOML)."""
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"unknown config section [{name}]; valid sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ValueError(f"[{name}] must be a table of keys, got {values!r}")
        section = getattr(cfg, name)
        hints = _section_types(section)
        for key, value in values.items():
            if key not in hints:
                raise ValueError(
                    f"unknown key '{key}' in [{name}]; valid keys: {', '.join(sorted(hints))}"
                )
            setattr(section, key, _coerce(value, hints[key], f"{name}.{key}"))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ValueError(f"{section}.{key} = {value!r} is not valid; choose one of {', '.join(choices)}")
    checks = [
        (cfg.data.sequence_length >= 2, "data.sequence_length must be >= 2: a window of one transition never "
                                         "shows the model a next state (the Markovian model is sequence_length = 2)"),
        (0.0 <= cfg.data.validation_fraction < 1.0, "data.validation_fraction must be in [0, 1)"),
        (0.0 < cfg.data.discount <= 1.0, "data.discount must be in (0, 1]"),
        (cfg.data.max_episodes >= 0, "data.max_episodes must be >= 0 (0 = all)"),
        (cfg.discretizer.n_bins >= 2, "discretizer.n_bins must be >= 2"),
        (cfg.model.n_layer >= 1 and cfg.model.n_head >= 1, "model.n_layer and model.n_head must be >= 1"),
        (cfg.model.n_head >= 1 and cfg.model.n_embd % cfg.model.n_head == 0,
         "model.n_embd must be divisible by model.n_head"),
        (cfg.model.attention != "window" or cfg.model.n_head < 1 or cfg.model.n_embd // cfg.model.n_head % 2 == 0,
         "model.attention = \"window\" needs an even head size n_embd / n_head (rotary positions turn channel "
         "pairs): change model.n_embd or model.n_head"),
        (min(cfg.model.action_weight, cfg.model.reward_weight, cfg.model.value_weight) >= 0,
         "model.action_weight, reward_weight and value_weight must be >= 0 (loss weights)"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.model.window_transitions >= 1, "model.window_transitions must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.learning_rate > 0, "train.learning_rate must be > 0"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.num_threads >= 0, "train.num_threads must be >= 0 (0 = torch's default)"),
        (min(cfg.train.max_steps, cfg.train.max_windows, cfg.train.epochs) >= 0,
         "train.max_steps, train.max_windows and train.epochs must be >= 0"),
        (sum(x > 0 for x in (cfg.train.max_steps, cfg.train.max_windows, cfg.train.epochs)) <= 1,
         "set one training length: train.max_steps, train.max_windows or train.epochs (set the others to 0)"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.eval_every >= 1, "train.eval_every must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.eval_windows >= 1, "train.eval_windows must be >= 1 (the validation windows scored each time)"),
        (cfg.train.grad_clip > 0, "train.grad_clip must be > 0 (the largest gradient norm)"),
        (0.0 <= cfg.train.final_lr_fraction <= 1.0, "train.final_lr_fraction must be in [0, 1]"),
        (0.0 <= cfg.train.warmup_fraction <= 1.0, "train.warmup_fraction must be in [0, 1]"),
        (cfg.plan.beam_width >= 1, "plan.beam_width must be >= 1"),
        (cfg.plan.horizon >= 1, "plan.horizon must be >= 1"),
        (cfg.plan.n_expand >= 1, "plan.n_expand must be >= 1"),
        (cfg.plan.max_context_transitions >= 2, "plan.max_context_transitions must be >= 2"),
        (cfg.plan.k_act is None or cfg.plan.k_act >= 1, "plan.k_act must be >= 1 (or none)"),
        (cfg.plan.cdf_act is None or 0.0 < cfg.plan.cdf_act <= 1.0, "plan.cdf_act must be in (0, 1] (or none)"),
        (cfg.plan.k_obs >= 1, "plan.k_obs must be >= 1"),
        (cfg.plan.plan_freq >= 1, "plan.plan_freq must be >= 1"),
        (cfg.plan.num_threads >= 0, "plan.num_threads must be >= 0 (0 = torch's default)"),
        (cfg.plan.penalty_lambda >= 0, "plan.penalty_lambda must be >= 0 (the weight of the mean NLL penalty)"),
        # (compare.tt_run's model is checked by compare, which ignores [model] then)
        (not cfg.plan.carry_context or cfg.model.attention == "window" or bool(cfg.compare.tt_run),
         "plan.carry_context = true needs model.attention = \"window\" (an absolute model re-encodes its crop); "
         "set plan.carry_context=false or none"),
        (cfg.plan.objective != "critic" or bool(cfg.plan.critic),
         "plan.objective = \"critic\" needs plan.critic = an IQL directory (trajformer iql CONFIG --out DIR)"),
    ]
    for section in ("train", "plan"):
        device = getattr(cfg, section).device
        checks.append((re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None,
                       f"{section}.device = {device!r} is not valid; use \"cpu\" or \"cuda\" (\"cuda:N\" for card N)"))
    ens = cfg.ensemble
    for name in ("members", "hidden", "layers", "batch_size", "max_epochs", "patience"):
        checks.append((getattr(ens, name) >= 1, f"ensemble.{name} must be >= 1"))
    checks.append((ens.learning_rate > 0 and ens.max_seconds >= 0 and ens.weight_decay >= 0,
                   "ensemble.learning_rate must be > 0, ensemble.max_seconds and ensemble.weight_decay >= 0"))
    mb = cfg.model_based
    for name in ("elites", "steps", "batch_size", "hidden", "rollout_every", "rollout_batch", "retain_rounds",
                 "mopo_rollout_length", "morel_rollout_length", "combo_rollout_length", "combo_actions"):
        checks.append((getattr(mb, name) >= 1, f"model_based.{name} must be >= 1"))
    for name in ("mopo_lambda", "morel_kappa", "combo_beta"):
        checks.append((getattr(mb, name) >= 0, f"model_based.{name} must be >= 0, got {getattr(mb, name)}"))
    for name in ("mopo_real_ratio", "morel_real_ratio", "combo_real_ratio", "morel_quantile"):
        checks.append((0.0 <= getattr(mb, name) <= 1.0, f"model_based.{name} must be in [0, 1]"))
    checks.append((mb.learning_rate > 0 and 0 < mb.discount <= 1 and 0 < mb.polyak <= 1,
                   "model_based.learning_rate must be > 0, discount and polyak in (0, 1]"))
    for section in ("train", "ensemble", "model_based"):
        seed = getattr(cfg, section).seed
        checks.append((seed >= 0, f"{section}.seed must be >= 0, got {seed}"))
    checks.append((cfg.data.split_seed is None or cfg.data.split_seed >= 0,
                   f"data.split_seed must be >= 0 (or none: train.seed), got {cfg.data.split_seed}"))
    cmp = cfg.compare
    unknown = [m for m in cmp.methods if m not in COMPARE_METHODS]
    checks += [
        (not unknown, f"compare.methods: unknown method {', '.join(map(repr, unknown))}; choose from "
                      f"{', '.join(COMPARE_METHODS)}"),
        (len(set(cmp.methods)) == len(cmp.methods) and bool(cmp.methods), "compare.methods must list each method once"),
        (min(cmp.episodes, cmp.num_envs, cmp.bc_steps, cmp.iql_steps) >= 1 and cmp.max_steps >= 0,
         "compare.episodes, num_envs, bc_steps and iql_steps must be >= 1, max_steps >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if isinstance(cfg.data.obs_dims, str):
        parse_slice(cfg.data.obs_dims)


def parse_slice(text: str) -> slice:
    """Parse 'start:stop' (either side optional) into a slice."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"data.obs_dims = {text!r} is not a slice; write e.g. \"0:45\" or a list [0, 1, 2]") from None
    return slice(start, stop)


def _parse_override_value(text: str) -> object:
    """Parse the right-hand side of --set as a TOML value, falling back to a bare string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a raw config dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r} is not of the form section.key=value (e.g. train.max_steps=100)")
        path, text = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"[{section}] must be a table of keys, not {table!r}; fix the config file")
        table[key] = _parse_override_value(text.strip())
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a directory; pass a TOML file such as configs/quickstart.toml")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; pass a TOML file such as configs/quickstart.toml")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid TOML ({err}); pass a TOML config file") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """Write the resolved config as TOML; None (a disabled option) is written as the string "none"."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
        lines.append("")
    return "\n".join(lines)

