"""Training end to end: it learns, resumes bit-identically, runs data-parallel, and refuses bad input."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from trajformer import train as train_module
from trajformer.cli import main as cli_main
from trajformer.config import load_config, to_toml
from trajformer.info import describe
from trajformer.metrics import score_reference
from trajformer.model import GPT, token_losses
from trajformer.run import load_run, read_metrics
from trajformer.tokens import loss_weights
from trajformer.train import prepare, train

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml")


def test_validation_loss_beats_per_dimension_marginal_entropy(tiny_run):
    """A model that learned nothing cannot do better than each dimension's marginal distribution."""
    run = load_run(tiny_run)
    prep = prepare(run.config, discretizer=run.discretizer)
    n_classes = run.model.config.n_bins + 1
    slots = prep.train_windows.target_slot
    # Marginal per target dimension, fit on the training windows (add-one smoothing).
    counts = torch.ones(run.model.config.transition_dim, n_classes)
    _, y, mask = prep.train_windows.batch(torch.arange(len(prep.train_windows)))
    counts.index_put_((slots.expand_as(y)[mask > 0], y[mask > 0]), torch.ones(int(mask.sum())), accumulate=True)
    log_marginal = (counts / counts.sum(1, keepdim=True)).log()
    x, y, mask = prep.val_windows.batch(torch.arange(len(prep.val_windows)))
    marginal_ce = -(log_marginal[slots.expand_as(y), y] * mask).sum() / mask.sum()
    with torch.no_grad():
        model_ce = (token_losses(run.model(x), y) * mask).sum() / mask.sum()
    print(f"validation CE: model {model_ce:.3f} nats vs marginal {marginal_ce:.3f}")
    assert model_ce < marginal_ce - 0.3


def test_run_directory_is_self_contained_and_pickle_free(tiny_run):
    files = {p.name for p in Path(tiny_run).iterdir()}
    assert {"config.toml", "run.json", "discretizer.npz", "model.pt", "last.pt", "checkpoint.pt",
            "metrics.jsonl", "loss.png"} <= files
    meta = json.loads((tiny_run / "run.json").read_text())
    assert meta["env"]["id"] == "Hopper-v5" and meta["obs_dim"] == 11 and meta["act_dim"] == 3
    assert len(meta["provenance"]["dataset_sha256"]) == 64
    assert set(meta["split"]["train_episodes"]).isdisjoint(meta["split"]["validation_episodes"])
    state = torch.load(tiny_run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    rows = read_metrics(tiny_run / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    assert {"val_obs", "val_action", "val_reward", "val_value"} <= set(val[-1])
    assert {"train_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    text = describe(str(tiny_run))
    assert "transition_dim 16" in text and "best val loss" in text


def test_info_on_a_directory_that_is_not_a_run_names_the_run(tiny_run, tmp_path):
    """`trajformer info runs/quickstart` (the run is in run/): the run it may mean, not a dataset lookup."""
    shutil.copytree(tiny_run, tmp_path / "quick" / "run")
    with pytest.raises(FileNotFoundError, match=r"is not a run directory \(no run.json\); did you mean .*quick/run\?"):
        describe(str(tmp_path / "quick"))
    with pytest.raises(ValueError, match="--config and --set apply to datasets"):
        describe(str(tmp_path / "quick" / "run"), None, ["discretizer.n_bins=20"])


def test_a_file_is_on_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """atomic_write syncs the new file's bytes before the rename and the directory after it: a power loss then
    leaves the old file or the new one (renamed but unsynced, a file can come back empty after a crash)."""
    from trajformer import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    files.save_text(tmp_path / "a.txt", "new")
    (kind, synced), replaced, (last, directory) = events
    assert kind == "fsync" and Path(synced).name.startswith(".a.txt.") and Path(synced).parent == tmp_path
    assert replaced == ("replace", str(tmp_path / "a.txt"))
    assert (last, directory) == ("fsync", str(tmp_path)) and (tmp_path / "a.txt").read_text() == "new"


def test_a_first_stop_request_asks_and_a_second_stops_at_once():
    """Training and evaluation stop on stop_requests: the first Ctrl-C or SIGTERM only sets the event (the loop
    finishes its step and saves), a second raises; an ignored SIGINT stays ignored, and the handlers come back."""
    from trajformer.stopping import stop_requests

    before = signal.getsignal(signal.SIGTERM)
    with stop_requests() as asked:
        signal.raise_signal(signal.SIGTERM)
        assert asked.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_requests() as asked:
            signal.raise_signal(signal.SIGINT)
            assert not asked.is_set()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_resume_after_interrupt_mid_epoch_is_bit_identical(tiny_config, hopper_dataset, tmp_path, monkeypatch):
    cfg = lambda: tiny_config(hopper_dataset, "train.max_steps=24", "train.checkpoint_every=100",  # noqa: E731
                              "train.eval_every=10", "model.dropout=0.1")
    full = train(cfg(), tmp_path / "full", progress=False)

    original = train_module.batch_indices

    def interrupt_at_step_7(step, *args):
        if step == 7:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of an epoch
        return original(step, *args)

    monkeypatch.setattr(train_module, "batch_indices", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_module, "batch_indices", original)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 8
    train(cfg(), tmp_path / "resumed", resume=True, progress=False)

    for name in ("last.pt", "model.pt"):
        a = torch.load(full / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [row["step"] for row in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == sorted(steps)
    # run.json's compute names each session's start; resuming the finished run leaves the record as it was.
    compute = json.loads((tmp_path / "resumed" / "run.json").read_text())["compute"]
    assert [s["from_step"] for s in compute["sessions"]] == [0, 8]
    train(cfg(), tmp_path / "resumed", resume=True, progress=False)
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["compute"] == compute


def test_resumed_compute_keeps_the_threads_of_each_session():
    """A run trained on 1 thread, then 2, then 1 from an earlier checkpoint says so (a record made before sessions
    were kept counts as one session from step 0)."""
    new = lambda step, threads: {"device": "cpu", "dtype": "bfloat16", "threads": threads, "total_steps": 100,  # noqa: E731
                                 "sessions": [{"from_step": step, "device": "cpu", "dtype": "bfloat16",
                                               "threads": threads}]}
    legacy = {k: v for k, v in new(0, 1).items() if k != "sessions"}
    two = train_module._resumed_compute(legacy, new(40, 2), 40)
    assert [(s["from_step"], s["threads"]) for s in two["sessions"]] == [(0, 1), (40, 2)] and two["threads"] == 2
    again = train_module._resumed_compute(two, new(30, 1), 30)  # resumed from a checkpoint before step 40
    assert [(s["from_step"], s["threads"]) for s in again["sessions"]] == [(0, 1), (30, 1)]
    assert train_module._resumed_compute(two, new(100, 1), 100) == two  # finished: nothing trained


def test_data_parallel_two_processes_match_single_process(tiny_config, hopper_dataset, tmp_path):
    overrides = ["train.max_steps=6", "model.dropout=0.0", "train.eval_every=100", "train.batch_size=32",
                 "train.dtype=float32"]  # bf16 rounding differs between one batch and two half batches
    single = train(tiny_config(hopper_dataset, *overrides), tmp_path / "single", progress=False)
    config = tmp_path / "tiny.toml"


    config.write_text(to_toml(tiny_config(hopper_dataset, *overrides)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "trajformer", "train", str(config), "--out", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(single / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---- bad input: one-line error naming the problem and the fix, before anything is written ----


def _make(dataset_id, buffers, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, algorithm_name="test", **kwargs)


def _buffer(obs_dim=3, steps=4, nan=False, obs=None, actions=None):
    o = np.zeros((steps + 1, obs_dim), np.float32) if obs is None else obs
    if nan:
        o[2, 1] = np.nan
    a = np.zeros((steps, 1), np.float32) if actions is None else actions
    term = np.zeros(steps, bool)
    term[-1] = True
    return EpisodeBuffer(id=0, observations=o, actions=a, rewards=np.ones(steps), terminations=term,
                         truncations=np.zeros(steps, bool))


def _fails_before_writing(args, out, message, capsys):
    """The CLI exits 2 with one line matching `message`, and `out` was never created."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def _one_line_error(args: list[str], pattern: str, capsys) -> str:
    """The CLI stops with one line on stderr matching `pattern`; returns it."""
    with pytest.raises(SystemExit):
        cli_main(args)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    return err


BOX3, BOX1 = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (1,))


@pytest.fixture(scope="module")
def bad_datasets():
    _make("bad/nan-v0", [_buffer(nan=True)], observation_space=BOX3, action_space=BOX1)
    _make("bad/empty-v0", [], observation_space=BOX3, action_space=BOX1)
    dict_obs = {"a": np.zeros((5, 2), np.float32)}
    _make("bad/dict-v0", [_buffer(obs=dict_obs)],
          observation_space=gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,))}), action_space=BOX1)
    _make("bad/discrete-v0", [_buffer(actions=np.zeros(4, np.int64))], observation_space=BOX3,
          action_space=gym.spaces.Discrete(2))


@pytest.mark.parametrize("dataset_id, overrides, message", [
    ("bad/nan-v0", [], r"has NaN or inf in its observations; remove or repair"),
    ("bad/empty-v0", [], r"has no episodes; collect data"),
    ("bad/dict-v0", [], r"Dict.* observation space; trajformer needs a flat Box"),
    ("bad/discrete-v0", [], r"Discrete.* action space; trajformer needs a flat Box"),
    ("test/hopper-random-v0", ["data.obs_dims=[0, 11]"], r"indices \[11\] out of range for 11-dim"),
    ("nowhere/missing-v0", [], r"'nowhere/missing-v0' is not in MINARI_DATASETS_PATH .*trajformer collect"),
])
def test_bad_dataset_fails_before_writing(bad_datasets, hopper_dataset, tmp_path, capsys, dataset_id, overrides,
                                          message):
    out = tmp_path / "run"
    args = ["train", QUICKSTART, "--dataset", dataset_id, "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    _fails_before_writing(args, out, message, capsys)


@pytest.mark.parametrize("override, message", [
    ("train.max_stpes=5", r"unknown key 'max_stpes' in \[train\]; valid keys: .*max_steps"),
    ("trian.max_steps=5", r"unknown config section \[trian\]; valid sections"),
    ("train.max_steps=fast", r"train.max_steps must be an integer, got 'fast'; write a TOML integer, e.g. 64"),
    ("train.learning_rate=.001", r"must be a number, got '.001'; write a TOML number, e.g. 0.001 or 1e-3 \(a digit"),
    ("compare.methods=tt,bc", r"compare.methods must be a list, got 'tt,bc'; write e.g. methods = \[\"a\", \"b\"\]"),
    ("discretizer.kind=log", r"discretizer.kind = 'log' is not valid; choose one of quantile, uniform"),
    ("train.log_every=0", r"train.log_every must be >= 1"),
    ("train.max_steps=0", r"training length is not set; set train.max_windows"),
    ("train.eval_windows=0", r"train.eval_windows must be >= 1"),
    ("train.grad_clip=0", r"train.grad_clip must be > 0"),
    ("train.final_lr_fraction=2", r"train.final_lr_fraction must be in \[0, 1\]"),
    ("train.device=\"gpu\"", r"train.device = 'gpu' is not valid; use \"cpu\" or \"cuda\""),
    ("train.device=\"cuda:x\"", r"train.device = 'cuda:x' is not valid"),
    ("model.n_head=0", r"model.n_layer and model.n_head must be >= 1"),
    ("model.action_weight=-5", r"model.action_weight, reward_weight and value_weight must be >= 0"),
    ("train.weight_decay=-1", r"train.weight_decay must be >= 0"),
    ("train.num_threads=-3", r"train.num_threads must be >= 0"),
    ("plan.penalty_lambda=-2", r"plan.penalty_lambda must be >= 0"),
    ("ensemble.weight_decay=-1", r"ensemble.weight_decay >= 0"),
    ("train.seed=-1", r"train.seed must be >= 0, got -1"),
    ("data.split_seed=-2", r"data.split_seed must be >= 0 \(or none: train.seed\), got -2"),
    (("model.attention=\"window\"", "model.n_embd=12"),  # heads of 3 channels: rotary turns channel pairs
     r"model.attention = \"window\" needs an even head size n_embd / n_head .*change model.n_embd or model.n_head"),
])
def test_config_errors_name_the_key(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli_main(["train", QUICKSTART, "--out", str(out),
                  *(arg for o in ((override,) if isinstance(override, str) else override) for arg in ("--set", o))])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`trajformer info RUN | head -1`: the closed pipe stops the command without an error line."""
    proc = subprocess.Popen([sys.executable, "-m", "trajformer", "info", "hopper-medium"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # before the command writes: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and err == "", err


def test_config_files_that_are_not_toml_configs_are_one_line(tmp_path, capsys):
    """A directory, a binary file and a scalar where a section belongs (with --set) name the file and the fix."""
    (tmp_path / "weights.toml").write_bytes(b"\x80\x02binary")
    (tmp_path / "scalar.toml").write_text("data = 1\n")
    for path, overrides, pattern in [(tmp_path, [], r"is a directory; pass a TOML file"),
                                     (tmp_path / "weights.toml", [], r"weights.toml is not valid TOML .*decode"),
                                     (tmp_path / "scalar.toml", ["--set", "data.dataset=x/y-v0"],
                                      r"\[data\] must be a table of keys, not 1")]:
        _one_line_error(["train", str(path), "--out", str(tmp_path / "run"), *overrides], pattern, capsys)
    assert not (tmp_path / "run").exists()


def test_resume_errors(hopper_dataset, tiny_run, tmp_path, capsys, monkeypatch):
    def fails(args: list[str], pattern: str) -> None:
        _one_line_error(args, pattern, capsys)

    base = ["train", str(tiny_run / "config.toml")]
    fails(base + ["--out", str(tmp_path / "none"), "--resume"], r"has no checkpoint.pt; train without --resume")
    assert not (tmp_path / "none").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("run.json", "config.toml"):
        (corrupt / name).write_bytes((tiny_run / name).read_bytes())
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in corrupt.iterdir())  # and the lock every training takes: .train.lock
    # Refused before the data loads: the checkpoint is read first.
    monkeypatch.setattr(train_module, "prepare", lambda *a, **k: pytest.fail("the data loaded before the checkpoint"))
    fails(base + ["--out", str(corrupt), "--resume"],
          r"--resume: checkpoint .*checkpoint.pt is corrupt .*; restore it from a backup, or fine-tune from the run's "
          r"model.pt with `--set train.init_from=.*corrupt --out NEW_DIR`")
    assert sorted(p.name for p in corrupt.iterdir() if p.name != ".train.lock") == before
    finished = tmp_path / "finished"  # weights without a checkpoint (a shipped or copied model): fine-tune from them
    shutil.copytree(tiny_run, finished)
    (finished / "checkpoint.pt").unlink()
    for resume in ([], ["--resume"]):
        fails(base + ["--out", str(finished), *resume],
              r"finished holds finished weights but no checkpoint.pt to resume .*`--set train.init_from=.*finished "
              r"--out NEW_DIR`")
    monkeypatch.undo()
    ensemble = tmp_path / "ensemble"  # weights of another kind of directory
    ensemble.mkdir()
    (ensemble / "model.pt").write_bytes((tiny_run / "model.pt").read_bytes())
    fails(base + ["--out", str(ensemble)], r"ensemble holds weights but no run.json: not a run directory; choose")
    own = tmp_path / "own"  # a copy: a refusal that regressed would rewrite the session's shared run
    shutil.copytree(tiny_run, own)
    fails(base + ["--out", str(own), "--resume", "--set", "data.obs_dims=\"0:5\""],
          r"would change the run \(data.obs_dims \[\] -> '0:5'\); resume with the run's own config")
    fails(base + ["--out", str(own)], r"already holds a run; pass --resume")
    recollected = tmp_path / "recollected"  # the dataset id now holds other data than the run was trained on
    shutil.copytree(tiny_run, recollected)
    meta = json.loads((recollected / "run.json").read_text())
    meta["provenance"]["dataset_sha256"] = "0" * 64
    (recollected / "run.json").write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in recollected.iterdir() if p.is_file()}
    fails(base + ["--out", str(recollected), "--resume"],
          r"trained on other data than test/hopper-random-v0 holds now .*recollect it as it was, or use a new --out")
    assert {p.name: p.read_bytes() for p in recollected.iterdir() if p.is_file()} == before


def test_plus_joins_datasets_like_medium_expert(tiny_config, hopper_dataset):
    from trajformer.collect import collect
    from trajformer.data import load_episodes

    other = "test/hopper-random-other-v0"  # the same env and time limit, other seeds
    collect("Hopper-v5", "random", steps=300, dataset_id=other, seed=1, max_episode_steps=50, num_envs=4,
            overwrite=True)
    cfg = tiny_config(hopper_dataset).data
    one, second = load_episodes(hopper_dataset, cfg), load_episodes(other, cfg)
    two = load_episodes(f"{hopper_dataset}+{other}", cfg)
    assert len(two.episodes) == len(one.episodes) + len(second.episodes) and two.sha256 not in (one.sha256,
                                                                                               second.sha256)
    assert np.array_equal(two.episodes[len(one.episodes)].obs, second.episodes[0].obs)


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one collides when two test runs share a machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = load_config(QUICKSTART, ["train.learning_rate=0.001", "train.final_lr_fraction=0.1"])
    total, warmup = 100, 10
    rates = [train_module.learning_rate(step, cfg, total, warmup) for step in range(total + 5)]
    assert rates[0] == pytest.approx(0.001 / warmup) and rates[warmup - 1] == pytest.approx(0.001)
    assert rates[warmup] == pytest.approx(0.001) and rates[total] == pytest.approx(0.0001) == rates[-1]
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1 :], strict=False))  # never rises after warmup
    assert rates[(warmup + total) // 2] == pytest.approx(0.00055)  # cosine: halfway between lr and its floor


def test_batches_cover_each_epoch_once_and_follow_the_seed():
    n, batch, per_epoch = 103, 10, 10  # 3 windows left out of each epoch (drop last)
    epoch = [train_module.batch_indices(step, 7, n, batch, per_epoch) for step in range(per_epoch)]
    ids = torch.cat(epoch)
    assert len(ids) == batch * per_epoch and len(set(ids.tolist())) == len(ids) and int(ids.max()) < n
    next_epoch = torch.cat([train_module.batch_indices(step, 7, n, batch, per_epoch) for step in range(10, 20)])
    assert not torch.equal(ids, next_epoch)
    assert torch.equal(train_module.batch_indices(3, 7, n, batch, per_epoch), epoch[3])  # the same seed, the same batch
    assert not torch.equal(train_module.batch_indices(3, 8, n, batch, per_epoch), epoch[3])


def test_missing_remote_dataset_fails_fast_without_network(monkeypatch):
    """With HF_HUB_OFFLINE unset, a dataset that is neither local nor reachable fails in seconds: one probe of the
    hub with a short timeout, no download attempt."""
    from trajformer.data import load_minari

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []

    def no_network(address, timeout=None, *args, **kwargs):
        probes.append(timeout)
        raise OSError("no route to host")

    monkeypatch.setattr("trajformer.data.socket.create_connection", no_network)  # offline, on any machine
    monkeypatch.setattr("minari.load_dataset", lambda *a, **k: pytest.fail("tried to load or download"))
    with pytest.raises(FileNotFoundError, match=r"mujoco/hopper/medium-v0.*MINARI_DATASETS_PATH.*trajformer collect"):
        load_minari("mujoco/hopper/medium-v0")
    assert len(probes) == 1 and probes[0] is not None and probes[0] <= 1.5
    monkeypatch.setattr("trajformer.data._hub_reachable", lambda *a: True)  # online, but without the hub client
    monkeypatch.setattr("trajformer.data._hub_client_installed", lambda: False)
    with pytest.raises(FileNotFoundError, match=r"pip install 'trajformer\[hf\]'"):
        load_minari("mujoco/hopper/medium-v0")
    # Online with the client, our own ids are still never asked of the hub: they are made by `trajformer collect`.
    monkeypatch.setattr("trajformer.data._hub_client_installed", lambda: True)
    with pytest.raises(FileNotFoundError, match=r"trajformer/hopper-medium-v0.*trajformer collect --preset"):
        load_minari("trajformer/hopper-medium-v0")
    # HF_HUB_OFFLINE=false is online, as huggingface_hub reads it: the hub is probed.
    import trajformer.data

    monkeypatch.undo()  # the real _hub_reachable; the socket patched again below
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")
    monkeypatch.setattr("trajformer.data.socket.create_connection", no_network)
    assert not trajformer.data._hub_reachable() and len(probes) == 2
    # The probe goes where the download would: a mirror (HF_ENDPOINT), MINARI_REMOTE's or the id's own remote,
    # or the proxy in between (an offline verdict from probing huggingface.co directly would be wrong there).
    for var in ("HF_ENDPOINT", "MINARI_REMOTE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    address = trajformer.data._hub_address
    assert address() == ("huggingface.co", 443) and address("gcp://bucket/x-v0") == ("storage.googleapis.com", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443")
    assert address("mujoco/hopper/medium-v0") == ("hf-mirror.example", 8443)
    monkeypatch.setenv("MINARI_REMOTE", "gcp://minari-datasets")
    assert address("mujoco/hopper/medium-v0") == ("storage.googleapis.com", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert address("mujoco/hopper/medium-v0") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "storage.googleapis.com")
    assert address("mujoco/hopper/medium-v0") == ("storage.googleapis.com", 443)


def test_a_remote_path_loads_where_minari_keeps_its_download(hopper_dataset, monkeypatch):
    """hf://REPO/ns/name-v0 downloads into ns/name-v0 (Minari's layout): it is loaded from there, and once there
    it is not downloaded again."""
    from trajformer.data import load_minari

    remote = f"hf://farama-minari/{hopper_dataset}"
    fetched = []
    monkeypatch.setattr("minari.storage.hosting.download_dataset", lambda id_, *a, **k: fetched.append(id_))
    assert load_minari(remote).total_steps == 3000 and fetched == []  # already here under its plain id
    monkeypatch.setattr("trajformer.data.is_local_dataset", lambda dataset_id: bool(fetched))
    monkeypatch.setattr("trajformer.data._hub_reachable", lambda *a: True)
    monkeypatch.setattr("trajformer.data._hub_client_installed", lambda: True)
    assert load_minari(remote).total_steps == 3000 and fetched == [remote]  # not here: downloaded, then loaded
    from trajformer.data import load_episodes

    with pytest.raises(ValueError, match="names a dataset twice"):  # the remote path and its local id: one dataset
        load_episodes(f"{remote}+{hopper_dataset}", load_config(QUICKSTART).data)


def test_bfloat16_training_and_dataset_info(tiny_config, hopper_dataset, tmp_path):
    common = ["train.max_steps=3", "train.log_every=1"]
    runs = {dtype: train(tiny_config(hopper_dataset, *common, f"train.dtype=\"{dtype}\""), tmp_path / dtype,
                         progress=False) for dtype in ("bfloat16", "float32")}
    bf16, fp32 = (torch.load(runs[d] / "last.pt", weights_only=True) for d in ("bfloat16", "float32"))
    torch.manual_seed(0)  # the seed train() starts from: the initial weights
    init = GPT(load_run(runs["float32"]).model.config).state_dict()
    assert all(torch.isfinite(v).all() for v in bf16.values())
    moved = [k for k in bf16 if not torch.equal(bf16[k], init[k])]
    assert len(moved) > len(bf16) // 2  # bf16 training updates the weights
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)  # ... and computes in bf16, not silently in float32
    first = [read_metrics(runs[d] / "metrics.jsonl")[0]["train_loss"] for d in ("bfloat16", "float32")]
    assert first[0] == pytest.approx(first[1], rel=0.02)  # the same step, rounded differently
    text = describe(hopper_dataset, None, ["discretizer.n_bins=20"])
    assert "transition_dim 16" in text and "3000 steps" in text
    assert len([line for line in text.splitlines() if "obs[" in line or "act[" in line]) == 14
    # One reference for scores: the one `trajformer plan` normalises with. This data's episodes end at 50 steps,
    # so neither D4RL's 1000-step returns nor an expert return of its own apply; Hopper's defaults take D4RL's.
    assert score_reference("Hopper-v5", {}, {}, 50) == (None, None)
    assert "no reference returns: scores are not normalised" in text
    from types import SimpleNamespace

    from trajformer.info import _reference_line

    (low, high), label = score_reference("Hopper-v5", {}, {}, 1000)
    default = SimpleNamespace(env_spec={"id": "Hopper-v5", "kwargs": {}, "max_episode_steps": 1000},
                              ref_min_score=None, ref_max_score=None)
    assert _reference_line(default) == f"normalised scores use random {low:.2f} / expert {high:.2f} ({label})"


# ---- interrupts and resuming as a user meets them ----


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_ctrl_c_exits_130_with_one_line_and_the_printed_command_resumes_bit_identically(
        tiny_config, hopper_dataset, tmp_path, stop):
    """Ctrl-C, or `kill` (SIGTERM) of a job started with `&` from a script (its SIGINT ignored by the shell):
    one line, exit 130, a checkpoint, and the printed command resumes bit-identically."""
    overrides = ["train.max_steps=60", "train.checkpoint_every=1000", "train.eval_every=20"]
    full = train(tiny_config(hopper_dataset, *overrides), tmp_path / "full", progress=False)
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_config(hopper_dataset, *overrides)))
    out, go = tmp_path / "run", tmp_path / "go"
    held = textwrap.dedent("""
        import os, sys, time
        import trajformer.train as t
        from trajformer.cli import main
        go, batch_indices = sys.argv.pop(1), t.batch_indices
        def held(step, *rest):  # from step 10 on (its loss is logged), wait for the test's signal
            while step >= 10 and not os.path.exists(go):
                time.sleep(0.01)
            return batch_indices(step, *rest)
        t.batch_indices = held
        main(sys.argv[1:])
    """)
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == "kill" else None
    proc = subprocess.Popen([sys.executable, "-c", held, str(go), "train", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not read_metrics(out / "metrics.jsonl"):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    # the child waits at step 10 until `go` exists, whatever the machine's load
    proc.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
    go.touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "checkpoint written" in lines[0]
    command = lines[0].split("resume with: ", 1)[1]
    assert command == f"trajformer train --resume --out {out}"
    cli_main(shlex.split(command)[1:])  # the printed command, as typed: no CONFIG
    for name in ("last.pt", "model.pt"):
        a = torch.load(full / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_quickstart_runs_the_whole_job_and_reuses_what_it_made(tmp_path, capsys):
    """The README's main job, made tiny: collect, train, plan with the run and the shipped Hopper model, summary;
    run again, it reuses the dataset and the trained run."""
    from trajformer.quickstart import quickstart

    tiny = ["train.max_steps=20", "train.eval_every=10", "model.n_layer=1", "model.n_embd=32"]
    summary = quickstart(tmp_path / "q", steps=400, plan_steps=3, overrides=tiny)
    assert json.loads((tmp_path / "q" / "quickstart.json").read_text()) == summary
    assert len(summary["plans"]) == 2 and all(len(p["returns"]) == 1 for p in summary["plans"].values())
    assert summary["best_val_loss"] is not None and (tmp_path / "q" / "run" / "loss.png").stat().st_size > 0
    capsys.readouterr()
    quickstart(tmp_path / "q", steps=400, plan_steps=3, overrides=tiny)
    out = capsys.readouterr().out
    assert "[1/4] dataset trajformer/quickstart-hopper-v0: already made" in out and "already trained (20 steps)" in out


def test_quickstart_refuses_bad_settings_before_any_work(tmp_path, monkeypatch):
    from trajformer.quickstart import quickstart

    with pytest.raises(ValueError, match="--plan-steps must be >= 1, got 0"):
        quickstart(tmp_path / "q", plan_steps=0)
    (tmp_path / "q" / "run").mkdir(parents=True)  # a run made earlier with other settings is not silently reused
    (tmp_path / "q" / "run" / "config.toml").write_text(to_toml(load_config(QUICKSTART, ["model.n_layer=3"])))
    with pytest.raises(ValueError, match=r"was trained with other settings \(model.n_layer\); drop those --set"):
        quickstart(tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").rglob("*")) == ["config.toml", "run"]
    # A damaged run record is refused before the dataset step (it failed after it, naming no file).
    (tmp_path / "q" / "run" / "config.toml").write_text(to_toml(load_config(QUICKSTART)))
    (tmp_path / "q" / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "q" / "run" / "run.json").write_text('{"compute": {"tot')
    monkeypatch.setattr("trajformer.quickstart.collect", lambda *a, **k: pytest.fail("collected"))
    monkeypatch.setattr("trajformer.quickstart.is_local_dataset", lambda *a: False)
    with pytest.raises(ValueError, match=r"q/run/run.json is corrupt .*use another --out"):
        quickstart(tmp_path / "q")


def test_quickstart_plans_with_the_plan_settings_given(tmp_path, monkeypatch):
    """--set plan.* reaches both plans, also for a reused run and the shipped model (it was dropped silently)."""
    import trajformer.quickstart as qs

    monkeypatch.setattr(qs, "is_local_dataset", lambda *a: True)
    monkeypatch.setattr(qs, "trained_steps", lambda run_dir: (1, 1))
    monkeypatch.setattr(qs, "load_run", lambda directory: load_run("hopper-medium"))
    monkeypatch.setattr(qs, "read_metrics", lambda path: [])
    planned = []
    monkeypatch.setattr(qs, "evaluate", lambda run, plan_cfg, **k: planned.append(plan_cfg) or {"returns": []})
    monkeypatch.setattr(qs, "report", lambda record: "")
    (tmp_path / "q" / "run").mkdir(parents=True)
    (tmp_path / "q" / "run" / "run.json").write_text("{}")
    qs.quickstart(tmp_path / "q", overrides=["plan.beam_width=8", "plan.horizon=3"])
    assert [(p.beam_width, p.horizon) for p in planned] == [(8, 3), (8, 3)]


def test_a_run_stopped_before_its_first_weights_trains_again(tiny_config, hopper_dataset, tmp_path):
    """run.json is written first: a run killed before any checkpoint does not lock its directory."""
    out = tmp_path / "run"
    train(tiny_config(hopper_dataset, "train.max_steps=2"), out, progress=False)
    for name in ("checkpoint.pt", "model.pt", "last.pt"):
        (out / name).unlink()
    train(tiny_config(hopper_dataset, "train.max_steps=3"), out, progress=False)
    assert max(row["step"] for row in read_metrics(out / "metrics.jsonl")) == 3
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        train(tiny_config(hopper_dataset, "train.max_steps=3"), out, progress=False)


def test_split_seed_keeps_one_split_across_training_seeds(tiny_config, hopper_dataset, tmp_path):
    """train.seed draws the split too unless data.split_seed is set: a seed sweep on one split sets it."""
    runs = {}
    for name, overrides in {"seed0": (), "seed1-split0": ("train.seed=1", "data.split_seed=0"),
                            "seed1": ("train.seed=1",)}.items():
        cfg = tiny_config(hopper_dataset, "train.max_steps=2", "data.validation_fraction=0.3", *overrides)
        runs[name] = load_run(train(cfg, tmp_path / name, progress=False))
    split = {name: run.meta["split"] for name, run in runs.items()}
    assert split["seed1-split0"] == split["seed0"] and split["seed0"]["seed"] == 0
    assert split["seed1"]["validation_episodes"] != split["seed0"]["validation_episodes"]
    assert split["seed1"]["seed"] == 1
    weights = {name: run.model.wte.weight for name, run in runs.items()}
    assert not torch.equal(weights["seed1-split0"], weights["seed0"])  # another training seed all the same


def test_a_training_into_a_directory_another_is_writing_is_refused(tiny_config, hopper_dataset, tmp_path):
    """A double launch, or a --resume of a run still training, would write one run's files from two processes."""
    from trajformer.files import file_lock

    out = tmp_path / "run"
    out.mkdir()
    with file_lock(out / ".train.lock"):  # held as a training in another process holds it
        for resume in (False, True):
            with pytest.raises(ValueError, match=r"another `trajformer train` is writing .*run; wait for it to end"):
                train(tiny_config(hopper_dataset, "train.max_steps=2"), out, resume=resume, progress=False)
    assert [p.name for p in out.iterdir()] == [".train.lock"]  # nothing written
    train(tiny_config(hopper_dataset, "train.max_steps=2"), out, progress=False)  # free again
    assert (out / "model.pt").is_file()


def test_a_diverged_run_stops_in_one_line_and_saves_no_nan_weights(tiny_config, hopper_dataset, tmp_path, capsys):
    """A loss that turns NaN (a huge learning rate, no clipping) stops training with a one-line error before any
    non-finite weights are saved: with no validation split model.pt would otherwise be written at the end."""
    out = tmp_path / "run"
    cfg = tiny_config(hopper_dataset, "train.max_steps=30", "train.learning_rate=1e6", "train.grad_clip=1e30",
                      "train.log_every=1", "data.validation_fraction=0.0")
    with pytest.raises(ValueError, match=r"training diverged: the loss is nan at step \d+; .* lower "
                                         r"train.learning_rate \(now 1000000.0\)"):
        train(cfg, out, progress=False)
    for name in ("checkpoint.pt", "model.pt", "last.pt"):
        assert not (out / name).exists()
    train(tiny_config(hopper_dataset, "train.max_steps=2"), out, progress=False)  # nothing kept: trains again


def test_the_first_best_weights_come_with_a_checkpoint(tiny_config, hopper_dataset, tmp_path, monkeypatch):
    """model.pt marks a directory as a run, so it never exists without a checkpoint.pt to resume from (a run
    killed between the first validation and the first scheduled checkpoint could be neither resumed nor retrained);
    the resumed run's weights files are byte for byte the uninterrupted run's (their bytes do not depend on temp
    names; checkpoint.pt's pickle also depends on which objects its optimizer state shares)."""
    from trajformer import train as train_module
    from trajformer.files import load_torch

    overrides = ("train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=100")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(tiny_config(hopper_dataset, *overrides), whole, progress=False)
    assert [r["step"] for r in read_metrics(whole / "metrics.jsonl") if "val_loss" in r] == [2, 4, 6]
    real = train_module.save_torch

    def stop_after_the_first_checkpoint(path, obj):
        real(path, obj)
        if path.name == "last.pt":
            raise KeyboardInterrupt  # killed right after it

    monkeypatch.setattr(train_module, "save_torch", stop_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(hopper_dataset, *overrides), stopped, progress=False)
    monkeypatch.setattr(train_module, "save_torch", real)
    assert (stopped / "model.pt").exists() and load_torch(stopped / "checkpoint.pt")["step"] == 2
    train(tiny_config(hopper_dataset, *overrides), stopped, resume=True, progress=False)
    for name in ("model.pt", "last.pt"):
        assert (stopped / name).read_bytes() == (whole / name).read_bytes(), name
    resumed, straight = load_torch(stopped / "checkpoint.pt"), load_torch(whole / "checkpoint.pt")
    assert (resumed["step"], resumed["best_val"]) == (straight["step"], straight["best_val"])
    assert all(torch.equal(x, y) for x, y in zip(resumed["rng"], straight["rng"], strict=True))


def test_unwritable_out_and_a_full_disk_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """--out under a file is refused before the data is read; a checkpoint that cannot be written (torch reports
    a short write as a RuntimeError) is one line naming the file, and no temp file is left."""
    from trajformer import files

    (tmp_path / "a-file").write_text("")
    err = _one_line_error(["train", str(tiny_run / "config.toml"), "--out", str(tmp_path / "a-file" / "out")],
                          "cannot write into", capsys)
    assert "is not a directory" in err, err

    def full_disk(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(files.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*x\.pt \(\[enforce fail.*free disk space"):
        files.save_torch(tmp_path / "x.pt", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_damaged_run_records_are_one_line(tiny_run, tmp_path, capsys):
    """A discretizer with NaN or unordered edges, a run.json without its provenance (info, plan) or unreadable
    (--resume): each a one-line error naming the file, nothing written."""
    import numpy as np

    def fails(args: list[str], pattern: str) -> None:
        _one_line_error(args, pattern, capsys)

    own = tmp_path / "own"
    shutil.copytree(tiny_run, own)
    state = dict(np.load(own / "discretizer.npz"))
    for edit in (lambda e: e.__setitem__((0, 3), np.nan), lambda e: e.__setitem__((1, 2), e[1, 1] - 1.0)):
        edges = state["edges"].copy()
        edit(edges)
        np.savez(own / "discretizer.npz", **{**state, "edges": edges})
        fails(["info", str(own)], r"discretizer .*discretizer.npz is corrupt \(discretizer column \d: its real "
                                  r"edges are not finite and increasing\); retrain the run")
    np.savez(own / "discretizer.npz", **state)
    meta = json.loads((own / "run.json").read_text())
    (own / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "provenance"}))
    fails(["info", str(own)], r"run.json lacks what info reads \(KeyError: 'provenance'\); retrain the run")
    (own / "run.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()}
    fails(["train", str(own / "config.toml"), "--out", str(own), "--resume"],
          r"--resume: .*run.json, the run's record, is missing or corrupt .*use a new --out directory")
    assert {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()} == before
    text_sizes = {**meta["model"], "n_embd": str(meta["model"]["n_embd"])}  # a size written as a string
    (own / "run.json").write_text(json.dumps({**meta, "model": text_sizes}))
    fails(["info", str(own)], r"run.json is corrupt \(TypeError: .*\); retrain the run")
    (own / "run.json").write_text(json.dumps(meta))
    # An evaluation of one episode has no standard error: info shows "-" (it blamed run.json and said retrain).
    settings = {"official": {"plan": {"beam_width": 4, "horizon": 2, "dtype": "float32"}, "mean_return": 12.5,
                             "stderr": None, "normalized_score": None, "seconds_per_step": 0.5}}
    (own / "eval.json").write_text(json.dumps({"episodes": 1, "settings": settings}))
    assert "official, beam 4 / horizon 2 (float32): 12.5 +- -, 0.50 s per env step" in describe(str(own), None, [])
    (own / "eval.json").write_text('{"episodes": 1, "sett')
    fails(["info", str(own)], r"eval.json or eval.partial.json is damaged \(JSONDecodeError: .*run `trajformer eval`")
    (own / "eval.json").unlink()
    (own / "config.toml").unlink()
    fails(["info", str(own)], r"has no config.toml: the run directory is incomplete")


def test_a_discretizer_from_another_run_with_the_same_shape_is_refused(tiny_run, tmp_path, capsys):
    """discretizer.npz swapped in from another run with the same dims and bins (one edge moved, still ordered):
    plan, info and --resume refuse it by run.json's digest, before any work (it was planned with silently)."""
    import numpy as np

    own = tmp_path / "own"
    shutil.copytree(tiny_run, own)
    assert "discretizer_sha256" in json.loads((own / "run.json").read_text())
    load_run(own)  # its own discretizer loads
    state = dict(np.load(own / "discretizer.npz"))
    edges = state["edges"].copy()
    edges[0, 1] = (edges[0, 0] + edges[0, 1]) / 2  # between its neighbours: a valid discretizer, not this run's
    np.savez(own / "discretizer.npz", **{**state, "edges": edges})
    pattern = r"discretizer.npz is not the discretizer this run was trained with .*retrain the run"
    before = {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()}
    for args in (["info", str(own)], ["plan", str(own), "--episodes", "1"],
                 ["train", str(own / "config.toml"), "--out", str(own), "--resume"]):
        if args[0] == "train":
            torch.save({"model": {}, "optimizer": {}, "step": 1, "best_val": 1.0, "rng": {}}, own / "checkpoint.pt")
            before["checkpoint.pt"] = (own / "checkpoint.pt").read_bytes()
        _one_line_error(args, pattern, capsys)
    assert {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()} == before


def test_a_checkpoint_of_another_model_is_one_line_on_resume(tiny_config, hopper_dataset, tiny_run, tmp_path,
                                                               capsys):
    own = tmp_path / "own"
    shutil.copytree(tiny_run, own)
    other = tmp_path / "other"
    train(tiny_config(hopper_dataset, "train.max_steps=2", "model.n_embd=16"), other,
          progress=False)
    shutil.copy(other / "checkpoint.pt", own / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()}
    err = _one_line_error(["train", str(own / "config.toml"), "--out", str(own), "--resume"],
                          r"checkpoint.pt does not fit this model \(", capsys)
    assert "size mismatch" in err and "use a new --out directory" in err
    assert {p.name: p.read_bytes() for p in own.iterdir() if p.is_file()} == before


def test_resume_refuses_changed_settings_and_records_allowed_ones(tiny_config, hopper_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(hopper_dataset, "train.max_steps=4"), out, progress=False)
    before = (out / "config.toml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--resume", "--out", str(out), "--set", "train.max_steps=8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "would change the run (train.max_steps 4 -> 8)" in err and "\n" not in err
    with pytest.raises(SystemExit):  # the best validation loss so far was measured on the run's windows
        cli_main(["train", "--resume", "--out", str(out), "--set", "train.eval_windows=7"])
    assert "would change the run (train.eval_windows" in capsys.readouterr().err
    assert (out / "config.toml").read_text() == before  # nothing rewritten
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')  # a row cut by a kill: left out, and gone once the run resumes
    full = read_metrics(out / "metrics.jsonl")
    cli_main(["train", "--resume", "--out", str(out), "--set", "train.log_every=2"])
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[: len(full)] == full and {"step": 4, "resumed_with": {"train.log_every": 2}} in rows
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == len(rows)  # every line a whole row
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON .*; delete that line"):
        read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def other_hopper_dataset(hopper_dataset):
    """Hopper data from other seeds: the same columns, values the tiny run's discretizer was not fit on."""
    from trajformer.collect import collect

    collect("Hopper-v5", "random", steps=600, dataset_id="test/hopper-other-v0", seed=7, max_episode_steps=40,
            num_envs=2)
    return "test/hopper-other-v0"


def test_init_from_starts_at_the_runs_weights_and_keeps_its_discretizer(tiny_run, other_hopper_dataset, tmp_path):
    out = tmp_path / "fine"
    cfg = load_run(tiny_run).config
    cfg.data.dataset = other_hopper_dataset
    cfg.train.init_from, cfg.train.max_steps, cfg.train.learning_rate = str(tiny_run), 3, 1e-30
    train(cfg, out, progress=False)
    parent, child = load_run(tiny_run), load_run(out, weights="last.pt")
    for (name, a), b in zip(parent.model.state_dict().items(), child.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-25), name  # lr 1e-30: the weights it started from
    assert np.array_equal(parent.discretizer.edges, child.discretizer.edges)
    fitted = prepare(cfg).discretizer  # what a run from scratch would fit on the new data
    assert not np.array_equal(fitted.edges, child.discretizer.edges)
    record = json.loads((out / "run.json").read_text())["compute"]["init_from"]
    assert record["model_sha256"] == __import__("hashlib").sha256((tiny_run / "model.pt").read_bytes()).hexdigest()
    assert record["dataset_id"] == parent.meta["dataset_id"]
    assert f"fine-tuned    from {tiny_run}" in describe(str(out))


def test_init_from_with_learning_continues_from_the_parents_loss(tiny_run, other_hopper_dataset, tmp_path):
    """A fine-tune's first validation loss is the parent's level, far below a fresh model's."""
    cfg = load_run(tiny_run).config
    cfg.data.dataset = other_hopper_dataset
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.learning_rate = 1, 1, 1e-5
    fresh = read_metrics(train(cfg, tmp_path / "fresh", progress=False) / "metrics.jsonl")
    cfg.train.init_from = str(tiny_run)
    fine = read_metrics(train(cfg, tmp_path / "fine", progress=False) / "metrics.jsonl")
    val = [next(r["val_obs"] for r in rows if "val_obs" in r) for rows in (fresh, fine)]
    assert val[1] < val[0] - 0.5, val


@pytest.mark.parametrize("override, message", [
    ("model.n_embd=64", r"train.init_from: .* is a different network \(n_embd 32 -> 64\); set model\.\*"),
    ("data.obs_dims=\"0:5\"", r"discretizer is for 16-dim .* train.init_from: set data.obs_dims and discretizer"),
    ("data.obs_dims=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
     r"train.init_from: .* trained on observation columns \[0, 1, .*, this data gives \[1, 0, .*set data.obs_dims"),
    ("train.init_from=\"nowhere\"", r"train.init_from: nowhere is not a run directory"),
    ("data.discount=0.5", r"train.init_from: .* tokenised its values and rewards with other data.discount 0.99 -> "
                          r"0.5; set them as in its config.toml"),
])
def test_init_from_refuses_a_run_that_does_not_fit(tiny_run, other_hopper_dataset, tmp_path, capsys, override,
                                                    message):
    out = tmp_path / "fine"
    args = ["train", str(tiny_run / "config.toml"), "--dataset", other_hopper_dataset, "--out", str(out),
            "--set", f'train.init_from="{tiny_run}"', "--set", override]
    _fails_before_writing(args, out, message, capsys)


def test_model_pt_holds_the_weights_of_the_best_validation(tiny_config, hopper_dataset, tmp_path, monkeypatch):
    """model.pt is the model at the lowest validation loss (here the second of three), last.pt the last one."""
    scripted, snapshots = iter([3.0, 1.0, 2.0]), []

    def scripted_losses(model, *args, **kwargs) -> dict:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        loss = next(scripted)
        return {"val_loss": loss, **{f"val_{t}": loss for t in train_module.TOKEN_TYPES}}

    monkeypatch.setattr(train_module, "validation_losses", scripted_losses)
    out = train(tiny_config(hopper_dataset, "train.max_steps=30", "train.eval_every=10"), tmp_path / "run",
                progress=False)
    best, last = torch.load(out / "model.pt", weights_only=True), torch.load(out / "last.pt", weights_only=True)
    assert len(snapshots) == 3
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert all(torch.equal(last[k], snapshots[2][k]) for k in last)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_validation_losses_per_token_type_match_a_direct_computation(tiny_run):
    """Each token type's mean cross-entropy, with the type read off the target's position in the window (obs,
    action, reward, value columns of a transition), and the weighted loss as trained."""
    run = load_run(tiny_run)
    cfg, model = run.config, run.model
    prep = prepare(cfg, discretizer=run.discretizer)
    dS, dA, T = model.config.obs_dim, model.config.act_dim, model.config.transition_dim
    weights = loss_weights(dS, dA, cfg.data.sequence_length, 0.5, 2.0, 3.0)  # distinct weights per type
    got = train_module.validation_losses(model, prep.val_windows, cfg, weights, autocast=False)

    n = min(len(prep.val_windows), cfg.train.eval_windows)
    x, y, mask = prep.val_windows.batch(torch.from_numpy(np.linspace(0, len(prep.val_windows) - 1, n).round()).long())
    with torch.no_grad():
        ce = token_losses(model(x), y).double()
    column = torch.arange(1, ce.shape[1] + 1) % T  # target position p is token p + 1 of the window
    kind = torch.where(column < dS, 0, torch.where(column < dS + dA, 1, torch.where(column == dS + dA, 2, 3)))
    mask = mask.double()
    for i, name in enumerate(train_module.TOKEN_TYPES):
        of_kind = mask * (kind == i)
        assert got[f"val_{name}"] == pytest.approx(float((ce * of_kind).sum() / of_kind.sum()), rel=1e-5)
    w = weights[: ce.shape[1]].double()
    assert got["val_loss"] == pytest.approx(float((ce * w * mask).sum() / mask.sum()), rel=1e-5)
    assert len({round(got[f"val_{t}"], 3) for t in train_module.TOKEN_TYPES}) == 4  # the types really differ
