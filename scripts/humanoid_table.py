"""The README's humanoid prediction tables, from `trajformer predict` records: the shipped transformer against the
ensemble (teacher-forced error for each greedy decode and each model's sample mean, open-loop log-likelihoods),
and the paper's ablations beside the run they were trained alongside, at one budget.

    python scripts/humanoid_table.py [MAIN_JSON [ABLATIONS_JSON]]
      # defaults notebooks/figures/long_horizon/predict.json (the notebook's, the shipped model) and
      # notebooks/figures/ablations/predict.json (scripts/humanoid_models.sh); prints both tables and rewrites
      # the README blocks between their markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from readme_block import replace_block

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "notebooks" / "figures"
MARK, ABLATION_MARK = "<!-- humanoid-table -->", "<!-- humanoid-ablations -->"
DECODES = ("argmax", "expectation", "median")


def row(label: str, values: list[float | None]) -> str:
    return f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |"


def header(steps: list[str]) -> list[str]:
    return ["| step | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]


def decode_errors(summary: list[dict], how: str) -> list[float | None]:
    """The full run's teacher-forced error per reported step under one greedy decode."""
    key = "transformer_error" + ("" if how == "argmax" else f"_{how}")
    return [s.get(key) for s in summary]


def main_table(record: dict) -> str:
    """The transformer's decodes and sample mean against the ensemble's, then the open-loop likelihoods."""
    steps = list(record["summary"])
    summary = [record["summary"][s] for s in steps]
    lines = header(steps)
    for how in DECODES:
        lines.append(row(f"transformer error, {how} decode", decode_errors(summary, how)))
    lines.append(row("ensemble error", [s["ensemble_error"] for s in summary]))
    for name in ("transformer", "ensemble"):
        if f"{name}_error_sample_mean" in summary[0]:
            lines.append(row(f"{name} error, mean of {record['config']['samples']} sampled rollouts",
                             [s[f"{name}_error_sample_mean"] for s in summary]))
    lines.append(row("transformer, open-loop log-lik.", [s["transformer_loglik"] for s in summary]))
    lines.append(row("ensemble, open-loop log-lik.", [s["ensemble_loglik"] for s in summary]))
    lines.append(row("discrete oracle", [s["oracle_loglik"] for s in summary]))
    return "\n".join(lines)


def ablation_table(record: dict) -> str:
    """Each ablation's teacher-forced error beside the full run's on the same dims (argmax and median decodes)."""
    steps = list(record["summary"])
    summary = [record["summary"][s] for s in steps]
    lines = header(steps)
    for how in ("argmax", "median"):
        lines.append(row(f"full run, {how} decode", decode_errors(summary, how)))
    for name, ab in record["teacher_forced"].get("ablations", {}).items():
        dims = len(ab["obs_dims"])
        what = f"{ab['context_transitions']}-transition windows, {dims} obs dims"
        for how in ("argmax", "median"):
            by = ab.get("decodes", {"argmax": ab}).get(how)
            if by is None:
                continue
            error = by["error"]["mean"]
            lines.append(row(f"ablation {name} ({what}), {how} decode", [error[int(s) - 1] for s in steps]))
            if set(ab["obs_dims"]) < set(record["config"]["obs_dims"]):  # a subset: the full run's error on it too
                same = by["transformer_same_dims"]["mean"]
                lines.append(row(f"full run on those {dims} dims, {how} decode", [same[int(s) - 1] for s in steps]))
    return "\n".join(lines)


def main() -> None:
    main_path = Path(sys.argv[1]) if len(sys.argv) > 1 else FIGURES / "long_horizon" / "predict.json"
    ablation_path = Path(sys.argv[2]) if len(sys.argv) > 2 else FIGURES / "ablations" / "predict.json"
    for mark, text in ((MARK, main_table(json.loads(main_path.read_text()))),
                       (ABLATION_MARK, ablation_table(json.loads(ablation_path.read_text())))):
        print(text, end="\n\n")
        replace_block(mark, text)


if __name__ == "__main__":
    main()
