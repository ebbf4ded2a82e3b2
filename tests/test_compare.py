"""The model-based family and `trajformer compare`: the model env's penalties and termination, every method end to
end on the point-line task against a random policy, and bad input refused in one line before any training."""

from __future__ import annotations

import json
import shutil

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer
from pointline import DATASET_ID, TRAIN_SEED, random_returns

from trajformer import cli
from trajformer.baselines.model_env import (
    ModelEnv,
    elite_members,
    mopo_uncertainty,
    morel_disagreement,
    predict_all,
    termination_rule,
)
from trajformer.config import load_config
from trajformer.ensemble import load_ensemble
from trajformer.files import shipped

TINY_COMPARE = shipped("configs") / "compare-tiny.toml"
# compare-tiny on the point-line task, smaller still; MOReL's halt reward sized to its rewards (|r| <= 1.5 a step
# over 20 steps: -10 is an episode's worth, as -100 is about 30 Hopper steps' worth). 3000 SAC steps: at 1000 the
# MOReL policy (no real transitions, entropy weight still ~0.75) sat at random level for one goal on an AVX512 Xeon
# (-8.3 against random -9.5) and passed on an AVX2 EPYC; at 3000 it is -5.7 and -5.2 (model_based.seed 0 and 1).
FAST = ["--set", "train.max_steps=600", "--set", "model.n_embd=64", "--set", "data.sequence_length=4",
        "--set", "discretizer.n_bins=30", "--set", "plan.max_context_transitions=3", "--set", "train.num_threads=1",
        "--set", "model_based.steps=3000", "--set", "model_based.hidden=64",
        "--set", "model_based.morel_kappa=10", "--set", "model_based.rollout_every=200",
        "--set", "model_based.rollout_batch=500", "--set", "compare.iql_steps=1500", "--set", "compare.bc_steps=1500",
        "--set", "compare.episodes=12", "--set", "compare.num_envs=12", "--set", "ensemble.max_epochs=15",
        *[arg for key in ("train", "ensemble", "model_based") for arg in ("--set", f"{key}.seed={TRAIN_SEED}")]]


def hopper_states(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Observations from Hopper resets and random in-range actions."""
    env = gym.make("Hopper-v5")
    obs = np.stack([env.reset(seed=i)[0] for i in range(n)]).astype(np.float32)
    return obs, np.random.default_rng(0).uniform(-1, 1, (n, 3)).astype(np.float32)


def test_compare_tiny_runs_every_method_and_each_beats_random(point_datasets, tmp_path, monkeypatch, capsys):
    """configs/compare-tiny.toml on the point-line data: all seven methods train on one split, are evaluated on
    the same 12 seeded episodes, and each beats the random policy (about -10; the data's mean about -4)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    out = tmp_path / "cmp"
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), *FAST])
    result = json.loads((out / "compare.json").read_text())
    assert result["complete"] and list(result["methods"]) == ["tt", "bc", "iql", "mopo", "morel", "combo",
                                                              "tt-critic"]
    random_mean = random_returns(12, 0).mean()
    for name, row in result["methods"].items():
        assert len(row["returns"]) == 12 and row["stderr"] is not None and row["train_seconds"] > 0, name
        assert row["mean"] > random_mean + 2.0, (name, row["mean"], random_mean)
    assert result["methods"]["tt-critic"]["train_seconds"] > result["methods"]["tt"]["train_seconds"]  # + IQL
    for method in ("mopo", "morel", "combo"):  # one ensemble, shared
        meta = json.loads((out / method / f"{method}.json").read_text())
        assert meta["ensemble"]["path"] == str(out / "ensemble") and meta["termination_rule"].startswith("none")
    assert json.loads((out / "morel" / "morel.json").read_text())["morel_threshold"] > 0
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 8 and "| MOPO |" in table and (out / "compare.png").stat().st_size > 0
    assert "| COMBO |" in capsys.readouterr().out


def test_a_stopped_comparison_resumes_keeping_its_rows_and_trained_parts(point_datasets, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    out = tmp_path / "cmp"
    small = [*FAST, "--set", "model_based.steps=100", "--set", "compare.bc_steps=200", "--set", "compare.episodes=3"]
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc,mopo",
              *small])
    first = json.loads((out / "compare.json").read_text())
    ensemble_written = (out / "ensemble" / "model.pt").stat().st_mtime_ns
    with pytest.raises(SystemExit):  # not empty: refused without --resume
        cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), *small])
    assert "pass --resume" in capsys.readouterr().err
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc,mopo,morel",
              "--resume", *small])
    second = json.loads((out / "compare.json").read_text())
    assert second["complete"] and list(second["methods"]) == ["bc", "mopo", "morel"]
    assert second["methods"]["bc"] == first["methods"]["bc"] and second["methods"]["mopo"] == first["methods"]["mopo"]
    assert (out / "ensemble" / "model.pt").stat().st_mtime_ns == ensemble_written  # reused, not retrained
    assert second["methods"]["morel"]["train_seconds"] > second["seconds"]["ensemble"] > 0  # its share counted
    assert "kept from" in capsys.readouterr().out
    # Stopped after MOReL trained, before its row was written: MOReL is evaluated again, not retrained.
    stopped = {**second, "methods": {m: r for m, r in second["methods"].items() if m != "morel"}}
    (out / "compare.json").write_text(json.dumps(stopped))
    morel_written = (out / "morel" / "morel.pt").stat().st_mtime_ns
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc,mopo,morel",
              "--resume", *small])
    assert (out / "morel" / "morel.pt").stat().st_mtime_ns == morel_written
    resumed = json.loads((out / "compare.json").read_text())
    assert resumed["methods"]["morel"]["returns"] == second["methods"]["morel"]["returns"]
    assert "trained earlier into" in capsys.readouterr().out
    # The same, but trained under another model-env termination rule (older code): trained again.
    record = out / "morel" / "morel.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "termination_rule": "an older rule"}))
    (out / "compare.json").write_text(json.dumps(stopped))
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc,mopo,morel",
              "--resume", *small])
    assert (out / "morel" / "morel.pt").stat().st_mtime_ns != morel_written
    assert "trained earlier into" not in capsys.readouterr().out
    second = json.loads((out / "compare.json").read_text())
    # Kept rows of another protocol, budget, split or setting: refused (compare.json records the settings).
    for override, named in [("compare.max_steps=7", "compare.max_steps"), ("compare.bc_steps=300", "compare.bc_steps"),
                            (f"train.seed={TRAIN_SEED + 1}", "train.seed"),
                            ("data.validation_fraction=0.5", "data.validation_fraction"),
                            ("model_based.mopo_lambda=2", "model_based.mopo_lambda")]:
        with pytest.raises(SystemExit):
            cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc",
                      "--resume", *small, "--set", override])
        err = capsys.readouterr().err.strip()
        assert f"was compared with other settings ({named})" in err and "\n" not in err, err
    from trajformer.baselines.iql import IQLConfig, train_iql
    from trajformer.config import load_config

    cfg = load_config(TINY_COMPARE, [f'data.dataset="{DATASET_ID}"'])
    train_iql(cfg, out / "iql", IQLConfig(steps=50, hidden=32), progress=False)  # a kept IQL of another budget
    with pytest.raises(SystemExit):  # refused before BC or anything else trains, not when its row comes
        cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods",
                  "bc,mopo,morel,iql", "--resume", *small])
    err = capsys.readouterr().err.strip()
    assert "iql was trained for 50 steps with seed 0, not compare.iql_steps=1500" in err and "\n" not in err
    shutil.rmtree(out / "iql")  # the same budget and seed, another network: refused too
    train_iql(cfg, out / "iql", IQLConfig(steps=1500, seed=TRAIN_SEED, hidden=32), progress=False)
    with pytest.raises(SystemExit):
        cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods",
                  "bc,iql", "--resume", *small])
    assert "holds an IQL trained with other settings (hidden)" in capsys.readouterr().err
    shutil.rmtree(out / "iql")
    record = out / "ensemble" / "ensemble.json"  # a kept ensemble of other [ensemble] settings: refused
    original = record.read_text()
    record.write_text(original.replace('"max_epochs": 15', '"max_epochs": 14'))
    with pytest.raises(SystemExit):
        cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods",
                  "bc,mopo,morel,combo", "--resume", *small])
    assert "holds an ensemble trained with other settings (ensemble.max_epochs)" in capsys.readouterr().err
    moved = json.loads(original)  # the same settings, another split recorded (one episode moved): refused too
    moved["split"]["train_episodes"].append(moved["split"]["validation_episodes"].pop())
    record.write_text(json.dumps(moved))
    with pytest.raises(SystemExit):
        cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods",
                  "bc,mopo", "--resume", *small])
    assert "other settings (the split (data.split_seed, data.validation_fraction))" in capsys.readouterr().err
    record.write_text(original)
    assert json.loads((out / "compare.json").read_text()) == second
    # Other thread counts are the same setting; methods left out keep their rows.
    cli.main(["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--methods", "bc",
              "--resume", *small, "--set", "plan.num_threads=1"])
    assert json.loads((out / "compare.json").read_text())["methods"] == second["methods"]


def test_model_based_command_trains_its_own_ensemble_and_evaluates(point_datasets, tmp_path, monkeypatch, capsys):
    """`trajformer combo CONFIG` without --ensemble trains one into OUT/ensemble, then SAC, then the protocol."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    out = tmp_path / "combo"
    cli.main(["combo", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(out), "--episodes", "3",
              "--num-envs", "3", "--set", "model_based.steps=60", "--set", "model_based.hidden=32",
              "--set", "model_based.rollout_batch=100", "--set", "ensemble.max_epochs=2"])
    meta = json.loads((out / "combo.json").read_text())
    assert (out / "ensemble" / "ensemble.json").is_file() and meta["ensemble"]["path"] == str(out / "ensemble")
    assert meta["config"]["combo_beta"] == 5.0 and meta["training"]["regulariser"] != 0.0
    assert len(meta["evaluation"]["returns"]) == 3
    assert "termination in the model: none" in capsys.readouterr().out
    assert (out / "combo.metrics.jsonl").is_file() and not (out / "metrics.jsonl").exists()  # --out may hold a run's
    common = ["--dataset", DATASET_ID, "--episodes", "3", "--num-envs", "3", "--set", "model_based.steps=60"]
    other = tmp_path / "other-data-ensemble"  # the same dims, another dataset's ensemble
    shutil.copytree(out / "ensemble", other)
    record = json.loads((other / "ensemble.json").read_text())
    (other / "ensemble.json").write_text(json.dumps({**record, "dataset_id": "other/data-v0"}))
    for args, message in [(["--ensemble", str(other), "--out", str(tmp_path / "m")], "was trained on 250 episodes "
                            "of other/data-v0, not on these 250"),
                          (["--out", str(out), "--set", "ensemble.max_epochs=3"],
                           "holds an ensemble trained with other settings (ensemble.max_epochs)")]:
        with pytest.raises(SystemExit):
            cli.main(["mopo", str(TINY_COMPARE), *common, *args])
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_mopo_penalty_grows_outside_the_data(ensemble_dir):
    """The ensemble-std u(s, a) at actions far outside the data's [-1, 1] exceeds u at the data's kind of actions;
    the paper's max_std is the largest member's std norm (on this small ensemble it does not grow away from the
    data: its learned variances shrink there, which is why the option exists); the model env's reward is
    r - lambda * u."""
    ens = load_ensemble(ensemble_dir)
    obs, act = hopper_states()
    inside = mopo_uncertainty(*predict_all(ens, obs, act), "ensemble_std")
    outside = mopo_uncertainty(*predict_all(ens, obs, 4.0 * np.sign(act)), "ensemble_std")
    assert float(outside.mean()) > 1.5 * float(inside.mean())
    assert float((outside > inside).float().mean()) > 0.9
    mean, std = predict_all(ens, obs, act)
    by_hand = np.max([[np.linalg.norm(std[e, i]) for i in range(len(obs))] for e in range(len(std))], axis=0)
    np.testing.assert_allclose(mopo_uncertainty(mean, std, "max_std"), by_hand, rtol=1e-5)
    for kind in ("max_std", "ensemble_std"):
        env = ModelEnv(ens, obs, -np.ones(3), np.ones(3), num_envs=64, horizon=3, elites=2, penalty="mopo",
                       mopo_lambda=2.5, mopo_uncertainty=kind, seed=0)
        env.reset(seed=0)
        _, reward, *_, info = env.step(act)
        np.testing.assert_allclose(reward, info["raw_reward"] - 2.5 * info["uncertainty"], rtol=1e-5)
    assert len(elite_members(ens, 2)) == 2


def test_morel_halts_exactly_where_disagreement_exceeds_its_threshold(ensemble_dir):
    ens = load_ensemble(ensemble_dir)
    obs, act = hopper_states()
    d = morel_disagreement(predict_all(ens, obs, act)[0], ens.model.obs_dim).numpy()
    threshold = float(np.median(d))
    env = ModelEnv(ens, obs, -np.ones(3), np.ones(3), num_envs=64, horizon=10, penalty="morel",
                   morel_threshold=threshold, morel_kappa=50.0, seed=0)
    env.reset(seed=0)
    env.obs[:] = obs  # step from known states
    _, reward, terminated, truncated, info = env.step(act)
    np.testing.assert_allclose(info["disagreement"], d, rtol=1e-5)
    halted = d > threshold
    assert 0 < halted.sum() < 64
    np.testing.assert_array_equal(info["halted"], halted)
    assert np.all(terminated[halted]) and np.all(reward[halted] == -50.0) and not truncated.any()
    assert np.all(reward[~halted] != -50.0)


def test_model_env_terminates_by_the_hopper_healthy_rule_and_truncates_at_its_horizon(ensemble_dir):
    ens = load_ensemble(ensemble_dir)
    rule, text = termination_rule({"id": "Hopper-v5", "kwargs": {}}, np.arange(11), 11)
    assert "z in (0.7, inf)" in text and "angle in (-0.2, 0.2)" in text
    obs, act = hopper_states(4)
    fallen = obs.copy()
    fallen[1, 0], fallen[2, 1], fallen[3, 5] = 0.5, 0.5, 150.0  # too low, tilted, a state entry out of range
    np.testing.assert_array_equal(rule(fallen), [False, True, True, True])
    assert termination_rule({"id": "HalfCheetah-v5"}, np.arange(17), 17)[0] is None
    assert termination_rule({"id": "Hopper-v5", "kwargs": {"terminate_when_unhealthy": False}},
                            np.arange(11), 11)[0] is None
    env = ModelEnv(ens, obs, -np.ones(3), np.ones(3), num_envs=4, horizon=2, seed=0)  # no rule: only truncation
    env.reset(seed=0)
    assert not any(env.step(act)[3])
    nxt, _, terminated, truncated, info = env.step(act)
    assert truncated.all() and not terminated.any() and info["_final_obs"].all()
    assert np.isin(nxt, obs).all(axis=1).all()  # restarted from dataset states in the same step


@pytest.mark.parametrize("env_id, z_range", [("Ant-v5", (0.0, 1.3)), ("Humanoid-v5", (0.5, 2.5))])
def test_ant_and_humanoid_termination_rules_agree_with_the_env(env_id, z_range):
    """Each rule on observations of states with random heights (and kept dims only) says what the env's own
    is_healthy says; Ant's bounds are closed, Humanoid's open; data without z gets no rule."""
    env = gym.make(env_id)
    u = env.unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    lo, hi = u._healthy_z_range
    heights = np.concatenate([rng.uniform(*z_range, 200), [lo, hi]])  # the bounds themselves too
    obs, healthy = [], []
    for z in heights:
        qpos = u.init_qpos + rng.normal(0, 0.1, u.model.nq)
        qpos[2] = z
        u.set_state(qpos, u.init_qvel + rng.normal(0, 0.1, u.model.nv))
        obs.append(u._get_obs())
        healthy.append(u.is_healthy)
    env.close()
    obs, healthy = np.array(obs), np.array(healthy)
    assert 0 < healthy.sum() < len(healthy)
    for keep in (np.arange(27), np.array([5, 3, 0, 20, 1])):  # configs/ant-medium's dims; z kept third
        rule, text = termination_rule({"id": env_id, "kwargs": {}}, keep, obs.shape[1])
        np.testing.assert_array_equal(rule(obs[:, keep]), ~healthy)
    if env_id == "Ant-v5":  # and a non-finite prediction ends the rollout
        bad = obs[healthy][:1, keep].copy()
        bad[0, 1] = np.nan
        assert rule(bad).tolist() == [True] and rule(obs[healthy][:1, keep]).tolist() == [False]
    assert ("[0.2, 1.0]" in text) if env_id == "Ant-v5" else ("(1.0, 2.0)" in text)
    assert termination_rule({"id": env_id, "kwargs": {}}, np.arange(1, 27), obs.shape[1])[0] is None


def discrete_dataset(root) -> str:
    env = gym.make("CartPole-v1")
    buffers = []
    for e in range(3):
        obs, _ = env.reset(seed=e)
        observations, actions = [obs], []
        for t in range(10):
            a = t % 2  # pushing left and right in turn keeps the pole up for the 10 steps (no step after an end)
            obs, *_ = env.step(a)
            observations.append(obs)
            actions.append(a)
        buffers.append(EpisodeBuffer(observations=np.array(observations), actions=np.array(actions),
                                     rewards=np.ones(10), terminations=np.zeros(10, bool),
                                     truncations=np.arange(10) == 9))
    minari.create_dataset_from_buffers("test/cartpole-v0", buffers, env=env, eval_env=env.spec, algorithm_name="random",
                                       author="tests", author_email="none", code_permalink="tests",
                                       description="discrete actions")
    return "test/cartpole-v0"


def tt_run_of_another_split(path, split_seed: int | None = None) -> str:
    """A point-line TT run directory (random weights, saved through run.py) of another train.seed than the config's,
    and so of another split unless `split_seed` names the config's."""
    from trajformer.config import Config
    from trajformer.data import load_episodes, split_record
    from trajformer.discretizer import Discretizer
    from trajformer.model import GPT, GPTConfig
    from trajformer.run import save_run

    cfg = Config()
    cfg.data.dataset, cfg.train.seed, cfg.data.split_seed = DATASET_ID, TRAIN_SEED + 1, split_seed
    disc = Discretizer.fit(np.random.default_rng(0).normal(size=(100, 5)), 8)
    gpt = GPTConfig(obs_dim=2, act_dim=1, n_bins=8, block_size=9, n_layer=1, n_head=1, n_embd=8)
    episodes = len(load_episodes(DATASET_ID, cfg.data).episodes)
    meta = {"dataset_id": DATASET_ID, "env": {"id": "trajformer-test/PointLine-v0"}, "obs_indices": [0, 1],
            "raw_obs_dim": 2, "split": split_record(episodes, cfg.data.validation_fraction, cfg.split_seed)}
    return str(save_run(path, cfg, GPT(gpt), disc, meta))


@pytest.mark.parametrize("case", ["other-dims", "discrete", "negative-lambda", "unknown-method", "no-length",
                                  "no-validation", "tt-run-split", "tt-run-carry"])
def test_bad_compare_input_is_refused_in_one_line_before_training(case, point_datasets, ensemble_dir, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    args = ["compare", str(TINY_COMPARE), "--dataset", DATASET_ID, "--out", str(tmp_path / "cmp")]
    expected = {
        "other-dims": (["--set", f"model_based.ensemble={ensemble_dir}"], "train the ensemble on this dataset"),
        "discrete": ([], "Box action"),
        "negative-lambda": (["--set", "model_based.mopo_lambda=-1"], "model_based.mopo_lambda must be >= 0"),
        "unknown-method": (["--methods", "tt,dreamer"], "unknown method 'dreamer'"),
        "no-length": (["--methods", "bc,tt", "--set", "train.max_steps=0", "--set", "train.max_windows=0",
                       "--set", "train.epochs=0"], "training length is not set"),
        "no-validation": (["--methods", "bc,mopo", "--set", "data.validation_fraction=0"],
                          "the ensemble needs validation episodes"),
        "tt-run-split": (["--methods", "bc,tt", "--set", f"compare.tt_run=\"{tmp_path / 'tt'}\"",
                          "--set", f"train.seed={TRAIN_SEED}"],
                         "was trained with other data.split_seed (or train.seed) than this config's"),
        "tt-run-carry": (["--methods", "bc,tt", "--set", f"compare.tt_run=\"{tmp_path / 'tt'}\"",
                          "--set", "plan.carry_context=true"], "is an absolute one: set plan.carry_context=false"),
    }[case]
    if case in ("tt-run-split", "tt-run-carry"):
        tt_run_of_another_split(tmp_path / "tt")
    if case == "discrete":
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
        args[3] = discrete_dataset(tmp_path)
        capsys.readouterr()  # gymnasium's warnings while the dataset was built are not the CLI's output
    with pytest.raises(SystemExit):
        cli.main([*args, *expected[0]])
    err = capsys.readouterr().err.strip()
    assert expected[1] in err and "\n" not in err, err
    assert not (tmp_path / "cmp").exists()  # refused before anything was trained or written


def test_a_tt_run_of_another_train_seed_on_the_config_split_is_reused(point_datasets, tmp_path, monkeypatch):
    """A seed sweep of TT on one split (data.split_seed fixed, train.seed varied) passes compare's split check."""
    import trajformer.compare as compare_module

    class Checked(Exception):
        pass

    def checks_passed(data):
        raise Checked

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    monkeypatch.setattr(compare_module, "return_stats", checks_passed)  # the first call after the input checks
    tt_run_of_another_split(tmp_path / "tt", split_seed=TRAIN_SEED)
    for split_seed, accepted in ((None, True), (TRAIN_SEED + 1, False)):
        cfg = load_config(TINY_COMPARE, ["compare.methods=[\"tt\"]", f"compare.tt_run=\"{tmp_path / 'tt'}\"",
                                         f"train.seed={TRAIN_SEED}", f"data.split_seed={split_seed}"])
        assert cfg.split_seed == (TRAIN_SEED if split_seed is None else split_seed)
        if accepted:
            with pytest.raises(Checked):
                compare_module.compare(cfg, tmp_path / "cmp", dataset_id=DATASET_ID, progress=False)
        else:
            with pytest.raises(ValueError, match=r"other data.split_seed \(or train.seed\) than this config's"):
                compare_module.compare(cfg, tmp_path / "cmp", dataset_id=DATASET_ID, progress=False)
    record = tmp_path / "tt" / "run.json"  # the same settings, but another split recorded (another data copy)
    meta = json.loads(record.read_text())
    meta["split"]["train_episodes"].append(meta["split"]["validation_episodes"].pop())
    record.write_text(json.dumps(meta))
    cfg = load_config(TINY_COMPARE, ["compare.methods=[\"tt\"]", f"compare.tt_run=\"{tmp_path / 'tt'}\"",
                                     f"train.seed={TRAIN_SEED}"])
    with pytest.raises(ValueError, match=r"was trained on another episode split \(seed \d+, .*\) than this data's"):
        compare_module.compare(cfg, tmp_path / "cmp", dataset_id=DATASET_ID, progress=False)


@pytest.mark.parametrize("method", ["ensemble", "bc", "iql", "mopo"])
def test_seeded_baseline_training_is_reproducible(method, point_datasets, tmp_path, monkeypatch):
    """Same seed, same data: the same ensemble, BC policy, IQL agent and MOPO policy (on one ensemble), bit for bit,
    on CPU (compare --resume and predict reuse them)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(point_datasets / "datasets"))
    from trajformer.baselines.bc import BCConfig, train_bc
    from trajformer.baselines.iql import IQLConfig, train_iql
    from trajformer.baselines.model_based import train_model_based
    from trajformer.config import load_config
    from trajformer.ensemble import train_ensemble

    cfg = load_config(TINY_COMPARE, [f'data.dataset="{DATASET_ID}"', "model_based.steps=60", "model_based.hidden=32",
                                     "model_based.rollout_every=30", "model_based.rollout_batch=50",
                                     "ensemble.max_epochs=2", "ensemble.hidden=32"])
    ens = train_ensemble(cfg, tmp_path / "ens", progress=False) if method == "mopo" else None
    train, weights_file = {
        "ensemble": (lambda out: train_ensemble(cfg, out, progress=False), "model.pt"),
        "bc": (lambda out: train_bc(cfg, out, BCConfig(steps=50, hidden=32), progress=False), "bc.pt"),
        "iql": (lambda out: train_iql(cfg, out, IQLConfig(steps=50, hidden=32), progress=False), "iql.pt"),
        "mopo": (lambda out: train_model_based("mopo", cfg, out, ens, progress=False), "mopo.pt"),
    }[method]
    weights = []
    for name in ("a", "b"):
        train(tmp_path / name)
        weights.append(torch.load(tmp_path / name / weights_file, weights_only=True))
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_combo_regulariser_closed_form_and_its_push():
    """With critics constant at c and fixed policy draws, each critic's term is
    logsumexp(n x [c + dA log 2] (uniform actions, density 2^-dA), [c - log pi(a_j)]) - c: checks the importance
    weights' signs. One gradient step on it lowers Q at uniform actions of model states below Q at the data."""
    from trajformer.baselines.model_based import combo_regulariser
    from trajformer.baselines.policy import Batch
    from trajformer.baselines.sac import SACAgent

    torch.manual_seed(0)
    dS, dA, n, c = 2, 2, 4, 0.7
    agent = SACAgent(dS, dA, hidden=16)
    agent.act_low.fill_(-1.0)
    agent.act_high.fill_(1.0)
    agent.obs_std.fill_(1.0)
    with torch.no_grad():
        for q in (agent.q1, agent.q2):
            q[-1].weight.zero_()
            q[-1].bias.fill_(c)
    model_obs = torch.randn(3, dS)
    logp = torch.linspace(-2.0, 1.0, 3 * n)
    agent.sample = lambda s: (torch.zeros(len(s), dA), logp[: len(s)])
    real = Batch(torch.randn(5, dS), torch.zeros(5, dA), torch.zeros(5), torch.zeros(5, dS), torch.zeros(5))
    term = combo_regulariser(model_obs, real, beta=2.0, n_actions=n)
    per_state = torch.cat([torch.full((3, n), c + dA * np.log(2.0)), (c - logp).view(3, n)], dim=1)
    expected = 2.0 * 2 * (torch.logsumexp(per_state, dim=1).mean() - c)
    assert term(agent).item() == pytest.approx(expected.item(), rel=1e-5)

    real = Batch(model_obs.repeat(2, 1), torch.full((6, dA), 0.5), torch.zeros(6), torch.zeros(6, dS), torch.zeros(6))
    term = combo_regulariser(model_obs, real, beta=1.0, n_actions=n)
    optimizer = torch.optim.SGD([*agent.q1.parameters(), *agent.q2.parameters()], lr=0.05)
    optimizer.zero_grad()
    term(agent).backward()
    optimizer.step()
    with torch.no_grad():
        uniform = agent.q(model_obs.repeat_interleave(64, 0), torch.rand(3 * 64, dA) * 2 - 1)[0].mean()
        data = agent.q(real.obs, agent.unscale(real.act))[0].mean()
    assert data > uniform


def test_sac_finds_a_state_dependent_bandit_optimum_and_bootstraps_through_time():
    """SAC on one-step episodes (done = 1) with reward -(a - s/2)^2 from uniform actions: the policy's mean action
    goes to s/2 in every state. On a two-step chain (reward 0, then s whatever the action, then the end) the
    critic backs the second step's value up through the discount: Q of the first step rises with s at slope
    gamma, the second's at slope 1."""
    from trajformer.baselines.policy import Batch
    from trajformer.baselines.sac import SAC, SACAgent

    torch.manual_seed(TRAIN_SEED)
    agent = SACAgent(1, 1, hidden=64)
    obs = torch.rand(4096, 1) * 2 - 1
    agent.fit_data(obs, torch.tensor([[-1.0], [1.0]]), np.array([0]))
    sac = SAC(agent, learning_rate=3e-3)
    grid = torch.linspace(-0.9, 0.9, 7).view(-1, 1)
    for _ in range(1500):
        s, a = torch.rand(256, 1) * 2 - 1, torch.rand(256, 1) * 2 - 1
        sac.update(Batch(s, a, -((a - s / 2) ** 2)[:, 0], s, torch.ones(256)))
    with torch.no_grad():
        assert (agent.mean_action(agent.norm(grid)) - grid / 2).abs().max() < 0.1
        # Q of the best action above Q of the worst end, in every state.
        best, worst = agent.q(grid, grid / 2)[0], agent.q(grid, -torch.sign(grid + 1e-3))[0]
    assert (best > worst + 0.2).all()

    agent = SACAgent(2, 1, hidden=64)  # observation (s, step of the chain)
    agent.fit_data(torch.cat([obs, torch.rand(4096, 1).round()], 1), torch.tensor([[-1.0], [1.0]]), np.array([0, 1]))
    sac = SAC(agent, learning_rate=3e-3, discount=0.9)
    for _ in range(1500):
        s, a, second = torch.rand(256, 1) * 2 - 1, torch.rand(256, 1) * 2 - 1, torch.rand(256) < 0.5
        now = torch.cat([s, second[:, None].float()], 1)
        sac.update(Batch(now, a, torch.where(second, s[:, 0], 0.0), torch.cat([s, torch.ones(256, 1)], 1),
                         second.float()))
    with torch.no_grad():
        for step, slope in ((0.0, 0.9), (1.0, 1.0)):
            q = agent.q(torch.cat([grid, torch.full_like(grid, step)], 1), torch.zeros_like(grid))[0]
            fit = np.polyfit(grid[:, 0].numpy(), q.numpy(), 1)[0]
            assert fit == pytest.approx(slope, abs=0.1), step


def test_compare_settings_name_a_window_models_carried_context():
    """A comparison's settings name the TT rows' carried context (a window model's default), so --resume refuses to
    mix them with rows planned from fresh contexts; fresh ones stay none, as comparisons before the option wrote."""
    from types import SimpleNamespace

    from trajformer.compare import _differences, _settings
    from trajformer.config import Config

    data = SimpleNamespace(sha256="digest")
    absolute, window, fresh = Config(), Config(), Config()
    window.model.attention = fresh.model.attention = "window"
    fresh.plan.carry_context = False
    assert _settings(absolute, data, None)["plan"]["carry_context"] is None
    assert _settings(fresh, data, None)["plan"]["carry_context"] is None
    assert _settings(window, data, None)["plan"]["carry_context"] is True
    assert _differences(_settings(fresh, data, None), _settings(window, data, None)) == ["plan.carry_context"]


def test_baselines_refuse_an_unwritable_out_before_training(tmp_path):
    """bc, iql, mopo/morel/combo and train-ensemble check --out before loading data or training (they used to fail
    on writing their files after the whole training): the dataset here does not exist, so reaching it would say so."""
    from trajformer.baselines.bc import train_bc
    from trajformer.baselines.iql import train_iql
    from trajformer.baselines.model_based import train_model_based
    from trajformer.config import Config
    from trajformer.ensemble import train_ensemble

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = Config()
    cfg.data.dataset = "test/does-not-exist-v0"
    for train_it in (lambda out: train_bc(cfg, out, progress=False), lambda out: train_iql(cfg, out, progress=False),
                     lambda out: train_model_based("mopo", cfg, out, tmp_path / "no-ensemble", progress=False),
                     lambda out: train_ensemble(cfg, out, progress=False)):
        with pytest.raises(ValueError, match=r"cannot write into .*a-file is not a directory\); pass --out DIR"):
            train_it(blocker / "out")


def test_a_comparisons_damaged_iql_record_names_the_comparisons_fix(hopper_dataset, tmp_path):
    """--resume over a comparison whose kept iql.json is damaged: delete it (compare trains it again with its own
    steps and seed), not `trajformer iql`, whose defaults compare would then refuse."""
    from trajformer.compare import compare
    from trajformer.config import Config

    (tmp_path / "cmp" / "iql").mkdir(parents=True)
    (tmp_path / "cmp" / "iql" / "iql.json").write_text('{"config": ')
    cfg = Config()
    cfg.data.dataset, cfg.compare.methods = hopper_dataset, ["iql"]
    with pytest.raises(ValueError, match=r"cmp/iql/iql.json is not valid JSON \(.*\); delete .*cmp/iql to train it "
                                         r"again$"):
        compare(cfg, tmp_path / "cmp", resume=True, progress=False)
