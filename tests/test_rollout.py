"""Rollouts: end-to-end control of a tiny task, `trajformer plan` (JSON, bad input), batched envs, video."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import minari
import numpy as np
import pytest
import torch
from pointline import DATASET_ID, ENV_ID, TRAIN_SEED, random_returns

from trajformer import cli
from trajformer.config import Config, config_from_dict, load_config, to_toml
from trajformer.discretizer import Discretizer
from trajformer.info import describe
from trajformer.metrics import score_reference, summarize
from trajformer.model import GPT, GPTConfig
from trajformer.planner import plan_config
from trajformer.render import EpisodeVideo
from trajformer.rollout import evaluate
from trajformer.run import load_run, save_run


@pytest.fixture(scope="module")
def point_run(point_datasets):
    """A tiny model trained for ~30 s on the point-line dataset (in point_datasets/datasets)."""
    from trajformer.train import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
        cfg = config_from_dict({
            "data": {"dataset": DATASET_ID, "sequence_length": 4},
            "discretizer": {"n_bins": 30},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0},
            "train": {"batch_size": 64, "learning_rate": 1e-3, "max_steps": 600, "eval_every": 300,
                      "checkpoint_every": 600, "log_every": 100, "num_threads": 1, "seed": TRAIN_SEED},
            "plan": {"beam_width": 16, "n_expand": 2, "horizon": 5, "max_context_transitions": 3},
        })
        yield train(cfg, point_datasets / "run", progress=False)


def test_reward_planning_beats_imitation_beats_random(point_run):
    """Over 3 seed groups of 12 episodes: reward objective > likelihood objective > random policy.

    Measured over 5 groups: reward -1.63 to -1.69, likelihood -2.44 to -2.57, random -9.2 to -11.1 (best -1.0).
    """
    run = load_run(point_run)
    for seed in (1000, 2000, 3000):
        means = {}
        for objective in ("reward", "likelihood"):
            record = evaluate(run, plan_config(run, [f"plan.objective={objective}"]), episodes=12, num_envs=12,
                              seed=seed, progress=False)
            means[objective] = record["mean_return"]
        means["random"] = random_returns(12, seed).mean()
        assert means["reward"] > means["likelihood"] + 0.3, means
        assert means["likelihood"] > means["random"] + 4.0, means


def test_batched_envs_give_the_same_episodes_as_one_env(point_run):
    run = load_run(point_run)
    cfg = plan_config(run, ["plan.beam_width=4", "plan.horizon=3"])
    one = evaluate(run, cfg, episodes=3, num_envs=1, max_steps=8, seed=7, progress=False)
    three = evaluate(run, cfg, episodes=3, num_envs=3, max_steps=8, seed=7, progress=False)
    assert one["returns"] == three["returns"]
    assert one["lengths"] == three["lengths"] == [8, 8, 8]


def test_cli_plan_writes_json(point_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    out = tmp_path / "plan.json"
    cli.main(["plan", str(point_run), "--episodes", "3", "--num-envs", "2", "--max-steps", "6", "--seed", "3",
              "--set", "plan.beam_width=4", "--set", "plan.horizon=3", "--json", str(out)])
    record = json.loads(out.read_text())
    assert {"returns", "lengths", "mean_return", "stderr", "normalized_score", "score_reference",
            "seconds_per_step", "plan_log_likelihood", "config"} <= set(record)
    assert record["lengths"] == [6, 6, 6] and len(record["returns"]) == 3
    assert record["mean_return"] == pytest.approx(np.mean(record["returns"]))
    # The dataset carries ref scores (PointLine is not D4RL's), of whole episodes: none for episodes cut at 6 steps.
    assert record["score_reference"] is None and record["normalized_score"] is None
    assert record["config"]["plan"]["beam_width"] == 4 and record["config"]["env"] == ENV_ID
    assert record["plan_log_likelihood"] < 0
    # Episodes cut at 6 steps read against the data's own first 6 steps.
    episodes = list(minari.load_dataset(DATASET_ID).iterate_episodes())
    assert record["dataset_mean_return"] == pytest.approx(
        np.mean([sum(ep.rewards[:6]) for ep in episodes if len(ep.rewards) >= 6 or ep.terminations[-1]]))
    printed = capsys.readouterr().out
    assert "episode 2: return" in printed and "mean return" in printed
    assert "normalised score: none for episodes cut at 6 steps" in printed and "over their first 6 steps" in printed


@pytest.mark.parametrize("args, message", [
    (["--env", "Pendulum-v1"], "was trained on 2-dim observations and 1-dim actions"),
    (["--env", "CartPole-v1"], "has a Discrete action space"),
    (["--set", "plan.beam_width=0"], "plan.beam_width must be >= 1"),
    (["--set", "plan.horizon=0"], "plan.horizon must be >= 1"),
    (["--set", "plan.cdf_act=2"], "plan.cdf_act must be in (0, 1]"),
    (["--set", "plan.max_context_transitions=1"], "plan.max_context_transitions must be >= 2"),
    (["--set", "plan.max_context_transitions=9"], "set plan.max_context_transitions <= 4"),
    (["--video", "x.mp4"], "cannot render"),
    (["--video", "x"], "--video x: name an .mp4 or .gif file, e.g. --video x.mp4"),
    (["--json", "."], "--json . is a directory"),
    (["--episodes", "0"], "--episodes must be >= 1, got 0"),
    (["--seed", "-1"], "--seed -1: pass a seed >= 0"),
])
def test_cli_plan_bad_input_is_a_one_line_error(point_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", str(point_run), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trajformer plan: error:") and message in err and "\n" not in err


def test_plan_reads_no_reference_from_data_other_than_the_runs(point_run, tmp_path, monkeypatch, capsys):
    """--max-steps reads the data's first steps as the reference: a dataset id that now holds other data (collected
    again) gives none, with the reason, and the episodes' report still comes."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["provenance"]["dataset_sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(meta))
    cli.main(["plan", str(run), "--max-steps", "3", "--set", "plan.beam_width=2", "--set", "plan.horizon=2"])
    printed = capsys.readouterr().out
    assert "mean return" in printed and f"the dataset's own episodes: not read ({DATASET_ID} holds other data " \
        "than" in printed


def test_an_unwritable_json_path_is_refused_before_any_episode(point_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("trajformer.rollout.run_episodes", lambda *a, **k: pytest.fail("episodes ran"))
    with pytest.raises(SystemExit):
        cli.main(["plan", str(point_run), "--json", str(tmp_path / "a-file" / "plan.json")])
    err = capsys.readouterr().err.strip()
    assert "a-file is not a directory); name a --json file in a folder you can write to" in err and "\n" not in err


def test_cli_plan_missing_or_corrupt_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", str(tmp_path / "nope")])
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(SystemExit):
        cli.main(["plan", str(tmp_path)])
    assert "run.json is corrupt" in capsys.readouterr().err
    # A quickstart output directory: the error names the run directory inside it.
    (tmp_path / "qs" / "run").mkdir(parents=True)
    (tmp_path / "qs" / "run" / "run.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["plan", str(tmp_path / "qs")])
    assert f"did you mean {tmp_path / 'qs' / 'run'}?" in capsys.readouterr().err


def test_shipped_models_load_by_name(tmp_path, monkeypatch):
    from trajformer.info import describe
    from trajformer.run import shipped_models

    assert "hopper-medium" in shipped_models()
    monkeypatch.chdir(tmp_path)  # anywhere: the name resolves to the shipped model, not a relative path
    assert load_run("hopper-medium").meta["env"]["id"] == "Hopper-v5"
    assert describe("hopper-medium").startswith("run directory ")


def test_shipped_models_evaluate_without_their_datasets(tmp_path, monkeypatch):
    """Every shipped model records its dataset's reference return, so `trajformer eval` of it needs no dataset."""
    from trajformer.rollout import dataset_reference
    from trajformer.run import shipped_models

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))  # no datasets here
    for name in shipped_models():  # reading a dataset here would raise FileNotFoundError
        run = load_run(name)
        recorded = run.meta["dataset_stats"]["complete_return_mean"]
        assert recorded > 0 and dataset_reference(run, download=False) == recorded, name


def test_score_reference_and_summary():
    assert score_reference("Hopper-v5", {}) == ((-20.272305, 3234.3), "d4rl-v2")
    assert score_reference("Walker2d-v5", {"ref_min_score": 0.0, "ref_max_score": 1.0})[1] == "d4rl-v2"
    assert score_reference("Pendulum-v1", {"ref_min_score": -5.0, "ref_max_score": 5.0}) == ((-5.0, 5.0), "dataset")
    assert score_reference("Pendulum-v1", {"ref_min_score": None, "ref_max_score": None}) == (None, None)
    # D4RL's returns are of its default envs' 1000-step episodes: not for other kwargs or limits, nor cut episodes.
    refs = {"ref_min_score": 5.0, "ref_max_score": None}
    assert score_reference("Hopper-v5", refs, {}, 1000, max_steps=1000)[1] == "d4rl-v2"
    for kwargs, limit, max_steps in [({"terminate_when_unhealthy": False}, 1000, None), ({}, 200, None),
                                     ({}, 1000, 20), ({}, None, 20)]:
        assert score_reference("Hopper-v5", refs, kwargs, limit, max_steps) == (None, None)
    # D4RL's expert return, which collect recorded as a dataset's own for any time limit before 2026-12-07: not used.
    assert score_reference("Hopper-v5", {"ref_min_score": 12.6, "ref_max_score": 3234.3}, {}, 50) == (None, None)
    s = summarize([1.0, 3.0], [10, 20], (0.0, 4.0))
    assert s["mean_return"] == 2.0 and s["stderr"] == pytest.approx(1.0) and s["normalized_score"] == 50.0
    assert summarize([1.0], [3], None)["stderr"] is None


def hopper_run(path, obs_indices: list[int]):
    """A run directory for Hopper-v5 with an observation selection: a random-init GPT, saved through run.py."""
    cfg = Config()
    cfg.data.sequence_length = 3
    cfg.plan.beam_width, cfg.plan.horizon, cfg.plan.max_context_transitions = 2, 3, 2
    dS, dA, n_bins = len(obs_indices), 3, 16
    T = dS + dA + 2
    gpt = GPTConfig(obs_dim=dS, act_dim=dA, n_bins=n_bins, block_size=3 * T - 1, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    disc = Discretizer.fit(np.random.default_rng(0).normal(size=(300, T)), n_bins)
    meta = {"dataset_id": "none", "env": {"id": "Hopper-v5", "kwargs": {}, "max_episode_steps": 1000},
            "obs_indices": obs_indices, "raw_obs_dim": 11}
    return save_run(path, cfg, GPT(gpt), disc, meta)


def test_video_shows_real_episode_beside_planned_states(tmp_path):
    run_dir = hopper_run(tmp_path / "hopper", list(range(8)))  # qvel dims 8..10 unseen: kept from the real state
    out = tmp_path / "episode.mp4"
    cli.main(["plan", str(run_dir), "--max-steps", "4", "--video", str(out), "--json", str(tmp_path / "h.json")])
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["score_reference"] is None and "video_note" not in record  # 4 steps: no whole-episode score
    frames = np.stack(imageio.mimread(out))
    assert len(frames) == record["lengths"][0]
    height, width = frames.shape[1:3]
    assert width == 2 * height  # real | planned
    assert frames[:, :, width // 2 :].mean() > 20  # the planned panel is rendered, not left black
    # Both panels carry a label in their top-left corner: a dark box with white text.
    for left in (0, width // 2):
        corner = frames[0, 2:16, left + 2 : left + 40]
        assert corner.max() > 200 and np.percentile(corner, 25) < 30
    assert record["video_fps"] == gym.make("Hopper-v5").metadata["render_fps"]  # the env's real time


def test_pose_renderer_draws_the_state_the_env_draws():
    """A Hopper state set from its observation alone (x integrated from the velocity) renders as the env that
    reached it by stepping renders it, while the same state with its torso and legs bent renders differently."""
    from trajformer.render import make_env, pose_renderer

    spec = {"id": "Hopper-v5", "kwargs": {}}
    renderer = pose_renderer(spec, np.arange(11), size=96)
    camera = renderer.env.unwrapped.mujoco_renderer.default_cam_config
    env = make_env("Hopper-v5", {"width": 96, "height": 96, "default_camera_config": camera}, None, render=True)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    observations = [obs]
    for _ in range(15):
        observations.append(env.step(rng.uniform(-1, 1, 3))[0])
    data = env.unwrapped.data
    x_before = data.qpos[0] - data.qvel[0] * env.unwrapped.dt  # render() adds one step of the x velocity
    frame = renderer.render(observations[-1][None], xy=[x_before])[0].astype(float)
    stepped = env.render().astype(float)
    bent = observations[-1].copy()
    bent[1:5] += 0.4  # torso and leg angles
    other = renderer.render(bent[None], xy=[x_before])[0].astype(float)
    changed = [(np.abs(f - stepped).max(-1) > 30).mean() for f in (frame, other)]  # share of pixels that change
    assert changed[0] < 0.001 and changed[1] > 0.02
    env.close()
    renderer.env.close()


def test_rendering_time_is_not_planning_time(tmp_path, monkeypatch):
    """seconds_per_step counts planning and env steps, not video frames: on a clock that only the frames move
    (100 s each), the evaluation took no time at all."""
    run_dir = hopper_run(tmp_path / "hopper", list(range(11)))
    add, clock = EpisodeVideo.add, [0.0]

    def slow_add(self, *args):
        clock[0] += 100.0
        add(self, *args)

    monkeypatch.setattr(EpisodeVideo, "add", slow_add)
    monkeypatch.setattr("trajformer.rollout.time.perf_counter", lambda: clock[0])
    record = evaluate(load_run(run_dir), episodes=1, max_steps=3, video=tmp_path / "v.mp4", progress=False,
                      video_speed=0.25)
    assert clock[0] >= 300.0 and record["seconds_per_step"] == 0.0
    assert record["video_fps"] == 0.25 * gym.make("Hopper-v5").metadata["render_fps"]


def test_video_falls_back_to_gif_name(tmp_path, monkeypatch):
    """An .mp4 asked for without imageio-ffmpeg is written as a .gif; a --video name that cannot be written is a
    one-line error before any episode runs."""
    run_dir = hopper_run(tmp_path / "hopper", list(range(11)))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("trajformer.rollout.run_episodes", lambda *a, **k: pytest.fail("episodes ran"))
    with pytest.raises(ValueError, match="a-file is not a directory.*name a --video file in a folder"):
        evaluate(load_run(run_dir), episodes=1, max_steps=2, video=tmp_path / "a-file" / "e.mp4", progress=False)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # not installed: importing it raises ImportError
    record = evaluate(load_run(run_dir), episodes=1, max_steps=2, video=tmp_path / "e.mp4", progress=False)
    assert record["video"] == str(tmp_path / "e.gif") and os.path.getsize(record["video"]) > 0


def test_a_broken_render_backend_is_one_line_before_any_episode(tmp_path, monkeypatch):
    """MUJOCO_GL naming a backend that cannot draw (osmesa without OSMesa fails deep in PyOpenGL): `plan --video`
    says so in one line before the episodes, and predict's filmstrip is skipped with a warning."""
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    from trajformer.render import pose_renderer

    def broken(self):
        raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    run_dir = hopper_run(tmp_path / "hopper", list(range(11)))
    monkeypatch.setattr(MujocoEnv, "render", broken)
    monkeypatch.setattr("trajformer.rollout.run_episodes", lambda *a, **k: pytest.fail("episodes ran"))
    with pytest.raises(ValueError, match="cannot render Hopper-v5 frames offscreen .*glGetError.*MUJOCO_GL"):
        evaluate(load_run(run_dir), episodes=1, max_steps=2, video=tmp_path / "e.mp4", progress=False)
    with pytest.warns(UserWarning, match="no filmstrip or video: cannot render"):
        assert pose_renderer({"id": "Hopper-v5", "kwargs": {}}, np.arange(11)) is None


def test_behaviour_cloning_runs_end_to_end_and_beats_random(point_run, tmp_path, monkeypatch, capsys):
    """`trajformer bc` on the point-line data: trained on the run's split, evaluated with the shared protocol.
    Its return sits between random and the planner (measured: BC about -5, random -10, planner -1.6)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    out = tmp_path / "bc"
    cli.main(["bc", str(point_run / "config.toml"), "--out", str(out), "--steps", "1500", "--episodes", "12",
              "--num-envs", "6", "--hp", f"seed={TRAIN_SEED}"])
    meta = json.loads((out / "bc.json").read_text())
    record = meta["evaluation"]
    assert len(record["returns"]) == 12 and record["config"]["episodes"] == 12
    assert record["mean_return"] > random_returns(12, 0).mean() + 2.0
    assert meta["split"] == json.loads((point_run / "run.json").read_text())["split"]  # the TT run's split
    assert meta["dataset_mean_return"] == pytest.approx(
        np.mean([sum(ep.rewards) for ep in minari.load_dataset(DATASET_ID).iterate_episodes()]))
    assert "mean return" in capsys.readouterr().out
    cli.main(["bc", str(point_run / "config.toml"), "--out", str(tmp_path / "bc5"), "--steps", "100", "--episodes",
              "2", "--max-steps", "5"])  # cut episodes: read against the data's first-5-step mean
    record = json.loads((tmp_path / "bc5" / "bc.json").read_text())["evaluation"]
    assert record["lengths"] == [5, 5] and record["config"]["max_steps"] == 5
    first5 = [sum(ep.rewards[:5]) for ep in minari.load_dataset(DATASET_ID).iterate_episodes()]
    assert record["dataset_prefix_return_mean"] == pytest.approx(np.mean(first5))
    assert f"over the first 5 steps {np.mean(first5):.1f}" in capsys.readouterr().out


def test_data_without_complete_episodes_has_no_mean_and_says_so(point_run, tmp_path, monkeypatch, capsys):
    """Every episode cut by the end of collection: no dataset mean; bc and eval print '-' for it, not a traceback."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    monkeypatch.setattr("trajformer.data.complete_episodes", lambda data: [])
    cli.main(["bc", str(point_run / "config.toml"), "--out", str(tmp_path / "bc"), "--steps", "50", "--episodes", "2"])
    assert json.loads((tmp_path / "bc" / "bc.json").read_text())["dataset_mean_return"] is None
    assert "dataset mean return over complete episodes -;" in capsys.readouterr().out
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["dataset_stats"]["complete_return_mean"] = None  # as training records it for such data
    (run / "run.json").write_text(json.dumps(meta))
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5"])
    assert json.loads((run / "eval.json").read_text())["dataset_mean_return"] is None
    assert "dataset mean return -" in capsys.readouterr().out


def test_evaluation_protocol_of_a_run_without_env_is_a_one_line_error(point_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["env"] = None  # a dataset with no env spec
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert "records no environment" in err and "trajformer plan --env ENV_ID" in err


def test_evaluation_protocol_writes_eval_json_beside_references(point_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    bc = tmp_path / "bc"
    cli.main(["bc", str(point_run / "config.toml"), "--out", str(bc), "--steps", "300", "--episodes", "4"])
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    with pytest.raises(SystemExit):  # BC evaluated on another number of episodes: refused before planning
        cli.main(["eval", str(run), "--episodes", "3", "--settings", "32x5", "--bc", str(bc)])
    assert "re-run `trajformer bc` with --episodes 3" in capsys.readouterr().err
    cut = tmp_path / "bc-cut"
    cli.main(["bc", str(point_run / "config.toml"), "--out", str(cut), "--steps", "50", "--episodes", "4",
              "--max-steps", "5", "--seed", "3", "--set", "data.split_seed=77"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # BC on another protocol and split: refused before planning
        cli.main(["eval", str(run), "--episodes", "4", "--settings", "32x5", "--bc", str(cut)])
    err = capsys.readouterr().err.strip()
    split = json.loads((run / "run.json").read_text())["split"]
    words = (f"validation fraction {split['validation_fraction']}, "
             f"{len(split['train_episodes'])} + {len(split['validation_episodes'])} episodes")
    assert (f"is not BC on this protocol (its episode split is seed 77, {words}, the run's seed {split['seed']}, "
            f"{words}; episodes cut at 5 steps; seeds from 3, not 0)") in err
    assert "\n" not in err
    cli.main(["eval", str(run), "--episodes", "4", "--settings", "32x5,official", "--bc", str(bc)])
    assert capsys.readouterr().out.count("episode length") == 2
    record = json.loads((run / "eval.json").read_text())
    bc_record = json.loads((bc / "bc.json").read_text())
    assert record["episodes"] == 4 and record["bc_mean_return"] == bc_record["evaluation"]["mean_return"]
    assert record["dataset_mean_return"] == pytest.approx(bc_record["dataset_mean_return"])
    cheap, official = record["settings"]["32x5"], record["settings"]["official"]
    assert cheap["plan"]["beam_width"] == 32 and cheap["plan"]["horizon"] == 5
    # The official setting whatever the run's own [plan] (beam 16) says; context capped by its windows of 4.
    assert (official["plan"]["beam_width"], official["plan"]["horizon"]) == (128, 15)
    assert official["plan"]["max_context_transitions"] == 4 and official["plan"]["cdf_act"] == 0.6
    for r in (cheap, official):  # point-line episodes always run 20 steps; its reference scores are -10 and -1
        assert r["lengths"] == [20] * 4 and r["mean_return"] == pytest.approx(np.mean(r["returns"]))
        assert r["stderr"] == pytest.approx(np.std(r["returns"], ddof=1) / 2.0)
        assert r["normalized_score"] == pytest.approx(100.0 * (r["mean_return"] + 10.0) / 9.0)
        assert r["score_reference"] == "dataset"  # named in eval.json (PointLine is not D4RL's)
        assert r["seconds_per_step"] > 0


def test_official_settings_per_task_and_protocol_overrides(point_run, tmp_path, capsys):
    from trajformer.rollout import official_plan

    assert official_plan("Hopper-v5", "trajformer/hopper-medium-v0")["beam_width"] == 128
    assert official_plan("HalfCheetah-v5", "trajformer/halfcheetah-medium-v0")["horizon"] == 5
    assert official_plan("HalfCheetah-v5", "trajformer/halfcheetah-medium-expert-v0") == {
        **official_plan("Hopper-v5", ""), "beam_width": 32}
    assert official_plan("HalfCheetah-v5", "mujoco/halfcheetah/expert-v0") == official_plan("Hopper-v5", "")
    replay = official_plan("Walker2d-v5", "trajformer/walker2d-replay-v0")
    assert (replay["horizon"], replay["k_act"], replay["cdf_act"]) == (20, 40, None)
    run = tmp_path / "run"  # a copy: a refusal that regressed would write into the module's shared run
    shutil.copytree(point_run, run)
    with pytest.raises(SystemExit):  # the protocol fixes what is searched; only how it runs may change
        cli.main(["eval", str(run), "--episodes", "2", "--set", "plan.horizon=3"])
    assert "the protocol fixes plan.horizon" in capsys.readouterr().err


def test_protocol_plans_once_where_the_official_setting_is_the_cheap_one(point_run, tmp_path, monkeypatch):
    """halfcheetah-medium's official setting is beam 32 / horizon 5: "official" and "32x5" share one evaluation."""
    from trajformer import rollout

    calls = []
    real = rollout.evaluate
    monkeypatch.setattr(rollout, "official_plan", lambda env, data: {**rollout.OFFICIAL, **rollout.CHEAP})
    monkeypatch.setattr(rollout, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    record = rollout.evaluation_protocol(str(run), episodes=2, settings=("official", "32x5"), progress=False)
    assert len(calls) == 1 and record["settings"]["official"] == record["settings"]["32x5"]
    assert record["settings"]["official"]["plan"]["horizon"] == 5


def test_evaluations_of_two_settings_at_once_keep_each_others_progress(point_run, tmp_path, monkeypatch):
    """Two `trajformer eval` processes on one run directory (say 32x5 and the official setting, one core each):
    each saves only its own entry of eval.partial.json under a lock, so neither overwrites the other's progress;
    a second process on the same setting is refused before it plans."""
    from trajformer import rollout

    run = tmp_path / "run"
    shutil.copytree(point_run, run)

    def fake_evaluate(_run, plan_cfg, episodes, num_envs, progress, skip, resume, on_progress):
        if plan_cfg.beam_width == 32:  # this process: a save, the other process's saves and stop, another save
            on_progress({"finished": {0: (1.0, 5)}, "in_progress": [], "steps": 5, "seconds": 1.0})
            with pytest.raises(ValueError, match="another `trajformer eval` is evaluating beam 32 / horizon 5"):
                rollout.evaluation_protocol(str(run), episodes=2, settings=("32x5",), progress=False)
            with pytest.raises(KeyboardInterrupt):
                rollout.evaluation_protocol(str(run), episodes=2, settings=("official",), progress=False)
            on_progress({"finished": {0: (1.0, 5), 1: (3.0, 5)}, "in_progress": [], "steps": 10, "seconds": 2.0})
        else:  # the other process: one episode saved, then stopped (its session ends)
            on_progress({"finished": {0: (7.0, 5)}, "in_progress": [], "steps": 5, "seconds": 1.0})
            raise KeyboardInterrupt

    monkeypatch.setattr(rollout, "evaluate", fake_evaluate)
    record = rollout.evaluation_protocol(str(run), episodes=2, settings=("32x5",), progress=False)
    assert record["settings"]["32x5"]["returns"] == [1.0, 3.0]
    runs = json.loads((run / "eval.partial.json").read_text())["runs"]
    assert [(r["setting"]["beam_width"], r["episodes"]) for r in runs] == [(128, {"0": [7.0, 5]})]


def test_protocol_names_a_carried_context_in_its_setting(point_run, point_datasets, tmp_path, monkeypatch):
    """A window model's carried context (its default) and `--set plan.carry_context=false` are two searches: the
    protocol keeps neither one's finished rows nor its episodes under way for the other; an absolute model refuses
    plan.carry_context=true before any work."""
    from trajformer import rollout
    from trajformer.train import train

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    cfg = config_from_dict({
        "data": {"dataset": DATASET_ID, "sequence_length": 4}, "discretizer": {"n_bins": 30},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "attention": "window", "window_transitions": 2},
        "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "num_threads": 1},
    })
    run = train(cfg, tmp_path / "window", progress=False)
    calls = []

    def fake_evaluate(_run, plan_cfg, episodes, num_envs, progress, skip, resume, on_progress):
        calls.append((plan_cfg.carry_context, sorted(skip)))
        value = 1.0 if plan_cfg.carry_context else 2.0
        on_progress({"finished": {0: (value, 5)}, "in_progress": [], "steps": 5, "seconds": 1.0})
        if len(calls) == 1:
            raise KeyboardInterrupt  # the carried search stops after one of its two episodes
        on_progress({"finished": {0: (value, 5), 1: (value, 5)}, "in_progress": [], "steps": 10, "seconds": 2.0})

    monkeypatch.setattr(rollout, "evaluate", fake_evaluate)
    carry = {"episodes": 2, "settings": ("32x5",), "progress": False}  # a window model carries unless told not to
    with pytest.raises(KeyboardInterrupt):
        rollout.evaluation_protocol(str(run), **carry)
    plain = rollout.evaluation_protocol(str(run), episodes=2, settings=("32x5",), progress=False,
                                        overrides=["plan.carry_context=false"])
    assert plain["settings"]["32x5"]["returns"] == [2.0, 2.0] and "carry_context" not in plain["settings"]["32x5"]
    carried = rollout.evaluation_protocol(str(run), **carry)["settings"]["32x5"]
    assert carried["returns"] == [1.0, 1.0] and carried["plan"]["carry_context"] is True
    assert calls == [(True, []), (False, []), (True, [0])]  # the carried search resumed its own finished episode
    assert not (run / "eval.partial.json").exists()  # each finished search took its entry away
    rollout.evaluation_protocol(str(run), **carry, again=True)
    assert calls[3:] == [(True, [])]  # --again plans the carried search over, from its first episode
    with pytest.raises(ValueError, match="plan.carry_context = true needs model.attention"):
        rollout.evaluation_protocol(str(point_run), **carry, overrides=["plan.carry_context=true"])


def _stop_after(monkeypatch, rollout, reports: int, every: float = 60.0) -> list[dict]:
    """Make the protocol's run_episodes report every `every` seconds and raise KeyboardInterrupt after its
    `reports`-th report (a session ending); returns the reports seen."""
    real = rollout.run_episodes
    seen: list[dict] = []

    def stopping(*args, on_progress=None, **kwargs):
        def counting(state):
            on_progress(state)
            seen.append(json.loads(json.dumps(state)))
            if len(seen) == reports:
                raise KeyboardInterrupt
        return real(*args, on_progress=counting, progress_every=every, **kwargs)

    monkeypatch.setattr(rollout, "run_episodes", stopping)
    return seen


def test_protocol_resumes_an_interrupted_evaluation(point_run, tmp_path, monkeypatch):
    """Episodes finished before a stop are kept in eval.partial.json; the rerun plans only the others and ends
    with what an uninterrupted evaluation gives; the partial file goes once eval.json is written."""
    from trajformer import rollout

    for name in ("whole", "stopped"):
        shutil.copytree(point_run, tmp_path / name)
    whole = rollout.evaluation_protocol(str(tmp_path / "whole"), episodes=4, settings=("32x5",), num_envs=2,
                                        progress=False)
    run_dir = tmp_path / "stopped"
    real = rollout.run_episodes
    seen = _stop_after(monkeypatch, rollout, reports=1, every=math.inf)  # a report only as episodes end
    with pytest.raises(KeyboardInterrupt, match=r"interrupted; \d finished episodes .* are kept in .*eval\.partial\."
                                                "json: the same command goes on"):
        rollout.evaluation_protocol(str(run_dir), episodes=4, settings=("32x5",), num_envs=2, progress=False)
    partial = json.loads((run_dir / "eval.partial.json").read_text())
    finished = sorted(seen[-1]["finished"])
    assert 1 <= len(finished) < 4 and sorted(partial["runs"][0]["episodes"]) == finished
    assert not (run_dir / "eval.json").exists()
    under_way = [line for line in describe(str(run_dir)).splitlines() if line.startswith("  under way")]
    assert len(under_way) == 1 and f"{len(finished)} of 4 episodes done" in under_way[0], under_way
    mid = [len(r["actions"]) for r in partial["runs"][0]["in_progress"]]
    assert f"at most {(4 - len(finished) - len(mid)) * 20 + sum(20 - a for a in mid)} left" in under_way[0]
    planned = []
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, skip=frozenset(), **k: planned.append(skip) or real(
        *a, skip=skip, **k))
    resumed = rollout.evaluation_protocol(str(run_dir), episodes=4, settings=("32x5",), num_envs=2, progress=False)
    assert planned == [frozenset(int(e) for e in finished)]  # only the missing episodes were planned
    assert resumed["settings"]["32x5"]["returns"] == whole["settings"]["32x5"]["returns"]
    assert not (run_dir / "eval.partial.json").exists() and (run_dir / "eval.json").is_file()
    # `trajformer info` shows the result, and says so when model.pt has changed since.
    row = f"32x5, beam 32 / horizon 5 (float32): {resumed['settings']['32x5']['mean_return']:.1f} +- "
    text = describe(str(run_dir))
    assert row in text and "under way" not in text and "other weights" not in text
    torch.save({k: v + 1e-3 if v.is_floating_point() else v
                for k, v in torch.load(run_dir / "model.pt", weights_only=True).items()},
               run_dir / "model.pt")
    assert "other weights than model.pt's" in describe(str(run_dir))


def test_sigterm_stops_trajformer_eval_like_ctrl_c(point_run, tmp_path, monkeypatch, capsys):
    """`kill` (SIGTERM, also a scheduler's time limit) mid-evaluation: one line, exit 130, the finished episodes kept;
    the same command goes on, and the handler is given back afterwards."""
    import signal

    from trajformer import rollout

    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    real = rollout.run_episodes

    def killed(*args, on_progress=None, **kwargs):
        def report(state):
            on_progress(state)
            signal.raise_signal(signal.SIGTERM)  # after the first finished episodes are saved
        return real(*args, on_progress=report, progress_every=math.inf, **kwargs)

    monkeypatch.setattr(rollout, "run_episodes", killed)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(run), "--episodes", "4", "--settings", "32x5", "--num-envs", "2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and "\n" not in err and "Traceback" not in err
    assert "interrupted; " in err and "the same command goes on" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    kept = json.loads((run / "eval.partial.json").read_text())["runs"][0]["episodes"]
    assert 1 <= len(kept) < 4
    monkeypatch.setattr(rollout, "run_episodes", real)
    cli.main(["eval", str(run), "--episodes", "4", "--settings", "32x5", "--num-envs", "2"])
    assert len(json.loads((run / "eval.json").read_text())["settings"]["32x5"]["returns"]) == 4


def test_protocol_resumes_mid_episode_exactly(point_run, tmp_path, monkeypatch):
    """Stopped mid-episode (episodes under way are saved with their actions and the planner's slots), a rerun
    replays the actions, restores the planner and ends with exactly the uninterrupted returns, counting each
    env step once; fewer --num-envs than episodes under way still resumes them all."""
    from trajformer import rollout

    for name in ("whole", "stopped"):
        shutil.copytree(point_run, tmp_path / name)
    kw = dict(episodes=3, settings=("32x5",), progress=False)
    real_run, counted = rollout.run_episodes, []
    real_record = rollout.episode_record
    monkeypatch.setattr(rollout, "episode_record", lambda results, steps, *a: counted.append(steps) or real_record(
        results, steps, *a))
    whole = rollout.evaluation_protocol(str(tmp_path / "whole"), num_envs=3, **kw)["settings"]["32x5"]
    run_dir = tmp_path / "stopped"
    seen = _stop_after(monkeypatch, rollout, reports=4, every=0.0)  # a report after every step
    with pytest.raises(KeyboardInterrupt):
        rollout.evaluation_protocol(str(run_dir), num_envs=3, **kw)
    entry = json.loads((run_dir / "eval.partial.json").read_text())["runs"][0]
    assert [len(r["actions"]) for r in entry["in_progress"]] == [4, 4, 4] and entry["steps"] == 12
    assert entry["in_progress"] == seen[-1]["in_progress"] and not entry["episodes"]
    monkeypatch.setattr(rollout, "run_episodes", real_run)
    resumed = rollout.evaluation_protocol(str(run_dir), num_envs=1, **kw)["settings"]["32x5"]
    assert resumed["returns"] == whole["returns"]
    assert counted[-1] == counted[0]  # every env step counted once
    assert not (run_dir / "eval.partial.json").exists()


def test_workers_play_the_episodes_of_one_process_and_go_on_from_its_partial(point_run, tmp_path, monkeypatch):
    """Stopped mid-episode in one process, three workers go on from its eval.partial.json (the episodes under way
    dealt out) and end with the uninterrupted returns, each env step counted once; stopped in the parent, two
    workers leave their last reports for one process to go on from."""
    from trajformer import rollout

    for name in ("whole", "stopped"):
        shutil.copytree(point_run, tmp_path / name)
    kw = dict(episodes=4, settings=("32x5",), progress=False)
    real_run, real_record, counted = rollout.run_episodes, rollout.episode_record, []
    monkeypatch.setattr(rollout, "episode_record", lambda results, steps, *a: counted.append(steps) or real_record(
        results, steps, *a))
    whole = rollout.evaluation_protocol(str(tmp_path / "whole"), num_envs=4, **kw)["settings"]["32x5"]
    run_dir = tmp_path / "stopped"
    _stop_after(monkeypatch, rollout, reports=3, every=0.0)  # a report after every step: stopped at step 3
    with pytest.raises(KeyboardInterrupt):
        rollout.evaluation_protocol(str(run_dir), num_envs=4, **kw)
    assert len(json.loads((run_dir / "eval.partial.json").read_text())["runs"][0]["in_progress"]) == 4
    monkeypatch.setattr(rollout, "run_episodes", real_run)
    resumed = rollout.evaluation_protocol(str(run_dir), workers=3, **kw)["settings"]["32x5"]
    assert resumed["returns"] == whole["returns"] and resumed["lengths"] == whole["lengths"]
    assert counted[-1] == counted[0] and not (run_dir / "eval.partial.json").exists()
    # Stopped in the parent (Ctrl-C, SIGTERM) at the workers' first report: the workers are stopped, the report
    # kept, and one process goes on from it to the same returns.
    shutil.rmtree(run_dir)
    shutil.copytree(point_run, run_dir)
    real_workers = rollout._evaluate_in_workers

    def stopped_at_first_report(*args, on_progress, **kwargs):
        def report(state):
            on_progress(state)
            raise KeyboardInterrupt
        return real_workers(*args, on_progress=report, **kwargs)

    monkeypatch.setattr(rollout, "_evaluate_in_workers", stopped_at_first_report)
    with pytest.raises(KeyboardInterrupt, match="the same command goes on"):
        rollout.evaluation_protocol(str(run_dir), workers=2, **kw)
    assert not multiprocessing.active_children()
    assert json.loads((run_dir / "eval.partial.json").read_text())["runs"][0]["episodes"]  # an episode had ended
    resumed = rollout.evaluation_protocol(str(run_dir), num_envs=4, **kw)["settings"]["32x5"]
    assert resumed["returns"] == whole["returns"]
    with pytest.raises(ValueError, match="--workers must be >= 1, got 0"):
        rollout.evaluation_protocol(str(run_dir), workers=0, **kw)


def test_workers_deal_again_when_one_runs_out(point_run, tmp_path, monkeypatch, capsys):
    """The odd episodes end at step 4, so the worker dealt them runs out while the other holds three: both save
    their episodes under way, the episodes left are dealt again by steps left, and the returns, lengths and env
    steps are one process's."""
    from trajformer import rollout

    for name in ("one", "workers"):
        shutil.copytree(point_run, tmp_path / name)
        meta = json.loads((tmp_path / name / "run.json").read_text())
        meta["env"]["kwargs"] = {"ends_early": [1, 3, 5, 7, 9]}
        (tmp_path / name / "run.json").write_text(json.dumps(meta))
    kw = dict(episodes=10, settings=("32x5",), progress=False, num_envs=2)
    real_record, counted = rollout.episode_record, []
    monkeypatch.setattr(rollout, "episode_record", lambda results, steps, *a: counted.append(steps) or real_record(
        results, steps, *a))
    one = rollout.evaluation_protocol(str(tmp_path / "one"), **kw)["settings"]["32x5"]
    assert one["lengths"] == [20, 4] * 5
    real_deal, deals = rollout._deal, []
    monkeypatch.setattr(rollout, "_deal", lambda *a: deals.append(real_deal(*a)) or deals[-1])
    monkeypatch.setattr(rollout, "REDEAL_SECONDS", 0.0)  # deal again however little is left
    dealt = rollout.evaluation_protocol(str(tmp_path / "workers"), workers=2, **kw)["settings"]["32x5"]
    assert "worker 1 is out of episodes while others hold two or more" in capsys.readouterr().out
    assert deals[0] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]] and len(deals) >= 2 and len(deals[1]) == 2
    again = deals[1][0] + deals[1][1]
    assert len(set(again)) == len(again) and set(again) <= {0, 2, 4, 6, 8}  # the episodes worker 0 had left
    assert dealt["returns"] == one["returns"] and dealt["lengths"] == one["lengths"]
    assert counted[-1] == counted[0] == 5 * 24


def test_killed_workers_eval_exits_130_and_leaves_no_semaphores(point_run, point_datasets, tmp_path):
    """`kill` of `trajformer eval --workers 2` mid-run: exit 130 with its one line, the state kept, and no "leaked
    semaphore objects" warning (each worker's tqdm made a multiprocessing lock that a stopped worker left behind)."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    script = "import sys, pointline; from trajformer.cli import main; main(sys.argv[1:])"
    tests_dir = os.path.dirname(__file__)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "eval", str(run), "--episodes", "40", "--settings", "32x5", "--workers", "2",
         "--num-envs", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": tests_dir, "OMP_NUM_THREADS": "1",
             "MINARI_DATASETS_PATH": str(point_datasets / "datasets")})
    deadline = time.time() + 120
    while not (run / "eval.partial.json").is_file():  # the workers' first episodes have ended
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; " in err, err
    assert "leaked" not in err and "Traceback" not in err, err
    kept = json.loads((run / "eval.partial.json").read_text())["runs"][0]
    assert kept["steps"] > 0 and kept["episodes"] and len(kept["episodes"]) < 40


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s child processes (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


def test_stopping_workers_save_the_episodes_under_way(point_run, point_datasets, tmp_path):
    """`kill` of the parent mid-episode (no episode ended, no minute passed, so no report yet): the workers are
    asked to stop, save their episodes after the env step under way, and the kept state holds both episodes that
    far (before, a stop kept only the last report: here none). SIGTERM to the whole process group (a time limit)
    does the same. `kill -9` of the parent: the workers exit."""
    import signal
    import subprocess
    import sys
    import time

    run, log = tmp_path / "run", tmp_path / "steps.log"
    shutil.copytree(point_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["env"]["kwargs"] = {"step_seconds": 0.1, "log": str(log)}
    (run / "run.json").write_text(json.dumps(meta))
    script = "import sys, pointline; from trajformer.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OMP_NUM_THREADS": "1",
           "MINARI_DATASETS_PATH": str(point_datasets / "datasets")}
    deadline = time.time() + 300

    def start(**kwargs) -> subprocess.Popen:
        log.unlink(missing_ok=True)
        return subprocess.Popen([sys.executable, "-c", script, "eval", str(run), "--episodes", "2", "--settings",
                                 "32x5", "--workers", "2", "--num-envs", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, **kwargs)

    def steps_reached(proc: subprocess.Popen, past: int) -> dict[int, int]:
        """Wait until both episodes have taken 2 env steps past `past` (replayed steps are logged too)."""
        while True:
            reached: dict[int, int] = {}
            for line in log.read_text().splitlines() if log.is_file() else []:
                seed, t = map(int, line.split())
                reached[seed] = t
            if len(reached) == 2 and min(reached.values()) >= past + 2:
                return reached
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1] if proc.poll() else ""
            time.sleep(0.02)

    def kept() -> dict:
        return json.loads((run / "eval.partial.json").read_text())["runs"][0]

    proc = start()
    reached = steps_reached(proc, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopping: each worker saves" in out and "interrupted; " in err, err
    first = kept()
    assert not first["episodes"] and sorted(r["episode"] for r in first["in_progress"]) == [0, 1]
    assert all(len(r["actions"]) >= reached[r["episode"]] for r in first["in_progress"])

    proc = start(start_new_session=True)  # SIGTERM to every process of the group: the workers save all the same
    reached = steps_reached(proc, max(len(r["actions"]) for r in first["in_progress"]))
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; " in err, err
    assert all(len(r["actions"]) >= reached[r["episode"]] for r in kept()["in_progress"])

    proc = start()  # killed outright (SIGKILL: no handler runs), the parent leaves its workers; they exit
    steps_reached(proc, max(len(r["actions"]) for r in kept()["in_progress"]))
    workers = _children(proc.pid)
    assert len(workers) >= 2  # the workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.communicate()
    while not all(_gone(pid) for pid in workers):
        assert time.time() < deadline, "the workers went on after their parent was killed"
        time.sleep(0.05)


def test_a_worker_killed_from_outside_is_one_line_and_the_same_command_goes_on(point_run, tmp_path, capsys):
    """A worker that dies without a report (the OOM killer): the evaluation stops with one line, exit 1, the other
    worker stopped and the reports so far kept; the same command then goes on (here without the kill)."""
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["env"]["kwargs"] = {"kills_at": 3}
    (run / "run.json").write_text(json.dumps(meta))
    argv = ["eval", str(run), "--episodes", "4", "--settings", "32x5", "--workers", "2", "--num-envs", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err and "Traceback" not in err, err
    assert "evaluation worker 1 died (exit code 9" in err and "the same command goes on" in err
    assert not multiprocessing.active_children()
    meta["env"]["kwargs"] = {}
    (run / "run.json").write_text(json.dumps(meta))
    cli.main(argv)
    assert len(json.loads((run / "eval.json").read_text())["settings"]["32x5"]["returns"]) == 4


def test_workers_start_ignoring_ctrl_c():
    """A terminal's Ctrl-C reaches the workers too: they ignore it from their first instruction (the parent stops
    them), so a Ctrl-C while they import prints no tracebacks of theirs; the parent's own handler is back after."""
    import signal

    from trajformer.rollout import _start_without_sigint

    before = signal.getsignal(signal.SIGINT)
    proc = multiprocessing.get_context("spawn").Process(target=signal.raise_signal, args=(signal.SIGINT,))
    _start_without_sigint([proc])
    proc.join(timeout=60)
    assert proc.exitcode == 0  # a KeyboardInterrupt would exit 1
    assert signal.getsignal(signal.SIGINT) is before


def test_deal_evens_the_steps_left():
    """Longest first to the least loaded worker: unstarted episodes go round-robin, episodes under way count the
    steps they have left."""
    from trajformer.rollout import _deal

    assert _deal([0, 1, 2, 3, 4], {}, 2, 1000, 4) == [[0, 2, 4], [1, 3]]
    assert _deal([2, 4, 6, 8], {2: 900}, 2, 1000, 4) == [[4, 8], [2, 6]]
    assert _deal([2, 4, 6, 8], {2: 900, 4: 900, 6: 900}, 2, 1000, 10) == [[8], [2, 4, 6]]
    # No more episodes under way to a worker than its share of the envs: they all start at once.
    assert _deal([2, 4, 6, 8], {2: 900, 4: 900, 6: 900}, 2, 1000, 4) == [[6, 8], [2, 4]]
    assert _deal([1, 2, 3, 4, 5], {e: 10 for e in range(1, 6)}, 2, 1000, 2) == [[1, 3, 5], [2, 4]]
    assert _deal([3, 5], {3: 10, 5: 10}, 4, 1000, 4) == [[3], [5]]
    assert _deal([0, 1, 2], {}, 2, None, 2) == [[0, 2], [1]]


def test_run_episodes_resumes_mid_plan_with_uneven_slots(point_run):
    """plan_freq 2, so a stop between a plan's two actions must keep the plan and its offset; two slots whose
    envs cut episodes at 5 and 9 steps, so the third episode starts in slot 0 while slot 1 runs on and the slots
    stop at different lengths: the resumed run gives the uninterrupted returns, each env step counted once."""
    from trajformer.planner import Planner
    from trajformer.rollout import run_episodes

    run = load_run(point_run)
    cfg = plan_config(run, ["plan.beam_width=4", "plan.horizon=2", "plan.plan_freq=2"])

    def envs() -> list[gym.Env]:
        return [gym.make(ENV_ID, max_episode_steps=limit) for limit in (5, 9)]

    whole, steps, _ = run_episodes(envs(), Planner.from_run(run, cfg, n_envs=2), 3, seed=5, progress=False)
    reports = []

    def stop(state: dict) -> None:
        reports.append(json.loads(json.dumps(state)))
        if len(reports) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_episodes(envs(), Planner.from_run(run, cfg, n_envs=2), 3, seed=5, progress=False, on_progress=stop,
                     progress_every=0.0)
    last = reports[-1]
    slots = last["in_progress"]
    assert [(r["episode"], len(r["actions"])) for r in slots] == [(2, 2), (1, 7)] and list(last["finished"]) == ["0"]
    assert [r["agent"]["offset"] for r in slots] == [2, 1]  # slot 1 stopped between a plan's two actions
    rest, more, _ = run_episodes(envs(), Planner.from_run(run, cfg, n_envs=2), 3, seed=5, progress=False,
                                 skip=frozenset({0}), resume=slots)
    assert {0: tuple(last["finished"]["0"]), **rest} == whole
    assert last["steps"] + more == steps


def test_a_stop_mid_search_keeps_every_whole_env_step(point_run):
    """Ctrl-C during a search (a KeyboardInterrupt inside act_batch; no episode ended, no report due for a
    minute): run_episodes reports the state after the last whole env step before it stops, and resuming from it
    gives the uninterrupted returns. Before, such a stop kept only the last report (here none)."""
    from trajformer.planner import Planner
    from trajformer.rollout import run_episodes

    run = load_run(point_run)
    cfg = plan_config(run, ["plan.beam_width=4", "plan.horizon=2"])

    def envs() -> list[gym.Env]:
        return [gym.make(ENV_ID) for _ in range(2)]

    whole, steps, _ = run_episodes(envs(), Planner.from_run(run, cfg, n_envs=2), 2, seed=3, progress=False)
    planner, calls = Planner.from_run(run, cfg, n_envs=2), []
    search = planner.act_batch

    def interrupted(slots: list[int], observations: np.ndarray) -> np.ndarray:
        calls.append(len(slots))
        if len(calls) == 8:
            raise KeyboardInterrupt
        return search(slots, observations)

    planner.act_batch = interrupted
    reports = []
    with pytest.raises(KeyboardInterrupt):
        run_episodes(envs(), planner, 2, seed=3, progress=False,
                     on_progress=lambda state: reports.append(json.loads(json.dumps(state))))
    assert len(reports) == 1 and reports[0]["steps"] == 14 and not reports[0]["finished"]
    assert [len(r["actions"]) for r in reports[0]["in_progress"]] == [7, 7]
    rest, more, _ = run_episodes(envs(), Planner.from_run(run, cfg, n_envs=2), 2, seed=3, progress=False,
                                 resume=reports[0]["in_progress"])
    assert rest == whole and reports[0]["steps"] + more == steps


def test_resume_refuses_a_replay_that_does_not_reach_the_recorded_state(point_run):
    """Replaying a saved episode's actions must land on its recorded observation bit for bit."""
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=3)
    action = env.action_space.sample().tolist()
    after, *_ = env.step(np.asarray(action))
    from trajformer.rollout import replay

    assert np.array_equal(replay(env, 3, [action], after.tolist()), after)
    with pytest.raises(ValueError, match="did not reach the recorded state"):
        replay(env, 3, [action], np.nextafter(after, np.inf).tolist())  # one ulp off: not the same state


def test_protocol_keeps_settings_evaluated_separately(point_run, tmp_path, monkeypatch):
    """`--settings 32x5` now and `--settings official` later, on as many episodes: eval.json holds both."""
    from trajformer import rollout

    monkeypatch.setattr(rollout, "official_plan", lambda env, data: {**rollout.OFFICIAL, "beam_width": 8,
                                                                     "horizon": 3})
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    cheap = rollout.evaluation_protocol(str(run), episodes=2, settings=("32x5",), progress=False)
    rollout.evaluation_protocol(str(run), episodes=2, settings=("official",), progress=False)
    record = json.loads((run / "eval.json").read_text())
    assert record["settings"]["32x5"] == cheap["settings"]["32x5"]
    assert record["settings"]["official"]["plan"]["beam_width"] == 8
    # Another episode count would replace both: refused before planning, unless asked for with --again.
    with pytest.raises(ValueError, match=r"holds 2-episode evaluations of these weights \(32x5, official\), which 3 "
                                         r"episodes would replace: evaluate 2 episodes, pass --again"):
        rollout.evaluation_protocol(str(run), episodes=3, settings=("official",), progress=False)
    assert json.loads((run / "eval.json").read_text()) == record
    rollout.evaluation_protocol(str(run), episodes=3, settings=("official",), progress=False, again=True)
    record = json.loads((run / "eval.json").read_text())
    assert record["episodes"] == 3 and set(record["settings"]) == {"official"}  # replaced, as asked


def test_a_finished_setting_is_kept_for_the_same_weights_and_planned_again_for_others(point_run, tmp_path,
                                                                                      monkeypatch, capsys):
    """`eval --bc` after an evaluation attaches the reference (the mean over BC's training seeds) without planning
    again; --again, another dtype or other weights in model.pt plan anew, and an entry of other weights leaves
    eval.json."""
    from trajformer import rollout

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    run, bc = tmp_path / "run", tmp_path / "bc"
    shutil.copytree(point_run, run)
    for seed in (0, 1):
        cli.main(["bc", str(point_run / "config.toml"), "--out", f"{bc}{seed}", "--steps", "50", "--episodes", "2",
                  "--hp", f"seed={seed}"])
    cfg = load_config(run / "config.toml")  # the run's own [plan] replans less often: the protocol fixes it
    cfg.plan.plan_freq, cfg.plan.k_obs = 2, 2
    (run / "config.toml").write_text(to_toml(cfg))
    first = rollout.evaluation_protocol(str(run), episodes=2, settings=("32x5",), progress=False)
    assert (first["settings"]["32x5"]["plan"]["plan_freq"], first["settings"]["32x5"]["plan"]["k_obs"]) == (1, 1)
    planned = []
    real = rollout._resumable_setting
    monkeypatch.setattr(rollout, "_resumable_setting", lambda *a, **k: planned.append(a[1].dtype) or real(*a, **k))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # one training seed twice: refused before anything runs
        cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5", "--bc", f"{bc}0", f"{bc}0"])
    assert "share a training seed" in capsys.readouterr().err
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5", "--bc", f"{bc}0", f"{bc}1"])
    assert planned == [] and "kept from" in capsys.readouterr().out
    record = json.loads((run / "eval.json").read_text())
    assert record["settings"]["32x5"]["score_reference"] == "dataset"
    # A row written before rows named their reference, scored by the env family alone: kept, and scored again.
    old = json.loads((run / "eval.json").read_text())
    del old["settings"]["32x5"]["score_reference"]
    old["settings"]["32x5"]["normalized_score"] = 999.0
    (run / "eval.json").write_text(json.dumps(old))
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5"])
    assert planned == [] and json.loads((run / "eval.json").read_text()) == record
    seeds = [json.loads((tmp_path / f"bc{s}" / "bc.json").read_text())["evaluation"]["mean_return"] for s in (0, 1)]
    assert record["settings"]["32x5"] == first["settings"]["32x5"] and seeds[0] != seeds[1]
    assert record["bc_mean_return"] == pytest.approx(np.mean(seeds))
    assert [(b["seed"], b["mean_return"]) for b in record["bc"]] == [(0, seeds[0]), (1, seeds[1])]
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5", "--again"])
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5", "--set", "plan.dtype=bfloat16"])
    cli.main(["eval", str(run), "--episodes", "2", "--settings", "32x5"])  # no dtype asked for: bf16's kept
    assert planned == ["float32", "bfloat16"]
    assert json.loads((run / "eval.json").read_text())["bc_mean_return"] == record["bc_mean_return"]
    state = torch.load(run / "model.pt", weights_only=True)
    state = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, run / "model.pt")
    rollout.evaluation_protocol(str(run), episodes=2, settings=("official",), progress=False)
    assert planned[-1] == "float32" and set(json.loads((run / "eval.json").read_text())["settings"]) == {"official"}


@pytest.mark.parametrize("other", ["dtype", "weights", "legacy"])
def test_a_setting_under_way_in_another_dtype_is_named_then_replaced(point_run, tmp_path, monkeypatch, capsys, other):
    """A float32 evaluation of a setting that eval.partial.json holds under way in bfloat16 (or with weights other
    than model.pt's, replaced between a stop and the rerun) says so, plans its own episodes from the start, and
    replaces that entry when it finishes. An entry written before entries named their weights (and before the
    setting held k_obs and plan_freq) is gone on from."""
    from trajformer import rollout
    from trajformer.run import model_sha256

    monkeypatch.setattr(rollout, "official_plan", lambda env, data: {**rollout.OFFICIAL, "beam_width": 4,
                                                                     "horizon": 2})
    run = tmp_path / "run"
    shutil.copytree(point_run, run)
    context = min(rollout.OFFICIAL["max_context_transitions"], load_run(run).config.data.sequence_length)
    setting = {**rollout.OFFICIAL, "beam_width": 4, "horizon": 2, "max_context_transitions": context}
    weights = model_sha256(load_run(run)) if other == "dtype" else "0" * 64
    entry = {"setting": setting, "dtype": "bfloat16" if other == "dtype" else "float32", "episodes_total": 2,
             "model_sha256": weights, "episodes": {"0": [1.0, 5]}, "steps": 5, "seconds": 1.0}
    if other == "legacy":
        del entry["model_sha256"]
        entry["setting"] = {k: v for k, v in setting.items() if k not in ("k_obs", "plan_freq")}
    (run / "eval.partial.json").write_text(json.dumps({"runs": [entry]}))
    out = rollout.evaluation_protocol(str(run), episodes=2, settings=("official",), progress=False)
    said = capsys.readouterr().out
    if other == "legacy":
        assert "1 entries written before entries named their weights are taken as model.pt's" in said
        assert "1 of 2 episodes kept" in said and out["settings"]["official"]["returns"][0] == 1.0
        assert not (run / "eval.partial.json").exists()
        return
    assert ("under way in bfloat16 (5 env steps): --set plan.dtype=bfloat16 resumes it" if other == "dtype" else
            "under way with other weights than model.pt's (5 env steps): this run starts over") in said
    assert len(out["settings"]["official"]["returns"]) == 2 and out["settings"]["official"]["returns"][0] != 1.0
    assert not (run / "eval.partial.json").exists()


@pytest.fixture(scope="module")
def iql_dir(point_run, tmp_path_factory):
    """`trajformer iql` trained once on the point-line data (evaluated over 12 episodes), for the tests below."""
    out = tmp_path_factory.mktemp("iql") / "iql"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
        cli.main(["iql", str(point_run / "config.toml"), "--out", str(out), "--steps", "2000", "--hp", "hidden=64",
                  "--hp", f"seed={TRAIN_SEED}", "--episodes", "12", "--num-envs", "6"])
    return out


def test_iql_runs_end_to_end_and_beats_random(iql_dir, tmp_path):
    """`trajformer iql` on the point-line data (half its actions head for the goal): the AWR policy beats
    random by far (measured: about -2, random -10, BC about -5)."""
    meta = json.loads((iql_dir / "iql.json").read_text())
    assert meta["config"]["hidden"] == 64 and meta["config"]["tau"] == 0.7
    assert meta["evaluation"]["mean_return"] > random_returns(12, 0).mean() + 4.0
    from trajformer.baselines.iql import load_iql

    out = tmp_path / "iql-old"
    shutil.copytree(iql_dir, out)
    del meta["policy"]  # a directory trained before the tanh-bounded mean: its weights would act differently
    (out / "iql.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained before IQL's policy mean was tanh-bounded"):
        load_iql(out)


def test_iql_policy_mean_stays_in_the_data_box_and_its_std_is_clipped():
    """The official IQL head: tanh-bounded mean (here mapped to the data's action box), log std in [-5, 2]."""
    from trajformer.baselines.iql import IQLAgent

    agent = IQLAgent(2, 2, 8)
    agent.fit_data(torch.zeros(4, 2), torch.tensor([[-0.4, 0.0], [0.4, 1.0], [0.0, 0.5], [0.1, 0.2]]), np.arange(2))
    with torch.no_grad():
        agent.pi[-1].bias.copy_(torch.tensor([1e3, -1e3]))  # a mean far outside the box before the tanh
        agent.log_std.fill_(-20.0)
    mean = agent.mean_action(torch.zeros(1, 2))[0]
    assert mean.tolist() == pytest.approx([0.4, 0.0])
    assert agent.std().tolist() == pytest.approx([math.exp(-5.0)] * 2)


def test_policy_normalisation_of_one_transition_is_finite():
    from trajformer.baselines.bc import BCPolicy

    policy = BCPolicy(3, 2, 8)
    policy.fit_data(torch.ones(1, 3), torch.zeros(1, 2), np.arange(3))  # a single training transition
    assert torch.isfinite(policy.obs_std).all() and torch.isfinite(policy.norm(torch.ones(1, 3))).all()


def test_expectile_loss_weights_the_upper_side():
    from trajformer.baselines.iql import expectile_loss

    diff = torch.tensor([2.0, -2.0])
    assert float(expectile_loss(diff[:1], 0.7)) == pytest.approx(0.7 * 4.0)
    assert float(expectile_loss(diff[1:], 0.7)) == pytest.approx(0.3 * 4.0)
    assert float(expectile_loss(diff, 0.5)) == pytest.approx(0.5 * 4.0)  # tau 1/2: half the squared error


def test_baseline_settings_errors_are_one_line(point_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["iql", str(point_run / "config.toml"), "--out", str(tmp_path / "x"), "--hp", "temperature=3"])
    err = capsys.readouterr().err.strip()
    assert "--hp 'temperature=3': use KEY=VALUE with KEY one of tau, beta" in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli.main(["iql", str(point_run / "config.toml"), "--out", str(tmp_path / "x"), "--hp", "hidden=1e3"])
    err = capsys.readouterr().err.strip()
    assert "--hp 'hidden=1e3': hidden takes an integer, e.g. --hp hidden=1" in err and "\n" not in err
    for method in ("bc", "iql"):  # refused before training, not after it
        with pytest.raises(SystemExit):
            cli.main([method, str(point_run / "config.toml"), "--out", str(tmp_path / method), "--episodes", "0"])
        assert "--episodes must be >= 1, got 0" in capsys.readouterr().err
        assert not (tmp_path / method).exists()


def test_planning_with_the_iql_critic_objective(point_run, iql_dir, tmp_path, monkeypatch, capsys):
    """TT with IQL's critic in place of its value token (`plan.objective=critic`) plans, and beats random."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_run.parent / "datasets"))
    out = tmp_path / "critic.json"
    cli.main(["plan", str(point_run), "--episodes", "6", "--num-envs", "6", "--set", "plan.objective=critic",
              "--set", f"plan.critic={iql_dir}", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["config"]["plan"]["objective"] == "critic"
    assert record["mean_return"] > random_returns(6, 0).mean() + 4.0
    with pytest.raises(SystemExit):
        cli.main(["plan", str(point_run), "--set", "plan.objective=critic"])
    assert "needs plan.critic" in capsys.readouterr().err


def test_a_recorded_render_mode_is_not_replayed():
    """Data recorded from a rendering env (its spec's kwargs hold render_mode) is evaluated in envs made without
    it: replaying "human" would open a window per env (and this env, which takes no render_mode, could not be
    made at all)."""
    from trajformer.rollout import evaluate_agent

    class Toward:
        def reset(self, env: int = 0, seed: int = 0) -> None: ...

        def act_batch(self, envs: list[int], observations: np.ndarray) -> np.ndarray:
            return np.sign(observations[:, 1:] - observations[:, :1])

        def observe_batch(self, envs: list[int], rewards: np.ndarray) -> None: ...

    spec = {"id": ENV_ID, "kwargs": {"render_mode": "human", "step_seconds": 0.0}, "max_episode_steps": 20}
    record = evaluate_agent(Toward(), spec, episodes=2, num_envs=2, progress=False)
    assert record["config"]["env_kwargs"] == {"step_seconds": 0.0}
    assert record["mean_return"] > float(np.mean(random_returns(20, 0)))
