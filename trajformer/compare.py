"""`trajformer compare`: TT beside BC, IQL, MOPO, MOReL, COMBO and TT with IQL's critic, trained on one dataset
(the same episode split, seeded by data.split_seed, or train.seed where that is none) and evaluated with one protocol
(DESIGN.md §6, §9). TT, BC and IQL train with train.seed; the ensemble with ensemble.seed and MOPO, MOReL and COMBO
with model_based.seed (a seed sweep sets all three, and data.split_seed to keep one split).

Everything that can be refused is checked before the first method trains: the methods (config validation),
the dataset (continuous Box actions, no NaN: data.load_episodes), TT's training length, the ensemble's validation
episodes, a reused ensemble's data and dims, a reused TT run's dataset, split and observation dims, and on --resume
that compare.json was written with this config and data (its `settings`) and that a kept IQL or ensemble was
trained on this data and split with this config's settings.
Then each method trains into OUT/<method>/ (the ensemble once, into OUT/ensemble/, shared by MOPO, MOReL and COMBO;
tt-critic plans with the TT run and the IQL critic) and is evaluated on episodes seeded 0..N-1. OUT/compare.json
holds per method returns, mean, stderr, normalized, train_seconds and steps; OUT/compare.md the table;
OUT/compare.png a bar plot with standard-error bars. compare.json is written after every method, with the training
time of each trained part, so `--resume` continues a stopped comparison.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from trajformer.baselines.bc import BCConfig, load_bc, train_bc
from trajformer.baselines.iql import IQLConfig, check_iql, load_iql, train_iql
from trajformer.baselines.model_based import METHODS as MODEL_BASED
from trajformer.baselines.model_based import check_ensemble, load_model_based, provide_ensemble, train_model_based
from trajformer.baselines.model_env import termination_rule
from trajformer.config import Config, carries
from trajformer.data import describe_split, load_episodes, return_stats, same_split, split_record
from trajformer.ensemble import load_ensemble, validation_split
from trajformer.files import load_json, save_json, save_text
from trajformer.rollout import evaluate, evaluate_agent
from trajformer.run import Run, load_run, model_sha256, read_metrics
from trajformer.train import check_training_length, train

LABELS = {"tt": "TT (transformer's value)", "bc": "BC", "iql": "IQL", "mopo": "MOPO", "morel": "MOReL",
          "combo": "COMBO", "tt-critic": "TT + IQL critic"}


def compare(cfg: Config, out_dir: str | Path, dataset_id: str | None = None, resume: bool = False,
            progress: bool = True) -> dict:
    """Train and evaluate every method in cfg.compare.methods on one dataset; returns compare.json's content.
    With `resume`, rows already in OUT/compare.json are kept and trained parts (TT run, IQL, ensemble, and a BC or
    model-based policy whose row a stop left unwritten) reused."""
    if dataset_id:
        cfg.data.dataset = dataset_id
    cmp, out_dir = cfg.compare, Path(out_dir)
    prior: dict = {}
    if resume and (out_dir / "compare.json").is_file():
        prior = load_json(out_dir / "compare.json", "compare into a new --out directory, or restore it")
    elif not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pass --resume to continue its comparison, or compare into "
                              "a new --out directory")
    data = load_episodes(cfg.data.dataset, cfg.data)  # refuses missing, non-Box or NaN data before any training
    if prior and (prior["dataset_id"], prior["episodes"]) != (data.dataset_id, cmp.episodes):
        raise ValueError(f"--resume: {out_dir} compared on {prior['dataset_id']} over {prior['episodes']} episodes, "
                         f"not {data.dataset_id} over {cmp.episodes}; resume with the same dataset and episodes")
    reused = load_run(cmp.tt_run) if cmp.tt_run else None
    if reused and cfg.plan.carry_context and reused.model.config.attention != "window":
        raise ValueError(f"plan.carry_context = true needs a window model; compare.tt_run {cmp.tt_run} is an "
                         "absolute one: set plan.carry_context=false or none")
    settings = _settings(cfg, data, reused)
    if prior:  # every kept row (and trained part) comes from one config and one copy of the data
        if "settings" not in prior:
            raise ValueError(f"--resume: {out_dir}/compare.json records no settings (written before they were), so "
                             "its rows cannot be shown to share this config; compare into a new --out directory")
        changed = _differences(prior["settings"], settings)
        if changed:
            raise ValueError(f"--resume: {out_dir} was compared with other settings ({', '.join(changed[:6])}); resume "
                             "with its own config and data, or compare into a new --out directory")
    if any(m in ("tt", "tt-critic") for m in cmp.methods) and not cmp.tt_run:
        check_training_length(cfg)
    if any(m in MODEL_BASED for m in cmp.methods) and not cfg.model_based.ensemble:
        validation_split(cfg, len(data.episodes))
    if cfg.model_based.ensemble and any(m in MODEL_BASED for m in cmp.methods):
        check_ensemble(load_ensemble(cfg.model_based.ensemble), data)
    if reused:
        if reused.meta["dataset_id"] != data.dataset_id:
            raise ValueError(f"compare.tt_run {cmp.tt_run} was trained on {reused.meta['dataset_id']}, not "
                             f"{data.dataset_id}; compare on its dataset or drop compare.tt_run")
        # The same split and observation dims as every other method (and as tt-critic's IQL critic).
        mine = {**{f"data.{k}": getattr(cfg.data, k) for k in ("validation_fraction", "max_episodes", "obs_dims")},
                "data.split_seed (or train.seed)": cfg.split_seed}
        theirs = {**{f"data.{k}": getattr(reused.config.data, k) for k in ("validation_fraction", "max_episodes",
                                                                             "obs_dims")},
                  "data.split_seed (or train.seed)": reused.config.split_seed}
        changed = [k for k in mine if mine[k] != theirs[k]]
        ours = split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)
        if not changed and not same_split(reused.meta["split"], ours):  # the same settings on another copy
            raise ValueError(f"compare.tt_run {cmp.tt_run} was trained on another episode split "
                             f"({describe_split(reused.meta['split'])}) than this data's ({describe_split(ours)}): "
                             "compare on the data it was trained on, or drop compare.tt_run")
        if changed:
            raise ValueError(f"compare.tt_run {cmp.tt_run} was trained with other {', '.join(changed)} than this "
                             "config's (another split or observation): set them to the run's, or drop compare.tt_run")
    if any(m in ("iql", "tt-critic") for m in cmp.methods) and (out_dir / "iql" / "iql.json").is_file():
        # A kept IQL is refused now, not after hours of other methods: from before its current policy head (by
        # load_iql), or trained for another budget or seed than this config's (its rows would be mislabelled).
        meta = load_iql(out_dir / "iql")[1]
        kept = meta["config"]
        if (kept["steps"], kept["seed"]) != (cmp.iql_steps, cfg.train.seed):
            raise ValueError(f"--resume: {out_dir / 'iql'} was trained for {kept['steps']} steps with seed "
                             f"{kept['seed']}, not compare.iql_steps={cmp.iql_steps} with train.seed={cfg.train.seed};"
                             f" resume with its own config, or delete {out_dir / 'iql'} to train it again")
        check_iql(out_dir / "iql", meta, data, cfg, IQLConfig(steps=cmp.iql_steps, seed=cfg.train.seed))
    if any(m in MODEL_BASED for m in cmp.methods) and not cfg.model_based.ensemble and \
            (out_dir / "ensemble" / "ensemble.json").is_file():
        check_ensemble(load_ensemble(out_dir / "ensemble"), data, cfg)  # a kept one: this data, split and settings
    episodes, num_envs = cmp.episodes, min(cmp.num_envs, cmp.episodes)
    max_steps = cmp.max_steps or None
    results: dict[str, dict] = dict(prior.get("methods", {}))  # rows of methods not asked for now are kept too
    dataset_mean = return_stats(data)["complete_return_mean"]
    seconds: dict[str, float | None] = dict(prior.get("seconds", {}))  # training time of each trained part

    def timed(key: str, fn):  # a part trained now (never resumed mid-way): its time replaces any earlier one
        start = time.perf_counter()
        value = fn()
        seconds[key] = time.perf_counter() - start
        return value

    def tt_run():
        if cmp.tt_run:  # reused: its training time is not ours to count
            seconds["tt"] = None
            return load_run(cmp.tt_run)
        path = out_dir / "tt"
        done = (path / "model.pt").is_file() and (path / "run.json").is_file() and "tt" in seconds
        if not done:  # a run interrupted by a stopped comparison continues from its checkpoint
            train(cfg, path, resume=(path / "checkpoint.pt").is_file(), progress=progress)
            # Its own log's training time, summed over resumes (timing the call would count ~0 s for a run that
            # had finished when the comparison stopped).
            seconds["tt"] = max((row.get("seconds", 0.0) for row in read_metrics(path / "metrics.jsonl")), default=0)
        return load_run(path)

    def iql_dir() -> Path:
        path = out_dir / "iql"
        if (path / "iql.json").is_file():  # trained earlier in this comparison
            seconds.setdefault("iql", load_json(path / "iql.json", f"delete {path} to train it again")
                               ["training"]["seconds"])
        else:
            timed("iql", lambda: train_iql(cfg, path, IQLConfig(steps=cmp.iql_steps, seed=cfg.train.seed),
                                           progress=progress))
        return path

    def ensemble_dir() -> Path:
        path, trained = provide_ensemble(cfg, data, out_dir / "ensemble", cfg.model_based.ensemble, progress)
        seconds["ensemble"] = trained  # its training time, as recorded by it (None: a given one)
        return path

    def kept(record: Path, key: str, config: dict, ensemble: str | None = None) -> bool:
        """Whether a baseline left whole by a comparison stopped before its row (its .json is written last) was
        trained with `config` on this data (its digest), split (and ensemble, under today's model-env termination
        rule): then it is evaluated, not trained again."""
        if not record.is_file():
            return False
        meta = load_json(record, f"delete {record.parent} to train it again")
        rule = termination_rule(data.env_spec, data.obs_indices, data.raw_obs_dim)[1] if ensemble else None
        if (meta["config"], meta.get("dataset_sha256"), meta.get("ensemble", {}).get("path"),
                meta.get("termination_rule")) != (config, data.sha256, ensemble, rule) or not same_split(
                meta["split"], split_record(len(data.episodes), cfg.data.validation_fraction, cfg.split_seed)):
            return False
        seconds.setdefault(key, meta["training"]["seconds"])
        print(f"    trained earlier into {record.parent}: evaluating it", flush=True)
        return True

    def summary(rows: dict) -> dict:
        order = [*cmp.methods, *(m for m in rows if m not in cmp.methods)]
        return {"dataset_id": data.dataset_id, "env": data.env_spec, "episodes": episodes, "max_steps": max_steps,
                "dataset_mean_return": dataset_mean, "seconds": seconds, "plan": dataclasses.asdict(cfg.plan),
                "settings": settings, "methods": {m: rows[m] for m in order if m in rows},
                "complete": all(m in rows for m in cmp.methods)}

    for i, method in enumerate(cmp.methods, 1):
        if method in results:
            print(f"[{i}/{len(cmp.methods)}] {LABELS[method]}: kept from {out_dir}/compare.json", flush=True)
            continue
        print(f"[{i}/{len(cmp.methods)}] {LABELS[method]}", flush=True)
        if method in ("tt", "tt-critic"):
            run = tt_run()
            # The comparison's [plan] (not the run's own, which a reused run brings): one setting for both rows.
            plan = dataclasses.replace(cfg.plan, objective="critic", critic=str(iql_dir())) \
                if method == "tt-critic" else cfg.plan
            # A model trained on shorter windows plans with all they hold.
            plan = dataclasses.replace(plan, max_context_transitions=run.model.config.fit_context(
                plan.max_context_transitions))
            record = evaluate(run, plan, episodes=episodes, num_envs=num_envs,
                              max_steps=max_steps, progress=progress)
            train_seconds = None if seconds["tt"] is None else \
                seconds["tt"] + (seconds["iql"] if method == "tt-critic" else 0.0)
            steps = run.meta.get("compute", {}).get("total_steps")
        elif method == "bc":
            bc = BCConfig(steps=cmp.bc_steps, seed=cfg.train.seed)
            if not kept(out_dir / "bc" / "bc.json", "bc", dataclasses.asdict(bc)):
                timed("bc", lambda b=bc: train_bc(cfg, out_dir / "bc", b, progress=progress))
            agent, meta = load_bc(out_dir / "bc")
            record = evaluate_agent(agent, meta["env"], episodes, num_envs, max_steps=max_steps, meta=meta,
                                    progress=progress)
            train_seconds, steps = seconds["bc"], cmp.bc_steps
        elif method == "iql":
            agent, meta = load_iql(iql_dir())
            record = evaluate_agent(agent, meta["env"], episodes, num_envs, max_steps=max_steps, meta=meta,
                                    progress=progress)
            train_seconds, steps = seconds["iql"], cmp.iql_steps
        else:
            ens = ensemble_dir()
            if not kept(out_dir / method / f"{method}.json", method, dataclasses.asdict(cfg.model_based), str(ens)):
                timed(method, lambda m=method, e=ens: train_model_based(m, cfg, out_dir / m, e, progress=progress))
            agent, meta = load_model_based(out_dir / method, method)
            record = evaluate_agent(agent, meta["env"], episodes, num_envs, max_steps=max_steps, meta=meta,
                                    progress=progress)
            # The ensemble's training counts towards every method that plans or optimises inside it.
            train_seconds, steps = seconds[method] + (seconds.get("ensemble") or 0.0), cfg.model_based.steps
        results[method] = {"label": LABELS[method], "returns": record["returns"], "mean": record["mean_return"],
                           "stderr": record["stderr"], "normalized": record["normalized_score"],
                           "normalized_stderr": record["normalized_stderr"],
                           "train_seconds": None if train_seconds is None else round(train_seconds, 1),
                           "steps": steps, "seconds_per_step": record["seconds_per_step"]}
        print(f"    {LABELS[method]}: {_pm(results[method]['mean'], results[method]['stderr'])}", flush=True)
        save_json(out_dir / "compare.json", summary(results))  # after every method: a stopped comparison resumes
    out = summary(results)
    save_json(out_dir / "compare.json", out)
    save_text(out_dir / "compare.md", markdown_table(out))
    bar_plot(out, out_dir / "compare.png")
    return out


def _settings(cfg: Config, data, reused: Run | None) -> dict:
    """What every row of a comparison depends on: the whole config but the method list and how the work is spread
    (threads, envs stepped together), the data's digest, and a reused TT run's weights; as compare.json holds it."""
    settings = dataclasses.asdict(cfg)
    for section, key in (("compare", "methods"), ("compare", "num_envs"), ("train", "num_threads"),
                         ("plan", "num_threads")):
        settings[section].pop(key)
    settings["dataset_sha256"] = data.sha256
    attention = cfg.model.attention
    if reused:  # compare.tt_run, loaded
        settings["tt_run_model_sha256"], attention = model_sha256(reused), reused.model.config.attention
    # The TT rows' search: a window model's carried context is another one (none, as before the option, if fresh).
    settings["plan"]["carry_context"] = True if carries(cfg.plan, attention) else None
    return json.loads(json.dumps(settings))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _pm(mean: float | None, stderr: float | None, digits: int = 1) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr is not None else "")


def markdown_table(out: dict) -> str:
    """The comparison as a markdown table: return and normalised score (± standard error), training cost."""
    mean = _pm(out["dataset_mean_return"], None)
    lines = [f"Dataset `{out['dataset_id']}` (mean return over its complete episodes {mean}); "
             f"{out['episodes']} episodes each, seeds 0..{out['episodes'] - 1}.", "",
             "| method | return | normalised | training (s) | steps |", "|---|---|---|---|---|"]
    for r in out["methods"].values():
        lines.append(f"| {r['label']} | {_pm(r['mean'], r['stderr'])} | {_pm(r['normalized'], r['normalized_stderr'])} "
                     f"| {'reused' if r['train_seconds'] is None else round(r['train_seconds'])} | {r['steps']} |")
    return "\n".join(lines) + "\n"


def bar_plot(out: dict, path: Path) -> Path:
    """compare.png: mean return per method with standard-error bars, the dataset's mean as a line."""
    from trajformer.plots import plt, save_figure

    methods = list(out["methods"].values())
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.5))
    means = [m["mean"] for m in methods]
    errors = [m["stderr"] or 0.0 for m in methods]
    ax.bar(np.arange(len(methods)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    if out["dataset_mean_return"] is not None:  # None: the data has no complete episode
        ax.axhline(out["dataset_mean_return"], color="black", ls="--", lw=1, label="dataset mean")
    ax.set_xticks(np.arange(len(methods)), [m["label"] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="return", title=out["dataset_id"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
