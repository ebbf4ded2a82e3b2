"""`trajformer info`: what a run directory or a dataset holds, as readable text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from trajformer.config import Config, load_config
from trajformer.data import env_kwargs, return_stats
from trajformer.metrics import D4RL_REFERENCE, env_family, score_reference


def _reconstruction_table(names: list[str], errors: np.ndarray, n_real: np.ndarray, scale: np.ndarray) -> list[str]:
    lines = ["  dim  name        bins  mean |x - decode(encode(x))|  (/ std)"]
    for d, (name, err, nb, s) in enumerate(zip(names, errors, n_real, scale, strict=True)):
        lines.append(f"  {d:3d}  {name:<10} {nb:5d}  {err:12.5g}  ({err / s if s > 0 else 0.0:.4f})")
    return lines


def column_names(obs_dim: int, act_dim: int) -> list[str]:
    return [f"obs[{i}]" for i in range(obs_dim)] + [f"act[{i}]" for i in range(act_dim)] + ["reward", "value"]


def describe_run(run_dir: Path) -> str:
    """Dims, tokens, parameters, dataset and split, last validation losses of a run directory."""
    from trajformer.run import load_run, model_sha256

    run = load_run(run_dir)
    try:
        lines = _run_lines(run, run_dir)
        recon, mc = run.meta.get("discretizer_error"), run.model.config
        table = _reconstruction_table(column_names(mc.obs_dim, mc.act_dim), np.array(recon["mean_abs_error"]),
                                      np.array(recon["n_bins"]), np.array(recon["std"])) if recon else []
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{run_dir}/run.json lacks what info reads ({type(err).__name__}: {err}); retrain the run "
                         "with `trajformer train`, which writes it whole") from None
    try:
        env = run.meta["env"]
        # How rows written before 2026-12-07 (which do not name their reference) were scored: by the env family.
        label = "d4rl-v2" if env_family(env.get("id") or "") in D4RL_REFERENCE else "dataset"
        evaluation = _evaluation_lines(Path(run.path), model_sha256(run), env.get("max_episode_steps"), label)
    except (KeyError, TypeError, IndexError, ValueError) as err:  # ValueError: json's decode errors
        raise ValueError(f"{run_dir}/eval.json or eval.partial.json is damaged ({type(err).__name__}: {err}); delete "
                         "it and run `trajformer eval` again") from None
    return "\n".join(lines + evaluation + table)


def _run_lines(run, run_dir: Path) -> list[str]:
    from trajformer.run import read_metrics

    meta, cfg = run.meta, run.config
    mc = run.model.config
    lines = [
        f"run directory {run_dir}",
        f"  dataset       {meta['dataset_id']} (sha256 {meta['provenance']['dataset_sha256'][:12]})",
        f"  env           {meta['env'].get('id')} {json.dumps(meta['env'].get('kwargs', {}))}",
        f"  dims          obs {mc.obs_dim} (of {meta['raw_obs_dim']}), act {mc.act_dim}, "
        f"transition_dim {mc.transition_dim}",
        f"  tokens        {mc.n_bins} bins per dim, vocab {mc.vocab_size} (incl. stop), "
        f"window {cfg.data.sequence_length} transitions = {mc.block_size + 1} tokens",
        f"  model         {mc.n_layer} layers x {mc.n_head} heads x {mc.n_embd}, "
        f"{run.model.num_params(non_embedding=False):,} parameters ({run.model.num_params():,} non-embedding)",
        f"  split         {len(meta['split']['train_episodes'])} train / "
        f"{len(meta['split']['validation_episodes'])} validation episodes (seed {meta['split']['seed']})",
        f"  provenance    trajformer {meta['provenance']['trajformer']}, torch {meta['provenance']['torch']}, "
        f"git {meta['provenance']['git_commit'] or '-'}"
        f"{' with uncommitted changes' if meta['provenance'].get('git_dirty') else ''}",
    ]
    stats = meta.get("dataset_stats")
    if stats:
        lines.append(f"  data          {stats['episodes']} episodes, {stats['steps']} steps = "
                     f"{stats['steps'] * mc.transition_dim:,} tokens; return {stats['return_mean']:.2f} "
                     f"+- {stats['return_std']:.2f} (min {stats['return_min']:.2f}, max {stats['return_max']:.2f})")
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if rows:
        steps = [r["step"] for r in rows]
        val = [r for r in rows if "val_loss" in r]
        lines.append(f"  trained       {max(steps)} steps")
        if val:
            best = min(val, key=lambda r: r["val_loss"])
            parts = ", ".join(f"{k[4:]} {best[k]:.3f}" for k in ("val_obs", "val_action", "val_reward", "val_value"))
            lines.append(f"  best val loss {best['val_loss']:.4f} at step {best['step']} ({parts})")
    parent = meta.get("compute", {}).get("init_from")
    if parent:
        lines.append(f"  fine-tuned    from {parent['run']} (model.pt sha256 {parent['model_sha256'][:12]}, "
                     f"{parent.get('dataset_id')}, {parent.get('total_steps')} steps x {parent.get('batch_size')})")
    return lines


def _stderr(value: float | None) -> str:
    """A standard error, or "-" where one episode gives none."""
    return "-" if value is None else f"{value:.1f}"


def _evaluation_lines(run_dir: Path, weights: str, limit: int | None, label: str | None) -> list[str]:
    """What `trajformer eval` wrote: eval.json's settings (marked when other weights planned them) and the settings
    eval.partial.json holds under way, with the env steps left if no episode ends early (`limit` steps each), so a
    long evaluation can be followed from another shell."""
    lines = []
    done = run_dir / "eval.json"
    if done.is_file():
        record = json.loads(done.read_text())
        refs = [f"{name} {record[key]:.0f}" for name, key in (("data mean", "dataset_mean_return"),
                                                               ("BC", "bc_mean_return")) if record.get(key) is not None]
        lines.append(f"  evaluated     {record['episodes']} episodes (eval.json)" + (f"; {', '.join(refs)}" if refs
                                                                                    else ""))
        for name, r in record["settings"].items():
            plan = r["plan"]
            other = "" if r.get("model_sha256") == weights else "; other weights than model.pt's"
            normalized = (f" ({r.get('score_reference', label)} {r['normalized_score']:.1f})"
                          if r.get("normalized_score") is not None else "")
            lines.append(f"                {name}, beam {plan['beam_width']} / horizon {plan['horizon']} "
                         f"({plan['dtype']}): {r['mean_return']:.1f} +- {_stderr(r['stderr'])}{normalized}, "
                         f"{r['seconds_per_step']:.2f} s per env step{other}")
    partial = run_dir / "eval.partial.json"
    for r in json.loads(partial.read_text())["runs"] if partial.is_file() else []:
        finished, under_way = r["episodes"], r.get("in_progress", [])
        at = sorted(len(u["actions"]) for u in under_way)
        mean = f" (mean {np.mean([v[0] for v in finished.values()]):.1f})" if finished else ""
        mid = f", {len(under_way)} mid-way at steps {at[0]}-{at[-1]}" if at else ""
        per_step = f", {r['seconds'] / r['steps']:.2f} s per env step" if r["steps"] else ""
        left = ""
        if limit:
            steps_left = (r["episodes_total"] - len(finished) - len(at)) * limit + sum(limit - a for a in at)
            left = f"; at most {steps_left:,} left" + (f" (~{steps_left * r['seconds'] / r['steps'] / 3600:.1f} h of "
                                                        "one worker at this pace)" if r["steps"] else "")
        lines.append(f"  under way     beam {r['setting']['beam_width']} / horizon {r['setting']['horizon']} "
                     f"({r['dtype']}): {len(finished)} of {r['episodes_total']} episodes done{mean}{mid}; "
                     f"{r['steps']:,} env steps{per_step}{left} (eval.partial.json; the same `trajformer eval` "
                     "goes on)")
    return lines


def _reference_line(data) -> str:
    """The returns a score of this dataset's env is normalised with: the same as `trajformer plan` uses."""
    meta = {"ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score}
    reference, label = score_reference(data.env_spec.get("id") or "", meta, env_kwargs(data.env_spec),
                                       data.env_spec.get("max_episode_steps"))
    if reference is None:
        return "no reference returns: scores are not normalised"
    return f"normalised scores use random {reference[0]:.2f} / expert {reference[1]:.2f} ({label})"


def describe_dataset(dataset_id: str, cfg: Config) -> str:
    """Episodes, steps, returns and discretizer reconstruction error per dimension of a dataset."""
    from trajformer.train import prepare

    prep = prepare(cfg, dataset_id)
    data = prep.data
    stats = return_stats(data)
    joined = np.concatenate(prep.transitions)
    disc = prep.discretizer
    T = data.transition_dim
    n_windows = len(prep.train_windows) + (len(prep.val_windows) if prep.val_windows else 0)
    lines = [
        f"dataset {dataset_id} (sha256 {data.sha256[:12]})",
        f"  env           {data.env_spec.get('id')} {json.dumps(data.env_spec.get('kwargs', {}))}",
        f"  dims          obs {data.obs_dim} (of {data.raw_obs_dim}), act {data.act_dim}, transition_dim {T}",
        f"  episodes      {stats['episodes']} ({stats['terminated_episodes']} terminated), {stats['steps']} steps, "
        f"mean length {stats['length_mean']:.1f}",
        f"  returns       mean {stats['return_mean']:.2f} +- {stats['return_std']:.2f} "
        f"(min {stats['return_min']:.2f}, max {stats['return_max']:.2f})",
        f"  reference     {_reference_line(data)}",
        f"  tokens        {stats['steps'] * T:,} tokens, {n_windows:,} windows of "
        f"{cfg.data.sequence_length} transitions",
        f"  discretizer   {cfg.discretizer.kind}, {cfg.discretizer.n_bins} bins",
    ]
    errors = disc.reconstruction_error(joined)
    lines += _reconstruction_table(column_names(data.obs_dim, data.act_dim), errors, disc.n_real, joined.std(axis=0))
    return "\n".join(lines)


def describe(target: str, config: str | None = None, overrides: list[str] | None = None) -> str:
    """Describe `target`: a run directory (or a shipped model's name) if it is one, else a dataset id. A directory
    that holds no run is an error naming the run it may mean, not a dataset lookup."""
    from trajformer.run import find_run, is_run

    if is_run(target) or Path(target).is_dir():
        if config is not None or overrides:
            raise ValueError(f"--config and --set apply to datasets; {target} is described with its own config.toml")
        return describe_run(find_run(target))
    cfg = load_config(config, overrides)
    try:
        return describe_dataset(target, cfg)
    except FileNotFoundError as err:
        if target.startswith((".", "/", "~")) or ("/" in target and not re.search(r"-v\d+$", target)):
            # A path (runs/typo), not an id (NAMESPACE/NAME-vN): say it is no run, then the failed dataset lookup.
            raise FileNotFoundError(f"{target} is not a run directory (no such directory) nor a dataset ({err})") \
                from None
        raise
