"""The README's main job, offline: dataset (made once) → train a small model → plan a short episode
with it and with the best Hopper model we ship (pretrained/models/hopper-medium).

Every stage is a library call the CLI also exposes (`collect`, `train`, `plan`); this module only chains
them on the embedded defaults: the shipped Hopper behaviour policy and configs/quickstart.toml.
"""

from __future__ import annotations

from pathlib import Path

from trajformer.behavior import BEHAVIOR_DIR
from trajformer.collect import collect
from trajformer.config import load_config
from trajformer.data import is_local_dataset
from trajformer.files import save_json, shipped
from trajformer.planner import plan_config
from trajformer.rollout import evaluate, report
from trajformer.run import load_run, read_metrics
from trajformer.train import RESUMABLE_KEYS, config_changes, train, trained_steps

CONFIG = shipped("configs") / "quickstart.toml"
PRETRAINED = shipped("pretrained") / "models" / "hopper-medium"
POLICY = "hopper-sac-0175k"  # the shipped D4RL-style "medium" Hopper policy (pretrained/README.md)


def quickstart(out_dir: str | Path = "runs/quickstart", steps: int = 20_000, plan_steps: int = 100,
               overrides: list[str] | None = None) -> dict:
    """Run the whole pipeline on the embedded defaults; returns a summary dict (also quickstart.json)."""
    out_dir = Path(out_dir)
    cfg = load_config(CONFIG, overrides or [])
    for flag, value in (("--steps", steps), ("--plan-steps", plan_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    run_dir = out_dir / "run"
    if (run_dir / "config.toml").is_file():  # a run made earlier is reused: it must be the run these settings make
        changed = [k for k in config_changes(load_config(run_dir / "config.toml"), cfg) if k not in RESUMABLE_KEYS]
        if changed:
            raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}); drop those --set "
                             "or choose another --out")
    progress = trained_steps(run_dir)  # a damaged run directory is refused before the dataset step
    dataset_id = cfg.data.dataset
    if is_local_dataset(dataset_id):
        print(f"[1/4] dataset {dataset_id}: already made")
    else:
        print(f"[1/4] dataset {dataset_id}: collecting {steps} Hopper-v5 steps with {POLICY}")
        collect("Hopper-v5", POLICY, steps=steps, dataset_id=dataset_id, seed=0,
                description=f"trajformer quickstart: {steps} Hopper-v5 steps from the shipped "
                            f"{POLICY} SAC policy (stochastic actions), seed 0.")

    if progress is not None and progress[0] >= progress[1]:
        print(f"[2/4] training {run_dir}: already trained ({progress[1]} steps)")
    else:
        print(f"[2/4] training {run_dir}" + (f" (resuming at step {progress[0]})" if progress else ""))
        train(cfg, run_dir, resume=progress is not None)

    plans = {}
    for step, name, directory in ((3, "this run", run_dir), (4, "shipped model hopper-medium", PRETRAINED)):
        if not (directory / "run.json").exists():
            continue
        run = load_run(directory)
        # Each model plans with its own [plan], and the --set plan.* given here on top (a reused run too).
        plan_cfg = plan_config(run, [o for o in overrides or [] if o.strip().startswith("plan.")])
        print(f"[{step}/4] planning a {plan_steps}-step Hopper-v5 episode with {name} (beam "
              f"{plan_cfg.beam_width}, horizon {plan_cfg.horizon})")
        plans[str(directory)] = evaluate(run, plan_cfg, episodes=1, max_steps=plan_steps, seed=0)
        print(report(plans[str(directory)]))
    rows = read_metrics(run_dir / "metrics.jsonl")
    best = min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"], default={})  # none: no validation
    summary = {
        "dataset": dataset_id, "run_dir": str(run_dir), "loss_plot": str(run_dir / "loss.png"),
        "best_val_loss": best.get("val_loss"), "best_step": best.get("step"), "plans": plans,
        "behavior_policy": str(BEHAVIOR_DIR / f"{POLICY}.pt"),
    }
    save_json(out_dir / "quickstart.json", summary)
    print(f"run directory {run_dir} (loss plot {run_dir / 'loss.png'}); summary {out_dir / 'quickstart.json'}")
    return summary

