"""Same-process A/B of the network's code: `trajformer/model.py` at a git revision against the working tree, timed on
the same beam searches, alternating (README, Speed).

On a shared machine two processes a minute apart can differ by 10-50%, more than most changes to the decoding step;
alternating searches in one process, and reporting the median ratio of adjacent pairs, compares like with like. The
revision's classes lend their methods to the working tree's (the planner and decoder stay the working tree's), each
variant with its own search and KV cache.

    python benchmarks/plan_ab.py --against HEAD~1 [--setting hopper-32x5] [--pairs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from plan_speed import OFFICIAL, SMALL, build

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


def methods(module) -> dict:
    """{(class name, method name): function} of the classes that the working tree's model.py also defines."""
    out = {}
    for name, cls in vars(module).items():
        if isinstance(cls, type) and cls.__module__ == module.__name__ and hasattr(current, name):
            out.update({(name, k): v for k, v in vars(cls).items() if callable(v) and not isinstance(v, type)})
    return out


def use(table: dict) -> None:
    for (cls, name), fn in table.items():
        setattr(getattr(current, cls), name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision of trajformer/model.py to compare with")
    parser.add_argument("--setting", default="hopper-32x5", choices=sorted(SETTINGS))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (obs, act), plan, attention = SETTINGS[args.setting]
    variants = {"working tree": methods(current), args.against: methods(load_revision(args.against))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        model, disc, prefix = build(obs, act, attention)
        searches = {}
        for name, table in variants.items():  # each variant builds its own cache in its first (untimed) search
            use(table)
            searches[name] = BeamSearch(model, disc, plan, 0.99)
            searches[name].search([prefix], [torch.Generator().manual_seed(0)])
        order = list(variants)
        for i in range(args.pairs):
            for name in order if i % 2 == 0 else order[::-1]:
                use(variants[name])
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
