"""The README's per-env table of the shipped locomotion models, from each one's eval.json (`trajformer eval`) and
run.json: the dataset's mean return, BC, TT at beam 32 / horizon 5 and at the official setting, the paper's D4RL
figure for orientation (other data: D4RL v2, ~50M windows, 128/15), and the compute the model got.

    python scripts/models_table.py            # prints the table and rewrites the README block between markers
"""

from __future__ import annotations

import json
from pathlib import Path

from readme_block import replace_block

from trajformer.predict import transformer_compute
from trajformer.run import load_run

ROOT = Path(__file__).resolve().parent.parent
# The TT paper's Table 1 (quantile discretization), D4RL-normalised, for orientation only.
PAPER = {"hopper-medium": "61.1 ± 3.6", "walker2d-medium": "79.0 ± 2.8", "halfcheetah-medium": "46.9 ± 0.4"}
MARK = "<!-- models-table -->"


def fmt(setting: dict | None, show_plan: bool = False, missing: str = "not run yet") -> str:
    if not setting:
        return missing
    s = setting
    plan = f"{s['plan']['beam_width']}/{s['plan']['horizon']}: " if show_plan else ""
    lengths = s.get("lengths")  # recorded since 2026-11-30; a termination ends an episode early
    fell = sum(n < 1000 for n in lengths or [])
    falls = ("; episode lengths not recorded" if lengths is None else
             f"; {fell} of {len(lengths)} ended early" if fell else "")
    return (f"{plan}{s['mean_return']:.0f} ± {s['stderr']:.0f} ({s['normalized_score']:.1f}; "
            f"{s['seconds_per_step']:.2f} s/step{falls})")


def under_way(model_dir: Path) -> str:
    """An evaluation still running (or stopped, to resume): how far its eval.partial.json has got."""
    path = model_dir / "eval.partial.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    return "; ".join(f"{r['setting']['beam_width']}/{r['setting']['horizon']} under way: {len(r['episodes'])} of "
                     f"{r['episodes_total']} episodes done, {len(r.get('in_progress', []))} mid-way "
                     f"({r['steps']:,} env steps)" for r in runs) or "not run yet"


def compute(model_dir: Path) -> str:
    meta = json.loads((model_dir / "run.json").read_text())
    c = meta["compute"]
    spent = transformer_compute(load_run(model_dir))
    approx = "" if spent["train_seconds_source"] == "logged" else "~"
    when = f", {approx}{spent['train_seconds'] / 60:.0f} min" if spent["train_seconds"] else ""
    threads = sorted({s["threads"] for s in c.get("sessions", [])} | {c["threads"]})  # a resume may change them
    return (f"{c['total_steps'] * c['batch_size']:,} windows, {c['device']} {c['dtype']}, "
            f"{'-'.join(map(str, threads))} thread(s){when}")


def bc_cell(ev: dict) -> str:
    """BC's return: the mean over its training seeds, with each seed's (eval.json before 2026-12-06: one seed)."""
    seeds = ev.get("bc") or []
    if ev["bc_mean_return"] is None:
        return "–"
    each = (f" (seeds {', '.join(str(b['seed']) for b in seeds)}: "
            f"{', '.join(format(b['mean_return'], '.0f') for b in seeds)})")
    return f"{ev['bc_mean_return']:.0f}" + (each if len(seeds) > 1 else "")


def table() -> str:
    lines = ["| env | dataset mean | BC | TT 32/5 (D4RL-norm.; s/step) | TT official setting | paper TT (D4RL) | "
             "training |", "|---|---|---|---|---|---|---|"]
    for name in PAPER:
        model_dir = ROOT / "pretrained" / "models" / name
        if not (model_dir / "eval.json").is_file():
            continue
        ev = json.loads((model_dir / "eval.json").read_text())
        lines.append(f"| {name} ({ev['episodes']} episodes) | {ev['dataset_mean_return']:.0f} | "
                     f"{bc_cell(ev)} | {fmt(ev['settings'].get('32x5'))} | "
                     f"{fmt(ev['settings'].get('official'), True, under_way(model_dir))} | {PAPER[name]} | "
                     f"{compute(model_dir)} |")
    return "\n".join(lines)


def main() -> None:
    text = table()
    print(text)
    replace_block(MARK, text)


if __name__ == "__main__":
    main()
