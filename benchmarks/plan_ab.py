"""Same-process A/B of the planning code: the `trajformer` package (network, decoder, planner) at a git revision
against the working tree, timed on the same beam searches, alternating (benchmarks/README.md).

On a shared machine two processes a minute apart can differ by 10-50%, more than most changes to the decoding step;
alternating searches in one process, and reporting the median ratio of adjacent pairs, compares like with like. The
revision's package is imported under another name (`trajformer_at_rev`, its own imports rewritten to it), so its
planner drives its decoder, KV cache and GPT, built with the working tree's weights; the discretizer and the prefix
are the working tree's.

    python benchmarks/plan_ab.py --against HEAD~1 [--setting hopper-32x5] [--pairs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from plan_speed import OFFICIAL, SMALL, build

import trajformer.planner as planner

IMPORT = re.compile(r"^(\s*(?:from|import) )trajformer\b", re.MULTILINE)
SETTINGS = {  # name: (obs, act dims, plan, attention)
    "hopper-32x5": ((11, 3), SMALL, "absolute"),
    "hopper-128x15": ((11, 3), OFFICIAL, "absolute"),
    "walker2d-128x15": ((17, 6), OFFICIAL, "absolute"),
    "hopper-32x5-window": ((11, 3), SMALL, "window"),
    "hopper-128x15-window": ((11, 3), OFFICIAL, "window"),
}


def load_revision(rev: str, into: Path):
    """The `trajformer` package at `rev`, written under `into` as `trajformer_at_rev` and imported (its imports of
    `trajformer` rewritten): returns its (model, planner) modules."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", rev, "trajformer"], cwd=root, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"plan_ab: git cannot archive trajformer/ at {rev!r}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    package = into / "trajformer_at_rev"
    (into / "trajformer").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(IMPORT.sub(r"\1trajformer_at_rev", path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module("trajformer_at_rev.model"), importlib.import_module("trajformer_at_rev.planner")


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
    parser.add_argument("--against", required=True, help="git revision of trajformer/ to compare with")
    parser.add_argument("--setting", default="hopper-32x5", choices=sorted(SETTINGS))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (obs, act), plan, attention = SETTINGS[args.setting]
    times: dict[str, list[float]] = {"working tree": [], args.against: []}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        model, disc, prefix = build(obs, act, attention)
        rev_model, rev_planner = load_revision(args.against, Path(tmp))
        searches = {"working tree": planner.BeamSearch(model, disc, plan, 0.99),
                    args.against: rev_planner.BeamSearch(model_of(rev_model, model), disc, plan, 0.99)}
        for search in searches.values():  # each builds its own cache in its first (untimed) search
            search.search([prefix], [torch.Generator().manual_seed(0)])
        order = list(searches)
        for i in range(args.pairs):
            for name in order if i % 2 == 0 else order[::-1]:
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
