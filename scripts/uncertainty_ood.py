"""How the model env's uncertainty signals grow away from the data: for dataset (s, a), MOPO's u (max_std and
ensemble_std) and MOReL's disagreement d at the data's actions and at actions pushed out to k x their sign.

    python scripts/uncertainty_ood.py runs/hopper-compare/ensemble configs/hopper-medium-local.toml
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from trajformer.baselines.model_env import mopo_uncertainty, morel_disagreement, predict_all
from trajformer.config import load_config
from trajformer.data import load_episodes
from trajformer.ensemble import load_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ensemble", help="a `trajformer train-ensemble` directory")
    parser.add_argument("config", help="the TOML config whose dataset the ensemble was trained on")
    parser.add_argument("--transitions", type=int, default=2000, help="dataset transitions sampled")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ens = load_ensemble(args.ensemble)
    cfg = load_config(args.config)
    data = load_episodes(cfg.data.dataset, cfg.data)
    obs = np.concatenate([e.obs[:-1] for e in data.episodes]).astype(np.float32)
    act = np.concatenate([e.act for e in data.episodes]).astype(np.float32)
    pick = np.random.default_rng(0).choice(len(obs), min(args.transitions, len(obs)), replace=False)
    obs, act = obs[pick], act[pick]
    print(f"{'actions':<22}{'u max_std':>12}{'u ensemble_std':>16}{'MOReL d':>10}")
    for k in (None, 1.5, 2.0, 4.0):
        a = act if k is None else (k * np.sign(act)).astype(np.float32)
        mean, std = predict_all(ens, obs, a)
        row = [mopo_uncertainty(mean, std, kind).mean().item() for kind in ("max_std", "ensemble_std")]
        row.append(morel_disagreement(mean, ens.model.obs_dim).mean().item())
        label = "the data's" if k is None else f"{k} x sign(a)"
        print(f"{label:<22}{row[0]:>12.3f}{row[1]:>16.3f}{row[2]:>10.3f}")


if __name__ == "__main__":
    main()
