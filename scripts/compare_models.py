"""Validation cross-entropy of several runs on the same windows: the first run's validation episodes, cut into
windows of one sequence length, so models trained on different window lengths (or position schemes) compare.

    python scripts/compare_models.py RUN_DIR [RUN_DIR ...] [--sequence-length 5] [--windows 4096]

`--context-sweep 0,5,19` prints each run's loss of the same targets (each window's last transition) seen after
only its last K transitions: what a longer history is worth (a window model's carried context, DESIGN.md §5b).

`--by-transition` also prints each run's loss by the transition of the window its targets sit in (0 = the first,
which sees no earlier transition): a model is scored where its planner predicts, e.g. an absolute model of windows
of 5 at transition 4, a window model (band of 5) at transitions 5 and later of longer windows.

Beside the losses, each run's planned return where RUN_DIR/plan-32x5.json holds one (scripts/learning_curves.sh
writes it: 5 Hopper episodes at beam 32, horizon 5), with its mean episode length.

All runs must share the dataset and the discretizer (runs of one dataset and bin count fit the same one): every
run is scored on the first run's tokens, and a run whose discretizer or data differ, whose absolute positions
cannot take windows of that length, or that trained on any of those validation episodes (another split: a seed sweep
sets data.split_seed), is refused before any scoring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from trajformer.model import token_losses
from trajformer.run import load_run
from trajformer.tokens import TokenWindows, loss_weights
from trajformer.train import batch_loss, prepare, validation_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--sequence-length", type=int, default=5, help="transitions per validation window")
    parser.add_argument("--windows", type=int, default=4096, help="evenly spaced validation windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--by-transition", action="store_true", help="also the loss of each window transition")
    parser.add_argument("--context-sweep", default="", metavar="K1,K2,...",
                        help="also the loss of each window's last transition seen after only its last K transitions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [load_run(path) for path in args.runs]
    first = runs[0]
    for path, run in zip(args.runs, runs, strict=True):
        if not np.array_equal(run.discretizer.edges, first.discretizer.edges) or \
                run.meta.get("dataset_id") != first.meta.get("dataset_id"):
            sys.exit(f"{path}: another dataset or discretizer than {args.runs[0]}; compare runs of one dataset")
        if (fits := run.model.config.context_transitions) is not None and fits < args.sequence_length:
            sys.exit(f"{path} takes windows of {fits} transitions; pass --sequence-length {fits} or less")
    cfg = dataclasses.replace(first.config)
    cfg.data = dataclasses.replace(cfg.data, sequence_length=args.sequence_length)
    cfg.train = dataclasses.replace(cfg.train, eval_windows=args.windows, batch_size=256)
    prep = prepare(cfg, discretizer=first.discretizer)
    if prep.val_windows is None:
        sys.exit(f"{args.runs[0]} has no validation episodes (data.validation_fraction = 0); nothing to score")
    for path, run in zip(args.runs, runs, strict=True):
        seen = sorted(set(prep.val_episodes.tolist()) & set(run.meta["split"]["train_episodes"]))
        if seen:
            sys.exit(f"{path} trained on {len(seen)} of the {len(prep.val_episodes)} validation episodes of "
                     f"{args.runs[0]} (another episode split); train it with --set data.split_seed="
                     f"{first.meta['split']['seed']}, or compare runs of one split")
    scored = min(args.windows, len(prep.val_windows))
    print(f"{len(prep.val_windows)} validation windows of {args.sequence_length} transitions "
          f"({len(prep.val_episodes)} episodes of {cfg.data.dataset}); scored {scored}")
    print(f"{'run':<40}{'attention':>10}{'val loss':>10}{'obs':>8}{'action':>8}{'reward':>8}{'value':>8}"
          f"{'return (32/5)':>22}")
    weights = [loss_weights(run.obs_dim, run.act_dim, args.sequence_length, run.config.model.action_weight,
                            run.config.model.reward_weight, run.config.model.value_weight) for run in runs]
    for path, run, w in zip(args.runs, runs, weights, strict=True):
        out = validation_losses(run.model.float(), prep.val_windows, cfg, w, autocast=False)
        print(f"{path:<40}{run.model.config.attention:>10}{out['val_loss']:>10.3f}{out['val_obs']:>8.3f}"
              f"{out['val_action']:>8.3f}{out['val_reward']:>8.3f}{out['val_value']:>8.3f}{planned(path):>22}")
    if args.by_transition:
        print(f"{'loss by window transition':<40}" + "".join(f"{k:>8}" for k in range(args.sequence_length)))
        for path, run, w in zip(args.runs, runs, weights, strict=True):
            by = losses_by_transition(run.model, prep.val_windows, scored, w)
            print(f"{path:<40}" + "".join(f"{x:>8.3f}" for x in by))
    if args.context_sweep:
        ks = [int(k) for k in args.context_sweep.split(",")]
        if not all(0 <= k < args.sequence_length for k in ks):
            sys.exit(f"--context-sweep {args.context_sweep}: each K in 0..{args.sequence_length - 1}")
        print(f"{'last transition after K transitions':<40}" + "".join(f"{k:>8}" for k in ks))
        for path, run, w in zip(args.runs, runs, weights, strict=True):
            by = last_transition_losses(run.model, prep.val_windows, scored, w, ks)
            print(f"{path:<40}" + "".join(f"{x:>8.3f}" for x in by))


@torch.no_grad()
def losses_by_transition(model, windows: TokenWindows, scored: int, weights: torch.Tensor) -> list[float]:
    """The weighted loss (as validation_losses weighs it) of the targets in each transition of the window, over
    the same evenly spaced windows."""
    model.eval()
    T, L = windows.transition_dim, windows.sequence_length
    ids = torch.from_numpy(np.linspace(0, len(windows) - 1, scored).round().astype(np.int64))
    which = torch.arange(1, L * T) // T  # target p is token p + 1
    sums, counts = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for chunk in ids.split(256):
        _, _, ce, mask = batch_loss(model, windows, chunk, weights, autocast=False)
        sums.index_add_(0, which, (ce.float() * weights[: ce.shape[1]] * mask).double().sum(0))
        counts.index_add_(0, which, mask.double().sum(0))
    return (sums / counts.clamp(min=1.0)).tolist()


@torch.no_grad()
def last_transition_losses(model, windows: TokenWindows, scored: int, weights: torch.Tensor, ks: list[int]
                           ) -> list[float]:
    """For each K, the weighted loss of the targets in each window's last transition (but its first token, which
    K = 0 cannot predict) when the model sees only that transition and the K before it: the same targets under
    shorter and longer histories (a fresh planner context against a carried one)."""
    model.eval()
    T, L = windows.transition_dim, windows.sequence_length
    ids = torch.from_numpy(np.linspace(0, len(windows) - 1, scored).round().astype(np.int64))
    targets = slice((L - 1) * T, L * T - 1)  # target p is token p + 1
    sums, counts = torch.zeros(len(ks), dtype=torch.float64), torch.zeros(len(ks), dtype=torch.float64)
    for chunk in ids.split(256):
        x, y, mask = windows.batch(chunk)
        for i, k in enumerate(ks):
            start = (L - 1 - k) * T
            ce = token_losses(model(x[:, start:]), y[:, start:])[:, targets.start - start :]
            m = mask[:, targets]
            sums[i] += (ce.float() * weights[targets] * m).double().sum()
            counts[i] += m.double().sum()
    return (sums / counts.clamp(min=1.0)).tolist()


def planned(run_dir: str) -> str:
    """'mean ± stderr (mean length)' of the run's plan-32x5.json, or '-' without one."""
    record = Path(run_dir) / "plan-32x5.json"
    if not record.is_file():
        return "-"
    plan = json.loads(record.read_text())
    spread = "" if plan["stderr"] is None else f" ± {plan['stderr']:.0f}"  # one episode: no standard error
    return f"{plan['mean_return']:.0f}{spread} ({sum(plan['lengths']) / len(plan['lengths']):.0f})"


if __name__ == "__main__":
    main()
