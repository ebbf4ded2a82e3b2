"""Planner speed: cached vs uncached beam search, absolute vs window model, and the fp32 GEMM-bound estimate
(DESIGN.md §5, §5b).

For each setting it times one env step (one search from a mid-episode context of 5 past transitions; a window model,
which carries its context across env steps, extends its carried cache by the last of them and searches from it;
"encodes" counts passes over more than one token a row: an absolute model's prefix encode and re-encodes, a window
model's carried transition and observation) with the KV-cached decoder of the absolute (official) model and of the
window model, and, for the absolute model at Hopper dims, with the uncached reference (one GPT.forward over the
cropped window per generated token, batched over rows: the official algorithm). It records every cached forward pass
the search makes (incremental steps at their row counts, window re-encodes), counts their matmul FLOPs, times bare
fp32 matmuls of exactly those shapes in the same run, and reports cached time / GEMM time. That cost model
(DESIGN.md §5) counts every re-encode as a pass over every row's whole window; the decoder shares the encode of
rows' common first tokens, so it runs fewer FLOPs, and "run GFLOP" / "cached/run GEMM" count the passes it makes.
The cost model counts weight matmuls only; the attention matmuls over the cache (one query per row against every
cached key: memory traffic, not FLOPs) are timed bare too, and reported beside it as cached / (GEMM + attention).
Humanoid dims (45/17) run at beam 32, H 5. "absolute bf16" and "window bf16" plan with plan.dtype = "bfloat16".
`--device cuda` runs the searches and the bare matmuls on a GPU (the whole search stays on the card; only the draws'
noise comes from the CPU generators).

    python benchmarks/plan_speed.py [--threads N] [--steps 3] [--uncached-steps 1] [--device cuda]

`--trained ABSOLUTE_RUN WINDOW_RUN` times two trained Hopper runs instead (one of each kind, on one dataset):
searches at 32/5 and 128/15 from mid-episode contexts of their validation episodes (step 100 of the first
`--starts`), the kinds alternating (and the window model once more from a fresh context instead of its carried one),
and ends with `plan_speed_trained window_over_absolute_32x5=<r> window_over_absolute_128x15=<r>
carried_over_fresh_32x5=<r> carried_over_fresh_128x15=<r>` (medians over the starts of the per-start ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from trajformer.config import PlanConfig
from trajformer.data import load_episodes
from trajformer.decoding import CarriedCache
from trajformer.discretizer import Discretizer
from trajformer.model import GPT, GPTConfig
from trajformer.planner import BeamSearch
from trajformer.run import Run, load_run
from trajformer.tokens import context_transition, encode_values

BINS, CONTEXT = 100, 5
SMALL = PlanConfig(beam_width=32, n_expand=2, horizon=5, max_context_transitions=CONTEXT)
OFFICIAL = PlanConfig(beam_width=128, n_expand=2, horizon=15, max_context_transitions=CONTEXT)
SETTINGS = [  # (label, dims, plan, time the uncached reference)
    ("hopper 32/5", (11, 3), SMALL, True),
    ("hopper 128/15", (11, 3), OFFICIAL, True),
    ("humanoid 32/5", (45, 17), SMALL, False),
]


def build(obs: int, act: int, attention: str, device: str = "cpu") -> tuple[GPT, Discretizer, torch.Tensor]:
    """Random-init 4x4x128 GPT (fixed seed) on `device`, a discretizer, and a steady-state prefix (5 transitions
    + obs)."""
    torch.manual_seed(0)
    T = obs + act + 2
    cfg = GPTConfig(obs_dim=obs, act_dim=act, n_bins=BINS, block_size=10 * T - 1, n_layer=4, n_head=4,
                    n_embd=128, dropout=0.0, attention=attention, window=CONTEXT * T if attention == "window" else 0)
    model = GPT(cfg).eval().to(device)
    disc = Discretizer.fit(np.random.default_rng(0).normal(size=(10_000, T)), BINS)
    bins = np.random.default_rng(1).integers(0, BINS, size=CONTEXT * T + obs)
    return model, disc, torch.as_tensor(bins + BINS * (np.arange(len(bins)) % T))


def env_step(search: BeamSearch, prefix: torch.Tensor, seed: int) -> Callable[[], object]:
    """One env step from `prefix`, ready to run: a search from it, or, for a window model (which carries its
    context, the planner's default), the env's cache of its executed transitions but the last (built here, as the
    steps before built it), extended by that transition, and a search from it and the observation."""
    gens = [torch.Generator().manual_seed(seed)]
    if not search.carry:
        return lambda: search.search([prefix], gens)
    cfg = search.model.config
    transitions, obs = prefix[: -cfg.obs_dim], prefix[-cfg.obs_dim :]
    carried = CarriedCache(search.model)
    carried.extend(transitions[: -cfg.transition_dim])

    def step() -> object:
        carried.extend(transitions)
        return search.search([obs], gens, [carried])

    return step


def seconds_per_step(search: BeamSearch, prefix: torch.Tensor, steps: int, warmup: bool = True) -> float:
    """Median wall time of `steps` env steps, after a warm-up step if `warmup`."""
    if warmup:
        env_step(search, prefix, 0)()
    times = []
    for i in range(steps):
        step = env_step(search, prefix, i + 1)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cached_calls(search: BeamSearch, prefix: torch.Tensor) -> tuple[list, list]:
    """(rows, new tokens, keys each query's row attends over) of every cached forward pass of one search, and
    the same list with each re-encode counted as DESIGN.md §5's cost model counts it: one pass over every row's
    whole window (the decoder shares the encode of rows' common first tokens, so it runs less than that)."""
    calls, model_calls, inside = [], [], []
    forward, encode = search.model.forward_cached, search.decoder._encode
    step = env_step(search, prefix, 0)

    def recording(idx, cache, all_logits=False, slot=None):
        logits = forward(idx, cache, all_logits, slot)
        calls.append((*idx.shape, cache.length - cache.first_key))
        if not inside:
            model_calls.append(calls[-1])
        return logits

    def recording_encode():
        inside.append(True)
        try:
            encode()
        finally:
            inside.pop()
        cache = search.decoder.cache
        model_calls.append((cache.rows, cache.length, cache.length - cache.first_key))

    search.model.forward_cached, search.decoder._encode = recording, recording_encode
    try:
        step()
    finally:
        del search.model.forward_cached, search.decoder._encode
    return calls, model_calls


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_seconds(m: int, rows: int, cfg: GPTConfig, device: torch.device, repeats: int = 5) -> float:
    """Best time of the bare fp32 matmuls of one forward pass over m tokens (the head for `rows` of them)."""
    C = cfg.n_embd
    x, h = torch.randn(m, C, device=device), torch.randn(m, 4 * C, device=device)
    w = [torch.randn(C, 3 * C, device=device), torch.randn(C, C, device=device), torch.randn(C, 4 * C, device=device),
         torch.randn(4 * C, C, device=device)]
    head = torch.randn(C, cfg.n_bins + 1, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(cfg.n_layer):
            _ = (x @ w[0], x @ w[1], x @ w[2], h @ w[3])
        _ = x[:rows] @ head
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def attention_seconds(rows: int, t: int, keys: int, cfg: GPTConfig, device: torch.device, repeats: int = 5) -> float:
    """Best time of the bare fp32 attention matmuls (q k^T, then weights v) of one cached forward pass: `rows`
    rows of `t` queries over `keys` cached keys, every head and layer. Memory-bound for one query per row: the
    cache's keys and values are read once per generated token."""
    H, d = cfg.n_head, cfg.n_embd // cfg.n_head
    q, k, v = (torch.randn(rows * H, n, d, device=device) for n in (t, keys, keys))
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(cfg.n_layer):
            _ = torch.bmm(torch.bmm(q, k.transpose(1, 2)), v)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(m: int, rows: int, cfg: GPTConfig) -> int:
    """Matmul FLOPs of one forward pass over m tokens: 12 C^2 weights per layer, one head slot per row."""
    return 2 * m * 12 * cfg.n_embd**2 * cfg.n_layer + 2 * rows * cfg.n_embd * (cfg.n_bins + 1)


def measure(search: BeamSearch, prefix: torch.Tensor, steps: int) -> dict:
    """Cached seconds per env step; the GEMM-bound estimate of DESIGN.md §5's cost model (every re-encode a
    pass over every row's window) and of the passes the search really makes (shared re-encodes); and the bare
    time of its attention matmuls over the cache (which the cost model leaves out)."""
    cfg, device = search.model.config, search.device
    t_cached = seconds_per_step(search, prefix, steps)
    calls, model_calls = cached_calls(search, prefix)
    gemm = {s: gemm_seconds(*s, cfg, device) for s in {(rows * t, rows) for rows, t, _ in calls + model_calls}}
    attention = {c: attention_seconds(*c, cfg, device) for c in set(calls)}
    return {"s": t_cached, "gemm": sum(gemm[(rows * t, rows)] for rows, t, _ in model_calls),
            "flops": sum(matmul_flops(rows * t, rows, cfg) for rows, t, _ in model_calls),
            "gemm_run": sum(gemm[(rows * t, rows)] for rows, t, _ in calls),
            "flops_run": sum(matmul_flops(rows * t, rows, cfg) for rows, t, _ in calls),
            "attention": sum(attention[c] for c in calls), "encodes": sum(t > 1 for _, t, _ in model_calls)}


def trained_prefixes(run: Run, starts: int, t0: int = 100) -> list[torch.Tensor]:
    """Prefixes as the planner builds them at step t0 (CONTEXT past transitions, then the observation) of the
    first `starts` validation episodes of the run's dataset that are long enough."""
    data = load_episodes(run.config.data.dataset, run.config.data)
    episodes = [data.episodes[i] for i in run.meta["split"]["validation_episodes"] if data.episodes[i].length > t0]
    if len(episodes) < starts:
        raise SystemExit(f"{run.path}: only {len(episodes)} validation episodes reach step {t0}; pass --starts "
                         f"{len(episodes)} or fewer")
    return [torch.as_tensor(np.concatenate(
        [context_transition(run.discretizer, ep.obs[t], ep.act[t], float(ep.rew[t])) for t in range(t0 - CONTEXT, t0)]
        + [encode_values(run.discretizer, ep.obs[t0], 0)])) for ep in episodes[:starts]]


def trained(paths: list[str], starts: int, steps: int) -> None:
    """Seconds per env step of a trained absolute and a trained window run, same contexts, kinds alternating."""
    runs = [load_run(path) for path in paths]
    kinds = [run.model.config.attention for run in runs]
    if kinds != ["absolute", "window"] or runs[0].meta["dataset_id"] != runs[1].meta["dataset_id"]:
        raise SystemExit(f"--trained takes an absolute and then a window run of one dataset, not {kinds} of "
                         f"{runs[0].meta['dataset_id']} and {runs[1].meta['dataset_id']}")
    prefixes = trained_prefixes(runs[0], starts)
    print(f"trained runs {paths[0]} (absolute) and {paths[1]} (window), {starts} starts at step 100 of "
          f"{runs[0].meta['dataset_id']} validation episodes, fp32, {torch.get_num_threads()} threads")
    ratios, carried = {}, {}
    for label, plan in (("32x5", SMALL), ("128x15", OFFICIAL)):
        fresh = dataclasses.replace(plan, carry_context=False)  # the window model's fresh context, for the A/B
        searches = [BeamSearch(run.model.float().eval(), run.discretizer, p, run.config.data.discount)
                    for run, p in ((runs[0], plan), (runs[1], plan), (runs[1], fresh))]
        times = [[seconds_per_step(search, prefix, steps) for search in searches] for prefix in prefixes]
        ratios[label] = statistics.median(w / a for a, w, _ in times)
        carried[label] = statistics.median(w / f for _, w, f in times)
        print(f"{label:<8} absolute {statistics.median(a for a, _, _ in times):.3f} s, window "
              f"{statistics.median(w for _, w, _ in times):.3f} s (fresh context "
              f"{statistics.median(f for _, _, f in times):.3f} s) per env step (medians over starts); per start "
              f"{', '.join(f'{a:.2f}/{w:.2f}/{f:.2f}' for a, w, f in times)}", flush=True)
    print(f"plan_speed_trained window_over_absolute_32x5={ratios['32x5']:.2f} "
          f"window_over_absolute_128x15={ratios['128x15']:.2f} carried_over_fresh_32x5={carried['32x5']:.2f} "
          f"carried_over_fresh_128x15={carried['128x15']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--steps", type=int, default=3, help="timed cached env steps per setting")
    parser.add_argument("--uncached-steps", type=int, default=1, help="timed uncached env steps per setting")
    parser.add_argument("--device", default="cpu", help="where the searches run (cpu, cuda)")
    parser.add_argument("--trained", nargs=2, metavar=("ABSOLUTE_RUN", "WINDOW_RUN"),
                        help="time these two trained runs (CPU) instead of random weights")
    parser.add_argument("--starts", type=int, default=3, help="contexts per setting with --trained")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trained:
        with torch.inference_mode():
            trained(args.trained, args.starts, args.steps)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"GPT 4x4x128, {BINS} bins, context {CONTEXT}, fp32, torch {torch.__version__}, {where}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}")
    print(f"{'setting':<16}{'model':<14}{'cached s':>10}{'uncached s':>12}{'speedup':>9}{'GFLOP':>8}{'GEMM s':>9}"
          f"{'GEMM GFLOP/s':>14}{'cached/GEMM':>13}{'attn s':>8}{'cached/(GEMM+attn)':>20}{'encodes':>9}"
          f"{'run GFLOP':>11}{'cached/run GEMM':>17}")
    results = {}
    with torch.inference_mode():
        for label, (obs, act), plan, reference in SETTINGS:
            for attention in ("absolute", "window", "absolute bf16", "window bf16"):
                model, disc, prefix = build(obs, act, attention.split()[0], args.device)
                if attention.endswith("bf16"):  # plan.dtype = "bfloat16": weights and KV cache in bf16
                    model = model.to(torch.bfloat16)
                r = measure(BeamSearch(model, disc, plan, 0.99, cached=True), prefix, args.steps)
                r["uncached"] = float("nan")
                if reference and attention == "absolute" and args.uncached_steps > 0:
                    uncached = BeamSearch(model, disc, plan, 0.99, cached=False)
                    r["uncached"] = seconds_per_step(uncached, prefix, args.uncached_steps, warmup=False)
                results[label, attention] = r
                print(f"{label:<16}{attention:<14}{r['s']:>10.3f}{r['uncached']:>12.2f}"
                      f"{r['uncached'] / r['s']:>9.1f}{r['flops'] / 1e9:>8.1f}{r['gemm']:>9.3f}"
                      f"{r['flops'] / r['gemm'] / 1e9:>14.1f}{r['s'] / r['gemm']:>13.2f}{r['attention']:>8.3f}"
                      f"{r['s'] / (r['gemm'] + r['attention']):>20.2f}{r['encodes']:>9}{r['flops_run'] / 1e9:>11.1f}"
                      f"{r['s'] / r['gemm_run']:>17.2f}", flush=True)
    a, w = results["hopper 128/15", "absolute"], results["hopper 128/15", "window"]
    h = results["hopper 128/15", "absolute bf16"]
    print(f"bf16 planning (plan.dtype = \"bfloat16\") at 128/15: {h['s']:.3f} s, {a['s'] / h['s']:.2f}x float32; "
          "its cached/GEMM column divides by the fp32 GEMM bound")
    print(f"attention over the cache at 128/15, timed bare: {a['attention']:.3f} s absolute, {w['attention']:.3f} s "
          f"window; cached / (GEMM + attention): {a['s'] / (a['gemm'] + a['attention']):.2f} absolute, "
          f"{w['s'] / (w['gemm'] + w['attention']):.2f} window")
    print(f"re-encodes shared between rows with equal first tokens at 128/15: {a['flops_run'] / 1e9:.1f} GFLOP run "
          f"against the cost model's {a['flops'] / 1e9:.1f}; cached / GEMM of the passes run "
          f"{a['s'] / a['gemm_run']:.2f}")
    print(f"plan_speed cached_vs_uncached={a['uncached'] / a['s']:.1f} vs_gemm_limit={a['s'] / a['gemm']:.2f} "
          f"seconds_per_step={a['s']:.3f} window_seconds_per_step={w['s']:.3f}")


if __name__ == "__main__":
    main()
