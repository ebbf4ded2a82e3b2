"""`trajformer collect`: datasets written through Minari, exact episode boundaries, seeds, shipped actors, errors."""

import json
import shutil

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.storage import get_dataset_path

from trajformer.behavior import BEHAVIOR_DIR, evaluate_policy
from trajformer.cli import main
from trajformer.collect import PRESETS, collect, collect_preset
from trajformer.data import load_minari


@pytest.fixture(autouse=True)
def minari_tmp(tmp_path, monkeypatch):
    """Every test writes its datasets under a fresh MINARI_DATASETS_PATH, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


class Unbounded(gym.Env):
    """An env whose actions have no bounds (random actions cannot be drawn in it)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)


gym.register("trajformer-test/Unbounded-v0", entry_point=Unbounded, max_episode_steps=10)


def _arrays(dataset):
    return [(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations)
            for ep in dataset.iterate_episodes()]


def test_random_collection_round_trip():
    collect("Hopper-v5", "random", steps=300, dataset_id="test/hopper-random-v0", seed=3,
            max_episode_steps=20, num_envs=4)
    dataset = minari.load_dataset("test/hopper-random-v0")
    assert dataset.total_steps == 300
    lengths, ends = [], set()
    for ep in dataset.iterate_episodes():
        T = len(ep.actions)
        assert ep.observations.shape == (T + 1, 11) and ep.actions.shape == (T, 3) and ep.rewards.shape == (T,)
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
        assert ep.terminations[-1] or ep.truncations[-1]
        assert T <= 20 and (T < 20 or ep.truncations[-1])
        lengths.append(T)
        ends.add("terminated" if ep.terminations[-1] else "truncated")
    assert sum(lengths) == 300 and ends == {"terminated", "truncated"}
    meta = dataset.storage.metadata
    assert meta["behavior_policy"] == ["random"] and meta["seed"] == 3 and meta["env_kwargs"] == {}
    assert np.isfinite([meta["return_mean"], meta["return_std"], meta["ref_min_score"]]).all()
    assert json.loads(meta["env_spec"])["max_episode_steps"] == 20
    # The random reference score is the env's: another collection of it (size, seed) records the same one.
    collect("Hopper-v5", "random", steps=60, dataset_id="test/hopper-random-other-v0", seed=5, max_episode_steps=20,
            num_envs=2)
    assert minari.load_dataset("test/hopper-random-other-v0").storage.metadata["ref_min_score"] == meta["ref_min_score"]

    # The first episode of env 0 replays exactly from its reset seed: boundaries and data line up.
    env = gym.make("Hopper-v5", max_episode_steps=20)
    obs, _ = env.reset(seed=3)
    [first] = [ep for ep in dataset.iterate_episodes() if np.array_equal(ep.observations[0], obs)]
    for t, action in enumerate(first.actions):
        obs, reward, terminated, truncated, _ = env.step(action)
        np.testing.assert_array_equal(obs, first.observations[t + 1])
        assert (reward, terminated, truncated) == (first.rewards[t], first.terminations[t], first.truncations[t])


def test_same_seed_same_data():
    for name in ("a", "b"):
        collect("Hopper-v5", "hopper-sac-0025k", steps=200, dataset_id=f"test/{name}-v0", seed=7, num_envs=3)
    a, b = (_arrays(minari.load_dataset(f"test/{n}-v0")) for n in ("a", "b"))
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        for x, y in zip(ea, eb, strict=True):
            np.testing.assert_array_equal(x, y)


def test_actor_reproduces_card():
    card = json.loads((BEHAVIOR_DIR / "hopper-sac-0025k.json").read_text())
    returns = evaluate_policy("hopper-sac-0025k", episodes=card["eval_episodes"])
    assert evaluate_policy("hopper-sac-0025k", episodes=card["eval_episodes"]) == returns  # exact on one machine
    # The card's mean within two standard errors (5.7 here): rounding on another CPU moves MuJoCo's chaotic contacts
    # (an AVX512 Xeon moved the mean by 2.7e-6 relative; a fall time can move by more), while the other shipped
    # Hopper policies score 345-2005 and broken weights land further still.
    margin = 2.0 * card["eval_return_std"] / np.sqrt(card["eval_episodes"])
    assert abs(np.mean(returns) - card["eval_return_mean"]) < margin


def test_preset_small_and_cached():
    dataset = collect_preset("hopper-replay", steps=700)
    meta = dataset.storage.metadata
    assert meta["dataset_id"] == "trajformer/hopper-replay-v0" and dataset.total_steps == 700
    assert meta["behavior_policy"] == list(PRESETS["hopper-replay"].policies)
    assert collect_preset("hopper-replay", steps=700).total_steps == 700  # reused from the cache
    with pytest.raises(FileExistsError, match="--overwrite"):
        collect_preset("hopper-replay", steps=800)


def test_joins_of_another_env_or_a_part_twice_are_refused():
    """`A+B` joins datasets of one env, each part once: a repeated part (or one that already holds another, from
    minari.combine_datasets) would put copies of validation episodes in the training set."""
    from trajformer.config import DataConfig
    from trajformer.data import load_episodes

    collect("Hopper-v5", "random", steps=60, dataset_id="test/a-v0", seed=0, max_episode_steps=20)
    collect("Hopper-v5", "random", steps=60, dataset_id="test/b-v0", seed=1, max_episode_steps=30)
    collect("Walker2d-v5", "random", steps=60, dataset_id="test/w-v0", seed=0, max_episode_steps=20)
    minari.combine_datasets([minari.load_dataset("test/a-v0"), minari.load_dataset("test/b-v0")], "test/ab-v0")
    cfg = DataConfig()
    with pytest.raises(ValueError, match="names a dataset twice"):
        load_episodes("test/a-v0+test/a-v0", cfg)
    with pytest.raises(ValueError, match=r"'test/ab-v0' already holds test/a-v0"):
        load_episodes("test/a-v0+test/ab-v0", cfg)
    with pytest.raises(ValueError, match="'test/b-v0' was recorded in .*'max_episode_steps': 30"):
        load_episodes("test/a-v0+test/b-v0", cfg)  # another time limit: another env
    with pytest.raises(ValueError, match="'test/w-v0' was recorded in .*Walker2d-v5"):
        load_episodes("test/a-v0+test/w-v0", cfg)


def test_medium_expert_combines_two_datasets(capsys):
    dataset = collect_preset("halfcheetah-medium-expert", steps=160)
    meta = dataset.storage.metadata
    assert dataset.total_steps == 320 and meta["combined_datasets"] == [
        "trajformer/halfcheetah-medium-v0", "trajformer/halfcheetah-expert-v0"]
    assert meta["behavior_policy"] == ["halfcheetah-sac-0050k", "halfcheetah-sac-0250k"]
    assert "minari.combine_datasets" in meta["description"] and meta["ref_max_score"] == 12135.0
    capsys.readouterr()
    assert meta["return_mean_per_part"] == [None, None]  # 10 steps an env: no complete episode in either part
    main(["collect", "--preset", "halfcheetah-medium-expert", "--steps", "160"])  # cached: its summary line
    assert "320 steps, no complete episode in" in capsys.readouterr().out
    dataset.storage.update_metadata({"return_mean_per_part": [3550.7, None]})  # as 1M steps of each part give
    main(["collect", "--preset", "halfcheetah-medium-expert", "--steps", "160"])
    assert "return 3550.7 / - over the complete episodes of each part" in capsys.readouterr().out
    collect_preset("halfcheetah-expert", steps=100, overwrite=True)  # a part now made with other settings
    minari.delete_dataset("trajformer/halfcheetah-medium-expert-v0")
    with pytest.raises(FileExistsError, match=r"trajformer/halfcheetah-expert-v0 \(part of halfcheetah-medium-expert"):
        collect_preset("halfcheetah-medium-expert", steps=160)  # refused before collecting anything
    assert not get_dataset_path("trajformer/halfcheetah-medium-expert-v0").exists()
    again = collect_preset("halfcheetah-medium-expert", steps=160, overwrite=True)  # the stale part recollected
    assert again.total_steps == 320 and minari.load_dataset("trajformer/halfcheetah-expert-v0").total_steps == 160
    with pytest.raises(ValueError, match="--steps 0 / --num-envs 16: both must be positive"):
        collect_preset("hopper-replay", steps=0)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"env_id": "Hoppa-v5"}, ValueError, "unknown env id 'Hoppa-v5'"),
    ({"env_id": "CartPole-v1"}, ValueError, "Discrete action space"),
    ({"env_id": "Hopper-v5", "policy": "halfcheetah-sac-0050k"}, ValueError, "policy trained on this env"),
    ({"env_id": "Hopper-v5", "policy": "missing.pt"}, FileNotFoundError, "not found"),
    ({"env_id": "Hopper-v5", "dataset_id": "no-version"}, ValueError, "bad dataset id"),
    ({"env_id": "Hopper-v5", "env_kwargs": 5}, ValueError, "--env-kwargs 5 is not a JSON object"),
    ({"env_id": "trajformer-test/Unbounded-v0"}, ValueError, "has unbounded actions"),
    ({"env_id": "Hopper-v5", "env_kwargs": {"frame_skip": 0}}, ValueError,
     r"env kwargs \{\"frame_skip\": 0\} rejected by Hopper-v5 \(ZeroDivisionError.*fix --env-kwargs"),
    ({"env_id": "Hopper-v5", "action_noise": float("nan")}, ValueError, "--action-noise nan: pass a finite"),
    ({"env_id": "Hopper-v5", "seed": -1}, ValueError, "--seed -1: pass a seed >= 0"),
    ({"env_id": "Hopper-v5", "max_episode_steps": 0}, ValueError,
     "--max-episode-steps must be >= 1, got 0; or leave it out"),  # was blamed on --env-kwargs
])
def test_bad_input_fails_before_writing(kwargs, error, message):
    kwargs = {"dataset_id": "test/bad-v0", "steps": 50, **kwargs}
    with pytest.raises(error, match=message) as info:
        collect(**kwargs)
    assert "\n" not in str(info.value)
    assert not get_dataset_path(kwargs["dataset_id"]).exists()


def test_existing_dataset_refused_unless_overwrite():
    collect("Hopper-v5", steps=30, dataset_id="test/exists-v0")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        collect("Hopper-v5", steps=40, dataset_id="test/exists-v0")
    assert minari.load_dataset("test/exists-v0").total_steps == 30
    assert collect("Hopper-v5", steps=40, dataset_id="test/exists-v0", overwrite=True).total_steps == 40


def test_an_overwrite_that_fails_or_is_killed_keeps_the_old_dataset(monkeypatch, minari_tmp):
    """The old copy goes only once the new one is whole: Ctrl-C mid-write puts it back, and after a kill
    (new copy partial, old one aside) the next collect of the id puts it back before checking what exists."""
    collect("Hopper-v5", steps=30, dataset_id="test/old-v0")
    write = minari.create_dataset_from_buffers

    def write_then_interrupt(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        collect("Hopper-v5", steps=40, dataset_id="test/old-v0", overwrite=True)
    assert minari.load_dataset("test/old-v0").total_steps == 30
    assert sorted(p.name for p in (minari_tmp / "test").iterdir() if p.is_dir()) == ["old-v0"]

    path = get_dataset_path("test/old-v0")  # what a SIGKILL mid-write leaves
    path.rename(path.with_name(".old-v0.replaced"))
    (path / "data").mkdir(parents=True)
    with pytest.raises(ValueError, match="is being written by `trajformer collect`, or one was killed mid-write .*"
                                         "run that collect again"):
        load_minari("test/old-v0")  # train, predict: not the partial copy
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        collect("Hopper-v5", steps=40, dataset_id="test/old-v0")
    assert load_minari("test/old-v0").total_steps == 30
    assert sorted(p.name for p in (minari_tmp / "test").iterdir() if p.is_dir()) == ["old-v0"]

    # Killed while deleting the old copy after a whole write: the new one stays, the rest of the old one goes.
    monkeypatch.setattr(minari, "create_dataset_from_buffers", write)
    collect("Hopper-v5", steps=40, dataset_id="test/old-v0", overwrite=True)
    (path.with_name(".old-v0.deleting") / "data").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        collect("Hopper-v5", steps=50, dataset_id="test/old-v0")
    assert minari.load_dataset("test/old-v0").total_steps == 40
    assert sorted(p.name for p in (minari_tmp / "test").iterdir() if p.is_dir()) == ["old-v0"]

    # A new dataset's write killed outright (what it left may be partial): refused to readers; the next collect of
    # the id removes it first, then writes it whole.
    collect("Hopper-v5", steps=30, dataset_id="test/new-v0")
    new = get_dataset_path("test/new-v0")
    new.with_name(".new-v0.writing").touch()  # what a SIGKILL before the write ended leaves beside it
    with pytest.raises(ValueError, match="'test/new-v0' is being written by `trajformer collect`, or one was killed"):
        load_minari("test/new-v0")
    assert collect("Hopper-v5", steps=20, dataset_id="test/new-v0").total_steps == 20  # no --overwrite needed
    assert not new.with_name(".new-v0.writing").exists() and load_minari("test/new-v0").total_steps == 20


def test_a_dataset_being_written_is_refused_before_any_work(minari_tmp):
    """Another `trajformer collect` of the same id holds its lock: refused in one line, nothing touched (a put-back
    or an overwrite would delete what the other is writing); the presets hold theirs too."""
    from trajformer.files import file_lock

    collect("Hopper-v5", steps=30, dataset_id="test/busy-v0")
    with file_lock(minari_tmp / ".lock-test--busy-v0"):
        with pytest.raises(ValueError, match="being written by another trajformer collect .* wait for it"):
            collect("Hopper-v5", steps=40, dataset_id="test/busy-v0", overwrite=True)
    assert minari.load_dataset("test/busy-v0").total_steps == 30
    with file_lock(minari_tmp / ".lock-trajformer--halfcheetah-expert-v0"):
        with pytest.raises(ValueError, match="trajformer/halfcheetah-expert-v0 is being written"):
            collect_preset("halfcheetah-medium-expert", steps=32)
    assert not get_dataset_path("trajformer/halfcheetah-medium-v0").exists()


def test_every_episode_cut_has_no_mean_return(capsys):
    """16 envs x 2 steps of HalfCheetah (no terminations): no complete episode, so no mean return."""
    main(["collect", "HalfCheetah-v5", "--dataset-id", "test/cut-v0", "--steps", "32"])
    assert "32 steps, no complete episode in" in capsys.readouterr().out
    assert minari.load_dataset("test/cut-v0").storage.metadata["return_mean"] is None


def test_unknown_preset(minari_tmp):
    with pytest.raises(ValueError, match="unknown preset 'hopper-expert': choose one of hopper-medium"):
        collect_preset("hopper-expert")
    assert not get_dataset_path("trajformer/hopper-expert-v0").exists()


def test_cli_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "CartPole-v1", "--dataset-id", "test/cartpole-v0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("trajformer collect: error: CartPole-v1 has a Discrete action space")
    assert err.count("\n") == 1


def test_cli_argument_and_path_mistakes_are_one_line(capsys, tmp_path, monkeypatch):
    """--env-kwargs that is not a JSON object gets an example; `info` on a mistyped run path says it is no run
    directory (it got only the advice for a missing dataset)."""
    for text, says in (("{foo", "'{foo' is not JSON"), ("[1]", "--env-kwargs [1] is not a JSON object")):
        with pytest.raises(SystemExit) as exit_info:
            main(["collect", "Hopper-v5", "--dataset-id", "test/kwargs-v0", "--env-kwargs", text])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and says in err and "ctrl_cost_weight" in err, err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit):
        main(["info", "runs/typo"])
    err = capsys.readouterr().err
    assert err.startswith("trajformer info: error: runs/typo is not a run directory (no such directory) nor a "
                          "dataset") and err.count("\n") == 1, err
    (tmp_path / "test").mkdir()  # a folder named like the id's namespace (the checkout's trajformer/) changes nothing
    with pytest.raises(SystemExit):
        main(["info", "test/not-collected-v0"])
    assert capsys.readouterr().err.startswith("trajformer info: error: dataset 'test/not-collected-v0' is not in")


def test_cli_preset_refuses_other_settings(capsys):
    with pytest.raises(SystemExit):
        main(["collect", "--preset", "hopper-medium", "--policy", "random", "--deterministic"])
    assert "drop --policy, --deterministic" in capsys.readouterr().err
    assert not get_dataset_path("trajformer/hopper-medium-v0").exists()


def test_ctrl_c_while_writing_leaves_no_partial_dataset(monkeypatch, capsys):
    from minari.storage import get_dataset_path

    real = minari.create_dataset_from_buffers

    def write_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C after the files exist, before the metadata is complete

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "Hopper-v5", "--steps", "64", "--num-envs", "2", "--dataset-id", "test/interrupted-v0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and "Traceback" not in err
    assert err.strip() == "trajformer collect: interrupted", err  # a bare KeyboardInterrupt says so, not nothing
    assert not get_dataset_path("test/interrupted-v0").exists()


def test_damaged_records_and_policy_files_are_one_line_errors_naming_the_file(tmp_path, tiny_run):
    """A JSON record cut short or hand-edited (bc.json, iql.json, eval.partial.json, compare.json, a policy card),
    a truncated policy .pt and one that does not fit its card: each a one-line ValueError naming the file and a
    fix, as run directories already were (they raised bare JSONDecodeErrors or torch tracebacks)."""
    from trajformer.baselines.bc import load_bc
    from trajformer.baselines.iql import load_iql
    from trajformer.behavior import load_behavior_policy
    from trajformer.compare import compare
    from trajformer.config import Config
    from trajformer.rollout import _partial_runs, evaluation_protocol

    for name in ("bc", "iql", "eval-partial", "compare"):
        (tmp_path / name).mkdir()
    (tmp_path / "bc" / "bc.json").write_text('{"obs_dim": 11,')
    (tmp_path / "iql" / "iql.json").write_text("{'policy': 1}")
    (tmp_path / "eval-partial" / "eval.partial.json").write_text('{"runs": [')
    (tmp_path / "compare" / "compare.json").write_text("")
    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "run" / "eval.json").write_text('{"episodes": 2, "settings": {')
    cases = [(lambda: load_bc(tmp_path / "bc"), "bc.json", "train it again"),
             (lambda: load_iql(tmp_path / "iql"), "iql.json", "train it again"),
             (lambda: _partial_runs(tmp_path / "eval-partial"), "eval.partial.json", "delete it"),
             (lambda: compare(Config(), tmp_path / "compare", resume=True, progress=False), "compare.json",
              "new --out directory"),
             (lambda: evaluation_protocol(str(tmp_path / "run"), episodes=1, progress=False), "eval.json",
              "move it aside")]
    shipped = BEHAVIOR_DIR / "hopper-sac-0025k"
    for kind, pt, card in (("truncated", shipped.with_suffix(".pt").read_bytes()[:1000], None),
                           ("other-arch", shipped.with_suffix(".pt").read_bytes(), {"net_arch": [32, 32]}),
                           ("bad-card", shipped.with_suffix(".pt").read_bytes(), "{")):
        text = json.dumps({**json.loads(shipped.with_suffix(".json").read_text()), **card}) \
            if isinstance(card, dict) else card or shipped.with_suffix(".json").read_text()
        (tmp_path / f"{kind}.pt").write_bytes(pt)
        (tmp_path / f"{kind}.json").write_text(text)
        fix = {"truncated": "corrupt", "other-arch": "does not fit its card", "bad-card": "restore the .json card"}
        cases.append((lambda k=kind: load_behavior_policy(tmp_path / f"{k}.pt"), f"{kind}.", fix[kind]))
    for load, file, fix in cases:
        with pytest.raises(ValueError) as err:
            load()
        message = str(err.value)
        assert file in message and fix in message and "\n" not in message, message
