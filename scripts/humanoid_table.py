"""The README's humanoid prediction table, from a `trajformer predict` record: teacher-forced error of the transformer
(each greedy decode), of the ensemble and of the paper's ablations, and the open-loop log-likelihoods.

    python scripts/humanoid_table.py [PREDICT_JSON]   # default notebooks/figures/ablations/predict.json; prints
                                                      # the table and rewrites the README block between markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from readme_block import replace_block

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- humanoid-table -->"
DECODES = ("argmax", "expectation", "median")


def row(label: str, values: list[float | None]) -> str:
    return f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |"


def table(record: dict) -> str:
    steps = list(record["summary"])
    summary = [record["summary"][s] for s in steps]
    lines = ["| step | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for how in DECODES:
        key = "transformer_error" + ("" if how == "argmax" else f"_{how}")
        lines.append(row(f"transformer error, {how} decode", [s.get(key) for s in summary]))
    lines.append(row("ensemble error", [s["ensemble_error"] for s in summary]))
    for name in ("transformer", "ensemble"):
        if f"{name}_error_sample_mean" in summary[0]:
            lines.append(row(f"{name} error, mean of {record['config']['samples']} sampled rollouts",
                             [s[f"{name}_error_sample_mean"] for s in summary]))
    for name, ab in record["teacher_forced"].get("ablations", {}).items():
        dims = len(ab["obs_dims"])
        what = f"{ab['context_transitions']}-transition windows, {dims} obs dims"
        for how in ("argmax", "median"):
            by = ab.get("decodes", {"argmax": ab}).get(how)
            if by is None:
                continue
            error = by["error"]["mean"]
            lines.append(row(f"ablation {name} ({what}), {how} decode", [error[int(s) - 1] for s in steps]))
            if set(ab["obs_dims"]) < set(record["config"]["obs_dims"]):  # a subset: the main run's error on it too
                same = by["transformer_same_dims"]["mean"]
                lines.append(row(f"transformer on those {dims} dims, {how} decode", [same[int(s) - 1] for s in steps]))
    lines.append(row("transformer, open-loop log-lik.", [s["transformer_loglik"] for s in summary]))
    lines.append(row("ensemble, open-loop log-lik.", [s["ensemble_loglik"] for s in summary]))
    lines.append(row("discrete oracle", [s["oracle_loglik"] for s in summary]))
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "notebooks" / "figures" / "ablations" / "predict.json"
    text = table(json.loads(path.read_text()))
    print(text)
    replace_block(MARK, text)


if __name__ == "__main__":
    main()
