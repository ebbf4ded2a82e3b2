"""Figures for predictions and models: error and likelihood curves, traces, humanoid filmstrips, attention maps.

Everything writes PNGs (atomically) with the Agg backend, so it runs headless in tests and notebooks.
Poses are rendered by trajformer.render from the predicted observations.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trajformer.files import atomic_write
from trajformer.render import pose_renderer, save_video  # noqa: E402

COLORS = {"true": "black", "transformer": "tab:blue", "ensemble": "tab:orange", "oracle": "tab:green"}
ABLATION_COLORS = ("tab:purple", "tab:red", "tab:brown", "tab:pink")


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return Path(path)


def line_plot(curves: dict[str, list[tuple[float, float]]], path: str | os.PathLike, xlabel: str, ylabel: str,
              logy: bool = False) -> Path:
    """One line per named list of (x, y) points."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # e.g. a run shorter than its log_every has no points yet
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _nan(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def error_vs_horizon(record: dict, path: str | os.PathLike) -> Path:
    """Teacher-forced normalised error against horizon: mean (line) and 10-90% over starts (band)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plotted = False
    for name in ("transformer", "ensemble"):
        stats = record["teacher_forced"].get(name)
        if stats is None or all(v is None for v in stats["mean"]):  # every rollout ended by a stop token
            continue
        plotted = True
        steps = np.arange(1, len(stats["mean"]) + 1)
        ax.plot(steps, _nan(stats["mean"]), color=COLORS[name],
                label=f"{name} (mean{', argmax decode' if name == 'transformer' else ''})")
        ax.fill_between(steps, _nan(stats["q10"]), _nan(stats["q90"]), color=COLORS[name], alpha=0.2,
                        label=f"{name} (10-90%)")
    for how, ls in (("expectation", "-."), ("median", ":")):  # the transformer's other greedy decodes
        stats = record["teacher_forced"].get("decodes", {}).get(how)
        if stats is not None and any(v is not None for v in stats["mean"]):
            plotted = True
            steps = np.arange(1, len(stats["mean"]) + 1)
            ax.plot(steps, _nan(stats["mean"]), color=COLORS["transformer"], ls=ls, label=f"transformer, {how} decode")
    for name, stats in record["teacher_forced"].get("sample_mean", {}).items():  # each model's mean of samples
        if any(v is not None for v in stats["mean"]):
            plotted = True
            ax.plot(np.arange(1, len(stats["mean"]) + 1), _nan(stats["mean"]), color=COLORS[name], ls=(0, (1, 3)),
                    lw=2, label=f"{name}, mean of {record['config']['samples']} samples")
    for (name, row), color in zip(record["teacher_forced"].get("ablations", {}).items(), ABLATION_COLORS,
                                  strict=False):
        mean = _nan(row["error"]["mean"])
        if np.isfinite(mean).any():
            plotted = True
            ax.plot(np.arange(1, len(mean) + 1), mean, color=color, ls="--",
                    label=f"{name} ({len(row['obs_dims'])} dims, context {row['context_transitions']}, argmax)")
    ax.set(xlabel="prediction step", ylabel="RMS error / dataset std", yscale="log" if plotted else "linear",
           title=f"true actions fed, {record['config']['starts']} held-out starts")
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def likelihood_vs_horizon(record: dict, path: str | os.PathLike) -> Path:
    """Open-loop histogram log-likelihood of the true states against horizon, with the discrete oracle."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in ("transformer", "ensemble", "oracle"):
        curve = record["open_loop"].get(name)
        if curve is None:
            continue
        curve = _nan(list(curve))
        ax.plot(np.arange(1, len(curve) + 1), curve, color=COLORS[name], ls="--" if name == "oracle" else "-",
                label="discrete oracle" if name == "oracle" else name)
    cfg = record["config"]
    ax.set(xlabel="prediction step", ylabel="log-likelihood (nats / dim)",
           title=f"open loop, {cfg['samples']} samples x {cfg['starts']} starts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def traces(true: np.ndarray, preds: dict[str, np.ndarray], path: str | os.PathLike, samples: np.ndarray | None = None,
           dims: list[int] | None = None, cols: int = 5) -> Path:
    """Per-dimension traces of one start: true (H, D), point predictions {name: (H, D)}, open-loop samples
    (M, H, D) in faint blue."""
    dims = list(range(true.shape[1])) if dims is None else dims
    rows = -(-len(dims) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.6 * rows), squeeze=False, sharex=True)
    steps = np.arange(1, len(true) + 1)
    for ax, d in zip(axes.flat, dims, strict=False):
        if samples is not None:
            ax.plot(steps, samples[:, :, d].T, color=COLORS["transformer"], alpha=0.08, lw=0.6)
        ax.plot(steps, true[:, d], color=COLORS["true"], lw=1.2)
        for name, pred in preds.items():
            ax.plot(steps, pred[:, d], color=COLORS[name], lw=1.0)
        ax.set_title(f"dim {d}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(dims) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=COLORS[n]) for n in ["true", *preds]]
    fig.legend(handles, ["true", *preds], loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def filmstrip(rows: dict[str, list[np.ndarray]], steps: list[int], path: str | os.PathLike) -> Path:
    """A grid of frames: one row per name (true, transformer, ensemble), one column per step."""
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(1.3 * len(steps), 1.4 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows.items()):
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(frames[step])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t+{step}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout(pad=0.2)
    return save_figure(fig, path, dpi=120)


def prediction_figures(record: dict, out: Path, true: np.ndarray, tf: dict, ens_tf: dict | None, ol: dict,
                       ens_ol: dict | None, start: np.ndarray, env: dict, obs_indices: np.ndarray,
                       render: bool = True) -> dict:
    """All of `trajformer predict`'s figures for its record and arrays; returns {name: path}."""
    files = {"error_vs_horizon": str(error_vs_horizon(record, out / "error_vs_horizon.png")),
             "likelihood_vs_horizon": str(likelihood_vs_horizon(record, out / "likelihood_vs_horizon.png"))}
    preds = {"transformer": tf["obs"][0, 0]}
    if ens_tf is not None:
        preds["ensemble"] = ens_tf["obs"][0, 0]
    files["traces"] = str(traces(true[0], preds, out / "traces.png", samples=ol["obs"][0]))
    renderer = pose_renderer(env, obs_indices) if render else None
    if renderer is None:
        files["filmstrip"] = None
        return files
    rows = {"true": renderer.render(np.concatenate([start[:1], true[0]]), stop_at_nan=False)}
    for name, pred in preds.items():
        rows[name] = renderer.render(np.concatenate([start[:1], pred]), stop_at_nan=False)
    horizon = len(true[0])
    steps = sorted({*range(0, horizon + 1, max(1, horizon // 10)), horizon})
    files["filmstrip"] = str(filmstrip(rows, steps, out / "filmstrip.png"))
    side_by_side = [np.concatenate(frames, axis=1) for frames in zip(*rows.values(), strict=True)]
    files["video"] = str(save_video(side_by_side, out / "prediction.mp4"))
    return files


def attention_figure(maps: np.ndarray, obs_dim: int, act_dim: int, path: str | os.PathLike) -> Path:
    """Attention weights (n_layer, n_head, t, t) of one window, one panel per layer and head; key columns
    are tinted by token type (state, action, reward, value) along the top."""
    n_layer, n_head, t, _ = maps.shape
    T = obs_dim + act_dim + 2
    kinds = np.array([0] * obs_dim + [1] * act_dim + [2, 3])[np.arange(t) % T]
    palette = np.array([[0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16]])
    strip = palette[kinds][None].repeat(max(2, t // 40), axis=0)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(2.4 * n_head, 2.5 * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            weights = maps[layer, head] ** 0.5
            ax.imshow(weights, cmap="magma", interpolation="nearest", extent=(0, t, t, 0),
                      vmax=np.quantile(weights[weights > 0], 0.99))
            ax.imshow(strip, extent=(0, t, 0, -len(strip)), interpolation="nearest", aspect="auto")
            ax.set_ylim(t, -len(strip))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette]
    fig.legend(handles, ["state", "action", "reward", "value"], loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("attention (sqrt of weights, colour capped at the 99th percentile): rows = queries, columns = keys",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return save_figure(fig, path, dpi=100)
