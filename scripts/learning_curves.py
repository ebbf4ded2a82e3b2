"""Learning curves of the runs under runs/curves/ (scripts/learning_curves.sh): a PNG and a markdown table.

    python scripts/learning_curves.py [--runs runs/curves] [--out benchmarks/learning_curves.png]

    python scripts/learning_curves.py --runs runs/curves-walker2d --out benchmarks/learning_curves_walker2d.png
        (drop0-250k, drop0-1m and drop0-4m in runs/curves-walker2d; README says where each comes from)

Per run: validation cross-entropy per token type against training target tokens (compute), the final values,
the training wall-clock (from the logged throughput, on a shared machine) and the planned return at beam 32,
horizon 5 (mean ± standard error over its episodes, seeds 0..N-1), from `plan-32x5.json` or the evaluation
protocol's `eval.json` beside the run. Each run is validated on windows of its own length;
scripts/compare_models.py scores runs on the same windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trajformer.run import read_metrics

TYPES = ("obs", "action", "reward", "value")


def read(run: Path) -> dict:
    rows = read_metrics(run / "metrics.jsonl")
    meta = json.loads((run / "run.json").read_text())
    batch = meta.get("compute", {}).get("batch_size") or 64
    block = meta["model"]["block_size"]
    seconds, last = 0.0, 0
    for r in rows:
        if "tokens_per_s" in r:
            seconds += (r["step"] - last) * batch * block / r["tokens_per_s"]
            last = r["step"]
    val = [r for r in rows if "val_loss" in r]
    plan = None
    if (run / "plan-32x5.json").is_file():
        plan = json.loads((run / "plan-32x5.json").read_text())
    elif (run / "eval.json").is_file():
        plan = json.loads((run / "eval.json").read_text())["settings"].get("32x5")
    seq = meta["model"]["block_size"] + 1
    name = run.name + (f" (val: windows of {seq // (meta['transition_dim'])})" if seq // meta["transition_dim"] != 5
                       else "")
    return {"name": name, "val": val, "batch": batch, "block": block, "seconds": seconds, "steps": last,
            "dtype": meta.get("compute", {}).get("dtype", "?"),
            "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["runs/curves"],
                        help="run directories, or folders of them")
    parser.add_argument("--out", default="benchmarks/learning_curves.png")
    args = parser.parse_args()
    dirs = [p for d in map(Path, args.runs) for p in ([d] if (d / "metrics.jsonl").is_file() else sorted(d.iterdir()))]
    runs = [read(p) for p in dirs if (p / "metrics.jsonl").is_file()]
    runs = [r for r in runs if r["val"]]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    for r in runs:
        tokens = [v["step"] * r["batch"] * r["block"] for v in r["val"]]
        for ax, key in zip(axes, ("val_loss", *(f"val_{t}" for t in TYPES)), strict=True):
            ax.plot(tokens, [v[key] for v in r["val"]], marker=".", label=r["name"])
            ax.set_title(key.replace("_", " "))
            ax.set_xscale("log")
            ax.set_xlabel("training target tokens")
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation cross-entropy (nats)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}\n")
    print("| run | windows | dtype | wall min (shared CPU) | val loss | obs | action | reward | value "
          "| return (32/5) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        last = r["val"][-1]
        plan = r["plan"]
        ret = f"{plan['mean_return']:.0f} ± {plan['stderr']:.0f} ({len(plan['returns'])} ep)" if plan else ""
        print(f"| {r['name']} | {r['steps'] * r['batch']:,} | {r['dtype']} | {r['seconds'] / 60:.1f} | "
              f"{last['val_loss']:.3f} | " + " | ".join(f"{last[f'val_{t}']:.3f}" for t in TYPES) + f" | {ret} |")


if __name__ == "__main__":
    main()
