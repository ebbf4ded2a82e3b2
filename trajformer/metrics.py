"""Scores and prediction metrics: returns and normalised scores (one reference table), compounding error and
histogram likelihood of predicted states (DESIGN.md §6, §7)."""

from __future__ import annotations

import math
import warnings

import numpy as np

# D4RL v2 random / expert reference returns (labelled as such: our envs are v5), by env family.
D4RL_REFERENCE = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}



def env_family(env_id: str) -> str:
    """'hopper' for the env id Hopper-v5: the key of D4RL_REFERENCE."""
    return env_id.split("/")[-1].split("-")[0].lower()


def score_reference(env_id: str, meta: dict, kwargs: dict | None = None, limit: int | None = None,
                    max_steps: int | None = None) -> tuple[tuple[float, float] | None, str | None]:
    """(random, expert) returns for normalising: D4RL v2 for D4RL's envs at their settings (no env kwargs, episodes
    of 1000 steps), else the dataset's reference scores (made in its own env); none for episodes cut before the
    env's time limit (`max_steps`), since both are returns of whole episodes."""
    if max_steps is not None and (limit is None or max_steps < limit):
        return None, None
    name = env_family(env_id)
    if name in D4RL_REFERENCE and not kwargs and limit in (None, 1000):
        return D4RL_REFERENCE[name], "d4rl-v2"
    low, high = meta.get("ref_min_score"), meta.get("ref_max_score")
    if name in D4RL_REFERENCE and high == D4RL_REFERENCE[name][1]:  # D4RL's, recorded by collect before 2026-12-07
        return None, None                                           # for another time limit too
    if low is not None and high is not None and high != low:
        return (float(low), float(high)), "dataset"
    return None, None


def summarize(returns: list[float], lengths: list[int], reference: tuple[float, float] | None) -> dict:
    """Mean return, its standard error (None for one episode) and the normalised score."""
    r = np.asarray(returns, dtype=np.float64)
    stderr = float(r.std(ddof=1) / math.sqrt(len(r))) if len(r) > 1 else None
    out = {"returns": r.tolist(), "lengths": [int(n) for n in lengths], "mean_return": float(r.mean()),
           "stderr": stderr, "normalized_score": None, "normalized_stderr": None}
    if reference is not None:
        low, high = reference
        out["normalized_score"] = 100.0 * (out["mean_return"] - low) / (high - low)
        out["normalized_stderr"] = None if stderr is None else 100.0 * stderr / (high - low)
    return out


def normalized_error(pred: np.ndarray, true: np.ndarray, std: np.ndarray) -> np.ndarray:
    """RMS over dimensions of (pred - true) / std: (..., H, dS) -> (..., H); NaN where pred is NaN."""
    return np.sqrt(np.mean(((pred - true) / std) ** 2, axis=-1))


def dim_errors(pred: np.ndarray, true: np.ndarray, std: np.ndarray, steps: list[int]) -> dict[str, list]:
    """Where an error comes from: per dimension, the RMS over starts of (pred - true) / std at each of `steps`
    (1-based), stopped (NaN) rows left out; {step: [dS values]}."""
    z = (pred - true) / std  # (K, H, dS)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every row stopped
        rms = {s: np.sqrt(np.nanmean(z[:, s - 1] ** 2, axis=0)) for s in steps}
    return {str(s): [float(v) if np.isfinite(v) else None for v in r] for s, r in rms.items()}


def error_summary(errors: np.ndarray) -> dict:
    """Mean and 10/50/90% quantiles over starts (K, H) of per-step errors, ignoring stopped (NaN) rows; a diverged
    (inf) row counts, so it cannot make the mean look better."""
    alive = ~np.isnan(errors)
    out = {"rows": alive.sum(0).tolist()}
    with np.errstate(all="ignore"):
        out["mean"] = [float(np.mean(c[a])) if a.any() else None for c, a in zip(errors.T, alive.T, strict=True)]
        for q in (10, 50, 90):
            out[f"q{q}"] = [float(np.percentile(c[a], q)) if a.any() else None
                            for c, a in zip(errors.T, alive.T, strict=True)]
    return out


def histogram_loglik(samples: np.ndarray, true: np.ndarray, edges: np.ndarray, n_real: np.ndarray,
                     scale: np.ndarray | None = None, pseudo_count: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-timestep log-density of the true states under per-dimension histograms of the samples.

    samples (M, H, D) (NaN rows = stopped), true (H, D), edges (D, >= n_real + 1) per-dimension bin edges of
    which the first n_real[d] + 1 are real. Each bin is a uniform density; `pseudo_count` is spread evenly
    over a dimension's bins so an empty bin is not log 0. A stopped row counts as a sample that put no mass
    on any bin (it is in the denominator, not dropped), so stopping never improves the score. `scale` (D,)
    measures states in those units (e.g. the dataset std). Returns (log-likelihood, discrete-oracle bound),
    each (H,): the mean over dimensions, in nats per dimension; the oracle puts all the mass in the true
    state's bin.
    """
    M, H, D = samples.shape
    scale = np.ones(D) if scale is None else scale
    ll, oracle = np.full(H, np.nan), np.full(H, np.nan)
    for h in range(H):
        alive = np.all(np.isfinite(samples[:, h]), axis=-1)
        per_dim, bound = [], []
        for d in range(D):
            inner = edges[d, 1 : n_real[d]]
            true_bin = int(np.searchsorted(inner, true[h, d], side="right"))
            width = (edges[d, true_bin + 1] - edges[d, true_bin]) / scale[d]
            count = np.sum(np.searchsorted(inner, samples[alive, h, d], side="right") == true_bin)
            prob = (count + pseudo_count / n_real[d]) / (M + pseudo_count)  # stopped rows count, with no mass
            per_dim.append(math.log(prob) - math.log(width))
            bound.append(-math.log(width))
        oracle[h] = np.mean(bound)
        ll[h] = np.mean(per_dim)
    return ll, oracle
