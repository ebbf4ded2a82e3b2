"""Validation cross-entropy of several runs on the same windows: the first run's validation episodes, cut into
windows of one sequence length, so models trained on different window lengths (or position schemes) compare.

    python scripts/compare_models.py RUN_DIR [RUN_DIR ...] [--sequence-length 5] [--windows 4096]

All runs must share the dataset and discretizer settings; each is scored with its own discretizer (they are fit
on the same data, so they are identical for runs of the same dataset and bin count).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from trajformer.run import load_run
from trajformer.tokens import loss_weights
from trajformer.train import prepare, validation_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--sequence-length", type=int, default=5, help="transitions per validation window")
    parser.add_argument("--windows", type=int, default=4096, help="evenly spaced validation windows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    first = load_run(args.runs[0])
    cfg = dataclasses.replace(first.config)
    cfg.data = dataclasses.replace(cfg.data, sequence_length=args.sequence_length)
    cfg.train = dataclasses.replace(cfg.train, eval_windows=args.windows, batch_size=256)
    prep = prepare(cfg, discretizer=first.discretizer)
    scored = min(args.windows, len(prep.val_windows))
    print(f"{len(prep.val_windows)} validation windows of {args.sequence_length} transitions "
          f"({len(prep.val_episodes)} episodes of {cfg.data.dataset}); scored {scored}")
    print(f"{'run':<40}{'attention':>10}{'val loss':>10}{'obs':>8}{'action':>8}{'reward':>8}{'value':>8}")
    for path in args.runs:
        run = load_run(path)
        m = run.config.model
        weights = loss_weights(run.obs_dim, run.act_dim, args.sequence_length, m.action_weight, m.reward_weight,
                               m.value_weight)
        out = validation_losses(run.model.float(), prep.val_windows, cfg, weights, autocast=False)
        print(f"{path:<40}{run.model.config.attention:>10}{out['val_loss']:>10.3f}{out['val_obs']:>8.3f}"
              f"{out['val_action']:>8.3f}{out['val_reward']:>8.3f}{out['val_value']:>8.3f}")


if __name__ == "__main__":
    main()
