"""Same-process A/B of the network's code: `trajformer/model.py` at a git revision against the working tree, timed on
the same beam searches, alternating (benchmarks/README.md).

On a shared machine two processes a minute apart can differ by 10-50%, more than most changes to the decoding step;
alternating searches in one process, and reporting the median ratio of adjacent pairs, compares like with like. Each
variant is its own model: the revision's module builds its GPT (and the decoder its KV cache) with the working tree's
weights, so a change that adds or removes classes compares too; the planner and decoder stay the working tree's.

    python benchmarks/plan_ab.py --against HEAD~1 [--setting hopper-32x5] [--pairs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from plan_speed import OFFICIAL, SMALL, build

import trajformer.decoding as decoding
import trajformer.model as current
from trajformer.planner import BeamSearch

SETTINGS = {  # name: (obs, act dims, plan, attention)
    "hopper-32x5": ((11, 3), SMALL, "absolute"),
    "hopper-128x15": ((11, 3), OFFICIAL, "absolute"),
    "walker2d-128x15": ((17, 6), OFFICIAL, "absolute"),
    "hopper-32x5-window": ((11, 3), SMALL, "window"),
    "hopper-128x15-window": ((11, 3), OFFICIAL, "window"),
}


def load_revision(rev: str):
    """trajformer/model.py as it was at `rev`, imported as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:trajformer/model.py"], cwd=root, capture_output=True, text=True)
    if source.returncode:
        raise SystemExit(f"plan_ab: git cannot show trajformer/model.py at {rev!r}: {source.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:  # the module keeps its code once executed
        path = Path(tmp) / "model_at_revision.py"
        path.write_text(source.stdout)
        spec = importlib.util.spec_from_file_location("model_at_revision", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def model_of(module, model: torch.nn.Module) -> torch.nn.Module:
    """`module`'s GPT with `model`'s config and weights (fields the revision's config lacks are dropped)."""
    names = {f.name for f in dataclasses.fields(module.GPTConfig)}
    cfg = module.GPTConfig(**{k: v for k, v in dataclasses.asdict(model.config).items() if k in names})
    other = module.GPT(cfg).eval()
    try:
        other.load_state_dict(model.state_dict())
    except RuntimeError as err:
        raise SystemExit(f"plan_ab: the revision's GPT has other parameters than the working tree's: {err}") from None
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision of trajformer/model.py to compare with")
    parser.add_argument("--setting", default="hopper-32x5", choices=sorted(SETTINGS))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (obs, act), plan, attention = SETTINGS[args.setting]
    times: dict[str, list[float]] = {"working tree": [], args.against: []}
    with torch.inference_mode():
        model, disc, prefix = build(obs, act, attention)
        revision = load_revision(args.against)
        variants = {"working tree": (current, model), args.against: (revision, model_of(revision, model))}
        searches = {}
        for name, (module, net) in variants.items():  # each builds its own cache in its first (untimed) search
            decoding.KVCache = module.KVCache
            searches[name] = BeamSearch(net, disc, plan, 0.99)
            searches[name].search([prefix], [torch.Generator().manual_seed(0)])
        order = list(variants)
        for i in range(args.pairs):
            for name in order if i % 2 == 0 else order[::-1]:
                decoding.KVCache = variants[name][0].KVCache
                t0 = time.perf_counter()
                searches[name].search([prefix], [torch.Generator().manual_seed(i + 1)])
                times[name].append(time.perf_counter() - t0)
    new, old = times["working tree"], times[args.against]
    ratios = sorted(a / b for a, b in zip(new, old, strict=True))
    quart = len(ratios) // 4
    print(f"{args.setting}, {args.threads} thread(s), {args.pairs} pairs: working tree {statistics.median(new):.3f} s, "
          f"{args.against} {statistics.median(old):.3f} s a search (medians)")
    print(f"plan_ab ratio={statistics.median(ratios):.3f} quartiles={ratios[quart]:.3f},{ratios[-1 - quart]:.3f}")


if __name__ == "__main__":
    main()
