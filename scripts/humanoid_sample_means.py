"""How the transformer's teacher-forced sample mean converges with the number of sampled rollouts, beside the
ensemble, on the same held-out starts as `trajformer predict` (README, Long-horizon predictions; the measurements:
pretrained/README.md, "The humanoid models").

The mean of M rollouts sampled on the true actions estimates each model's conditional mean, the squared-error-
optimal point prediction; with few samples its error carries Monte Carlo noise on top of the model's own. This
samples `--samples` rollouts per start in chunks of `--chunk` (each chunk a file in WORK, so a stopped run goes
on where it stopped), then reports for M = 1, 4, 16, ... the error of the mean of M samples (mean over disjoint
groups of M, each averaged over the starts), the ensemble's mean of member means and its own sample means, a
bootstrap over starts of the transformer-minus-ensemble difference at the largest M, and two trivial predictions
for scale (the start state held still; the held-out episodes' mean state).

    python scripts/humanoid_sample_means.py [--samples 512] [--chunk 64] [--work runs/humanoid-sample-means]

Chunk c samples with seed 100 c, so chunks can be made by several processes at once (`--start-chunk N
--sample-only`, one core each) and the report run reads them all. A chunk's file name carries a digest of what it
sampled (the weights, the held-out file, the starts, the horizon), so another model's chunks in the same WORK are
never read as this one's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from trajformer.ensemble import load_ensemble
from trajformer.files import save_json
from trajformer.metrics import normalized_error
from trajformer.predict import (
    SUMMARY_STEPS,
    choose_starts,
    load_heldout,
    rollout_ensemble,
    rollout_transformer,
    sample_mean,
    true_segments,
)
from trajformer.run import load_run, model_sha256


def group_errors(obs: np.ndarray, true: np.ndarray, std: np.ndarray, m: int) -> np.ndarray:
    """Errors (groups, K, H) of the means of disjoint groups of m samples of obs (K, M, H, dS)."""
    return np.stack([normalized_error(sample_mean(obs[:, i : i + m]), true, std)
                     for i in range(0, obs.shape[1] - m + 1, m)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="pretrained/models/humanoid-tt")
    parser.add_argument("--heldout", default="pretrained/data/humanoid-heldout.npz")
    parser.add_argument("--ensemble", default="pretrained/models/humanoid-ensemble")
    parser.add_argument("--samples", type=int, default=512, help="rollouts per start in all")
    parser.add_argument("--chunk", type=int, default=64, help="rollouts per start per chunk (one file each)")
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/humanoid-sample-means")
    parser.add_argument("--out", default="notebooks/figures/long_horizon/sample_means.json")
    parser.add_argument("--start-chunk", type=int, default=0, help="with --sample-only: the first chunk to make")
    parser.add_argument("--sample-only", action="store_true", help="make chunks --start-chunk.. only, report nothing")
    args = parser.parse_args()
    if args.samples % args.chunk:
        raise SystemExit(f"--samples ({args.samples}) must be a multiple of --chunk ({args.chunk})")
    torch.set_num_threads(args.threads)
    run, work = load_run(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    held = load_heldout(args.heldout, run)
    chosen = choose_starts(held, args.horizon, args.starts, 0)  # predict's starts (seed 0)
    start, true, act, prefixes = true_segments(run, held, chosen, args.horizon)
    n_chunks = args.samples // args.chunk
    sampled = {"model_sha256": model_sha256(run), "heldout_sha256": hashlib.sha256(Path(args.heldout).read_bytes())
               .hexdigest(), "starts": [[int(i), int(t)] for i, t in chosen], "horizon": args.horizon}
    key = hashlib.sha256(json.dumps(sampled, sort_keys=True).encode()).hexdigest()[:12]

    def chunk_path(c: int) -> Path:
        return work / f"chunk-{key}-{args.chunk}-{c}.npy"

    for c in range(args.start_chunk if args.sample_only else 0, n_chunks):
        path = chunk_path(c)
        if not path.is_file():
            t0 = time.perf_counter()
            obs = rollout_transformer(run, prefixes, args.horizon, args.chunk, actions=act, greedy=False,
                                      seed=100 * c)["obs"]
            np.save(path.with_suffix(".tmp.npy"), obs.astype(np.float32))
            path.with_suffix(".tmp.npy").rename(path)
            print(f"chunk {c}: {args.chunk} samples x {len(chosen)} starts in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    if args.sample_only:
        return
    tt = np.concatenate([np.load(chunk_path(c)).astype(np.float64) for c in range(n_chunks)], axis=1)
    ens = load_ensemble(args.ensemble)
    ens_samples = rollout_ensemble(ens, start, np.repeat(act[:, None], tt.shape[1], 1), sample=True, seed=0)["obs"]
    ens_mean = normalized_error(rollout_ensemble(ens, start, act[:, None])["obs"][:, 0], true, held.obs_std)
    steps = [s for s in SUMMARY_STEPS if s <= args.horizon]
    at = [s - 1 for s in steps]
    sizes = [m for m in (1, 4, 16, 64, 256, 1024, 4096) if m <= tt.shape[1]]
    table = {}
    for m in sizes:
        groups = group_errors(tt, true, held.obs_std, m)  # (G, K, H)
        per_group = groups.mean(1)  # each group's mean over starts (G, H)
        table[m] = {"groups": len(groups), "transformer": per_group.mean(0)[at].tolist(),
                    "transformer_group_sd": per_group.std(0)[at].tolist(),
                    "ensemble_samples": group_errors(ens_samples, true, held.obs_std, m).mean((0, 1))[at].tolist()}
    last = normalized_error(sample_mean(tt), true, held.obs_std)[:, -1]  # (K,) every sample, per start
    diff = last - ens_mean[:, -1]
    rng = np.random.default_rng(0)
    boot = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(10_000)])
    episode_mean = np.concatenate([e.obs for e in held.episodes]).mean(0)
    record = {
        "config": {**vars(args), "starts_chosen": [{"episode": i, "t": t} for i, t in chosen], **sampled,
                   "steps": steps,
                   "error": "RMS over observation dims of (predicted - true) / dataset std, mean over starts"},
        "sample_means": table,
        "ensemble_mean_of_means": ens_mean.mean(0)[at].tolist(),
        "difference_at_last_step": {"samples": tt.shape[1], "per_start": diff.tolist(), "mean": float(diff.mean()),
                                    "bootstrap_90": np.percentile(boot, [5, 95]).tolist()},
        "trivial": {"start_state_held": normalized_error(np.repeat(start[:, None], args.horizon, 1), true,
                                                         held.obs_std).mean(0)[at].tolist(),
                    "heldout_mean_state": normalized_error(np.broadcast_to(episode_mean, true.shape), true,
                                                           held.obs_std).mean(0)[at].tolist()},
    }
    save_json(Path(args.out), record)
    print("error at steps " + " / ".join(map(str, steps)))
    for m in sizes:
        row = table[m]
        print(f"transformer, mean of {m:4d} ({row['groups']:3d} groups): "
              + " / ".join(f"{v:.3f}" for v in row["transformer"])
              + f"  (sd over groups at the last step {row['transformer_group_sd'][-1]:.3f}); ensemble samples "
              + " / ".join(f"{v:.3f}" for v in row["ensemble_samples"]))
    print("ensemble, mean of member means: " + " / ".join(f"{v:.3f}" for v in record["ensemble_mean_of_means"]))
    d = record["difference_at_last_step"]
    print(f"transformer ({tt.shape[1]} samples) minus ensemble at step {args.horizon}: {d['mean']:+.3f}, bootstrap "
          f"over starts 90%: [{d['bootstrap_90'][0]:+.3f}, {d['bootstrap_90'][1]:+.3f}]")
    for name, row in record["trivial"].items():
        print(f"{name}: " + " / ".join(f"{v:.3f}" for v in row))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
