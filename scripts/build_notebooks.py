"""Write notebooks/*.ipynb from the cell sources below and execute them, so the committed outputs are never stale.

    python scripts/build_notebooks.py            # full mode: the shipped models, the figures we commit
    python scripts/build_notebooks.py --tiny     # TRAJFORMER_TINY=1: small data and models (what CI runs)
    python scripts/build_notebooks.py --no-run   # sources only

tests/test_notebooks.py checks that the committed notebooks have these sources and runs them in tiny mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

SETUP = """\
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen MuJoCo rendering, before mujoco is imported
TINY = os.environ.get("TRAJFORMER_TINY") == "1"  # CI: small data and models, same code path
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
os.chdir(ROOT)
import torch
from IPython.display import Image, display

torch.set_num_threads(1)  # one thread: timings do not depend on what else the machine runs
print("tiny mode" if TINY else "full mode")"""

QUICKSTART = [
    ("markdown", """\
# Quickstart: dataset → train → plan → plots

The whole Trajectory Transformer pipeline in library calls (each is also a `trajformer` subcommand):
collect a Minari dataset offline with a shipped behaviour policy, train a small GPT on discretized
trajectories, plan an episode with the KV-cached beam search, and look at the losses and predictions.
Full mode uses `configs/quickstart.toml` (a 2 x 4 x 64 model, 600 steps); `TRAJFORMER_TINY=1` shrinks
everything to seconds (a random-policy dataset and a 2 x 2 x 32 model in a temporary directory)."""),
    ("code", SETUP),
    ("code", """\
from trajformer.collect import collect
from trajformer.config import load_config
from trajformer.data import is_local_dataset

if TINY:
    os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="nb-minari-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config("configs/quickstart.toml", [
        'data.dataset="nb/hopper-random-v0"', "data.sequence_length=3", "discretizer.n_bins=20",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "train.batch_size=32", "train.max_steps=40",
        "train.eval_every=20", "train.checkpoint_every=20", "plan.beam_width=4", "plan.horizon=2",
        "plan.max_context_transitions=3"])
    collect("Hopper-v5", "random", steps=1000, dataset_id=cfg.data.dataset, seed=0, max_episode_steps=50)
else:
    cfg = load_config("configs/quickstart.toml")
    if not is_local_dataset(cfg.data.dataset):
        collect("Hopper-v5", "hopper-sac-0175k", steps=20_000, dataset_id=cfg.data.dataset, seed=0)
print(cfg.data.dataset)"""),
    ("markdown", "## Train\nThe run directory is self-contained: config, discretizer, weights, metrics, loss plot."),
    ("code", """\
from trajformer.run import load_run
from trajformer.train import train

run_dir = Path(tempfile.mkdtemp(prefix="nb-run-")) / "quickstart"
train(cfg, run_dir, progress=False)
run = load_run(run_dir)
print(f"{sum(p.numel() for p in run.model.parameters()):,} parameters, trained {cfg.train.max_steps} steps")
display(Image(filename=str(run_dir / "loss.png")))"""),
    ("markdown", "## Plan\nBeam-search model-predictive control in Hopper-v5 (one short episode)."),
    ("code", """\
from trajformer.rollout import evaluate, report

record = evaluate(run, episodes=1, max_steps=10 if TINY else 100, seed=0, progress=False)
print(report(record))"""),
    ("markdown", """\
## Predictions
What the model believes will happen: from held-out start states, fed the true actions, how fast does the
predicted state drift from the real one? (The humanoid notebook does this at length, with a baseline.)"""),
    ("code", """\
from trajformer.predict import predict

pred = predict(run_dir, horizon=5 if TINY else 20, starts=4, samples=8, out=run_dir / "predict",
               render=not TINY, progress=False)
print("normalised error at step 1:", round(pred["summary"]["1"]["transformer_error"], 3))
display(Image(filename=str(run_dir / "predict" / "error_vs_horizon.png")))
display(Image(filename=str(run_dir / "predict" / "traces.png")))"""),
]

LONG_HORIZON = [
    ("markdown", """\
# Long-horizon humanoid predictions: Trajectory Transformer vs. a PETS ensemble

The paper's Fig. 2/3 on our data: `trajformer/humanoid-medium-v0` (Humanoid-v5, 45-dim observations =
qpos[2:] + qvel). Both models are shipped in `pretrained/models/` and the held-out episodes in
`pretrained/data/humanoid-heldout.npz` (validation episodes of the transformer's own split).
Protocols (DESIGN.md §7 and `trajformer/predict.py`):

* **teacher-forced actions** (like for like): both models are fed the episode's true actions; error =
  RMS over dimensions of (predicted − true) / dataset std, for the transformer's greedy decodes, the
  ensemble's mean of member means, and each model's mean of its sampled rollouts;
* **open loop** (paper Fig. 3): the transformer samples its own actions and states; the ensemble rolls out
  on the same sampled actions (random member + Gaussian per step); per-step histograms of the samples
  score the log-likelihood of the true states, bounded by the discrete oracle.

`TRAJFORMER_TINY=1` runs the same cells with a short horizon and few starts/samples."""),
    ("code", SETUP),
    ("code", """\
import json

from trajformer.predict import predict, report

RUN = Path(os.environ.get("TRAJFORMER_HUMANOID_RUN", "pretrained/models/humanoid-tt"))
ENSEMBLE = Path("pretrained/models/humanoid-ensemble")
HELDOUT = "pretrained/data/humanoid-heldout.npz"
out = Path(tempfile.mkdtemp(prefix="nb-predict-")) if TINY else Path("notebooks/figures/long_horizon")
settings = dict(horizon=5, starts=2, samples=4) if TINY else dict(horizon=100, starts=8, samples=16)
record = predict(RUN, dataset=HELDOUT, baseline=ENSEMBLE, out=out, progress=False, **settings)
print(report(record))"""),
    ("markdown", "## Compounding error with the true actions"),
    ("code", 'display(Image(filename=str(out / "error_vs_horizon.png")))'),
    ("markdown", "## Open-loop likelihood of the true trajectory (paper Fig. 3)"),
    ("code", 'display(Image(filename=str(out / "likelihood_vs_horizon.png")))'),
    ("markdown", """\
## Traces and poses of one start
Every dimension (black: true; blue: transformer with true actions, faint blue: its open-loop samples;
orange: ensemble with true actions), then the poses: true, transformer and ensemble rows, rendered from the
predicted observations (root x/y integrated from the predicted velocities, quaternion normalised)."""),
    ("code", """\
display(Image(filename=str(out / "traces.png")))
if record["files"]["filmstrip"]:
    display(Image(filename=record["files"]["filmstrip"]))"""),
    ("markdown", "## What each model got (compute and validation)"),
    ("code", """\
compute = record["compute"]
print(json.dumps({k: compute[k] for k in ("transformer", "ensemble")}, indent=1))
ens_meta = json.loads((ENSEMBLE / "ensemble.json").read_text())
val = {k: round(v, 4) for k, v in ens_meta["validation"].items() if k != "val_nll_members"}
print("ensemble validation:", val)"""),
    ("markdown", """\
## Ensemble disagreement along the horizon
The ensemble's second job is an uncertainty signal (MOPO/MOReL): the spread of its members' means. Along
its own teacher-forced rollout, disagreement should grow as the predictions leave the data."""),
    ("code", """\
import matplotlib.pyplot as plt
import numpy as np

from trajformer.ensemble import load_ensemble
from trajformer.predict import choose_starts, load_heldout, rollout_ensemble
from trajformer.run import load_run

run, ens = load_run(RUN), load_ensemble(ENSEMBLE)
held = load_heldout(HELDOUT, run)
H = settings["horizon"]
starts = choose_starts(held, H, settings["starts"])
start = np.stack([held.episodes[i].obs[t] for i, t in starts])
actions = np.stack([held.episodes[i].act[t : t + H] for i, t in starts])
pred = rollout_ensemble(ens, start, actions[:, None])["obs"][:, 0]
states = np.concatenate([start[:, None], pred[:, :-1]], axis=1)
dis = np.stack([ens.disagreement(states[:, h], actions[:, h]) for h in range(H)], axis=1)
true_dis = np.stack([ens.disagreement(np.stack([held.episodes[i].obs[t + h] for i, t in starts]), actions[:, h])
                     for h in range(H)], axis=1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, H + 1), dis.mean(0), label="along the ensemble's rollout")
ax.plot(np.arange(1, H + 1), true_dis.mean(0), label="along the true states")
ax.set(xlabel="prediction step", ylabel="member disagreement (normalised units)")
ax.legend()
ax.grid(alpha=0.3)
fig.savefig(out / "disagreement.png", dpi=100)
display(Image(filename=str(out / "disagreement.png")))"""),
]

ATTENTION = [
    ("markdown", """\
# Attention maps of the humanoid Trajectory Transformer (paper Fig. 4)

Per layer and head, the attention weights over one window of held-out humanoid transitions. Columns (keys)
are marked by token type along the top: state (blue), action (orange), reward (green), value (red; never
attended, by the model's mask). The weights are computed from the model's own modules
(`trajformer.predict.attention_maps`: softmax of the scaled q·k over the visible keys), which the tests check
reproduce the model's attention output. The paper saw a Markovian pattern (attention to the latest
transition) in early layers and striated, per-dimension patterns later."""),
    ("code", SETUP),
    ("code", """\
import numpy as np

from trajformer.plots import attention_figure
from trajformer.predict import attention_maps, load_heldout
from trajformer.run import load_run
from trajformer.tokens import context_transition

RUN = Path(os.environ.get("TRAJFORMER_HUMANOID_RUN", "pretrained/models/humanoid-tt"))
run = load_run(RUN)
held = load_heldout("pretrained/data/humanoid-heldout.npz", run)
ep, t0 = held.episodes[0], 200
L, T = run.config.data.sequence_length, run.model.config.transition_dim
rows = [context_transition(run.discretizer, ep.obs[t], ep.act[t], ep.rew[t]) for t in range(t0, t0 + L)]
idx = torch.as_tensor(np.concatenate(rows))[None, : L * T - 1]
maps = attention_maps(run.model, idx)[:, 0].numpy()  # (layer, head, query, key)
print(f"window of {idx.shape[1]} tokens = {L} transitions of {T} (45 state, 17 action, reward, value)")"""),
    ("code", """\
out = Path(tempfile.mkdtemp(prefix="nb-attn-")) if TINY else Path("notebooks/figures/attention")
path = attention_figure(maps, run.obs_dim, run.act_dim, out / "attention.png")
display(Image(filename=str(path)))"""),
    ("markdown", """\
## How Markovian is each layer?
For queries in the last transition of the window: the share of attention on keys in the same transition,
the previous one, and older ones (mean over heads and queries)."""),
    ("code", """\
q_lo = (L - 1) * T
q_tr = np.arange(q_lo, idx.shape[1]) // T
k_tr = np.arange(idx.shape[1]) // T
for layer in range(maps.shape[0]):
    w = maps[layer][:, q_lo:]  # (head, query, key)
    same = (w * (k_tr[None, None] == q_tr[None, :, None])).sum(-1).mean()
    prev = (w * (k_tr[None, None] == q_tr[None, :, None] - 1)).sum(-1).mean()
    print(f"layer {layer}: same transition {same:.2f}, previous {prev:.2f}, older {1 - same - prev:.2f}")"""),
]

SPECS = {"quickstart": QUICKSTART, "long_horizon_humanoid": LONG_HORIZON, "attention": ATTENTION}


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook from (kind, source) cells, with a python3 kernel."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, tiny: bool, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run a notebook top to bottom from the repository root (tiny mode through TRAJFORMER_TINY=1)."""
    os.environ["TRAJFORMER_TINY"] = "1" if tiny else "0"
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def strip_progress(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop tqdm progress bars (stderr streams of carriage-return updates, or blank) from the saved outputs."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.get("output_type") == "stream" and o.get("name") == "stderr"
                                    and ("\r" in o.text or not o.text.strip()))]
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(SPECS), help=f"notebooks to build ({', '.join(SPECS)})")
    parser.add_argument("--tiny", action="store_true", help="execute in tiny mode (TRAJFORMER_TINY=1)")
    parser.add_argument("--no-run", action="store_true", help="write the sources without executing")
    args = parser.parse_args()
    NOTEBOOKS.mkdir(exist_ok=True)
    for name in args.names:
        if name not in SPECS:
            sys.exit(f"build_notebooks: error: unknown notebook {name!r}; choose from {', '.join(SPECS)}")
        nb = notebook(SPECS[name])
        if not args.no_run:
            t0 = time.perf_counter()
            strip_progress(execute(nb, args.tiny))
            print(f"{name}: executed in {time.perf_counter() - t0:.0f} s")
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")


if __name__ == "__main__":
    main()
