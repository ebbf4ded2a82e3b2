"""Long-horizon prediction: the error and histogram-likelihood measures on hand-made cases, rollout shapes,
teacher forcing that really uses the actions, stop tokens reported, attention maps that reproduce the model,
`trajformer predict` end to end, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch

from trajformer import cli
from trajformer import predict as predict_module
from trajformer.config import EnsembleConfig
from trajformer.decoding import DECODES, ReferenceDecoder, crop_start, decode_bins
from trajformer.ensemble import train_ensemble
from trajformer.files import save_torch
from trajformer.metrics import dim_errors, error_summary, histogram_loglik, normalized_error
from trajformer.predict import (
    attention_maps,
    choose_starts,
    context_tokens,
    load_heldout,
    predict,
    rollout_transformer,
    sample_mean,
    save_heldout,
    stops_possible,
    transformer_compute,
)
from trajformer.run import load_run


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def held(run):
    return load_heldout(run.meta["dataset_id"], run)


def test_normalized_error_and_summary_hand_made():
    true = np.zeros((1, 2, 2))
    std = np.array([1.0, 2.0])
    pred = np.array([[[1.0, 6.0], [np.nan, 0.0]]])  # errors in stds: (1, 3) at step 1; step 2 stopped
    err = normalized_error(pred, true, std)
    assert err[0, 0] == pytest.approx(math.sqrt(5.0)) and np.isnan(err[0, 1])
    summary = error_summary(np.array([[1.0, np.nan], [3.0, 2.0]]))
    assert summary["mean"] == [2.0, 2.0] and summary["rows"] == [2, 1]
    assert summary["q50"][0] == pytest.approx(2.0)
    assert error_summary(np.array([[1.0, 1.0], [3.0, np.inf]]))["mean"] == [2.0, np.inf]  # diverged: counted
    two = np.concatenate([pred, np.array([[[3.0, 2.0], [np.nan, np.nan]]])])  # a second start, stopped at step 2
    by_dim = dim_errors(two, np.zeros((2, 2, 2)), std, [1, 2])
    assert by_dim["1"] == pytest.approx([math.sqrt((1 + 9) / 2), math.sqrt((9 + 1) / 2)])  # RMS over starts
    assert by_dim["2"][0] is None and by_dim["2"][1] == 0.0  # dim 0 stopped in both starts; dim 1 exact


def test_histogram_loglik_hand_made():
    edges = np.array([[0.0, 1.0, 2.0, 4.0, 4.0]])  # 3 real bins (widths 1, 1, 2) + padding
    n_real = np.array([3])
    samples = np.array([[[0.5], [3.0]], [[0.5], [np.nan]], [[1.5], [3.5]], [[3.0], [0.1]]])  # (M=4, H=2, D=1)
    true = np.array([[0.2], [2.5]])
    ll, oracle = histogram_loglik(samples, true, edges, n_real)
    # step 1: 2 of 4 samples in the true bin [0, 1) of width 1, one pseudo-count over 3 bins
    assert ll[0] == pytest.approx(math.log((2 + 1 / 3) / 5)) and oracle[0] == pytest.approx(0.0)
    # step 2: the stopped sample counts with no mass: 2 of 4 in [2, 4) of width 2
    assert ll[1] == pytest.approx(math.log((2 + 1 / 3) / 5) - math.log(2.0))
    assert oracle[1] == pytest.approx(-math.log(2.0))
    ll_scaled, oracle_scaled = histogram_loglik(samples, true, edges, n_real, scale=np.array([2.0]))
    assert ll_scaled[1] == pytest.approx(ll[1] + math.log(2.0)) and oracle_scaled[1] == pytest.approx(0.0)
    assert np.all(ll <= oracle)
    all_stopped, bound = histogram_loglik(np.full((2, 1, 1), np.nan), true[:1], edges, n_real)
    assert all_stopped[0] == pytest.approx(math.log((1 / 3) / 3)) and bound[0] == pytest.approx(0.0)  # pseudo only


def test_open_loop_shapes_and_determinism(run, held):
    starts = choose_starts(held, 4, 2, seed=0)
    prefixes = [context_tokens(run, held.episodes[i], t) for i, t in starts]
    out = rollout_transformer(run, prefixes, horizon=4, samples=3, greedy=False, seed=1)
    assert out["obs"].shape == (2, 3, 4, run.obs_dim) and out["act"].shape == (2, 3, 4, run.act_dim)
    assert out["rew"].shape == (2, 3, 4) and out["stop_step"].shape == (2, 3)
    mids = run.discretizer.midpoints
    assert np.all(np.isin(out["act"][..., 0], mids[run.obs_dim]))  # sampled actions are bin midpoints
    again = rollout_transformer(run, prefixes, horizon=4, samples=3, greedy=False, seed=1)
    np.testing.assert_array_equal(np.nan_to_num(out["obs"], nan=7.0), np.nan_to_num(again["obs"], nan=7.0))


@pytest.mark.parametrize("how", [*DECODES, "sampled"])
def test_rollouts_equal_the_uncached_reference_decoder(run, held, how, monkeypatch):
    """Open-loop rollouts past the model's window (horizon 5 > 3 transitions: the window crops), with the model's
    own value tokens fed back and every decode, equal the same rollouts decoded uncached (the official
    algorithm: a full forward pass over the cropped window per token), in float64."""
    model = copy.deepcopy(run.model).double()
    run64 = dataclasses.replace(run, model=model)
    starts = choose_starts(held, 5, 2, seed=3)
    prefixes = [context_tokens(run, held.episodes[i], t) for i, t in starts]
    kwargs = {"greedy": how != "sampled", "decode": "argmax" if how == "sampled" else how, "seed": 4}
    cached = rollout_transformer(run64, prefixes, horizon=5, samples=2, **kwargs)
    monkeypatch.setattr(predict_module, "CachedDecoder", ReferenceDecoder)
    reference = rollout_transformer(run64, prefixes, horizon=5, samples=2, **kwargs)
    for key in ("obs", "act", "rew", "stop_step"):  # the same tokens; expectation values agree to rounding
        np.testing.assert_allclose(cached[key], reference[key], rtol=0, atol=1e-12)


def test_teacher_forcing_uses_the_actions(run, held):
    (i, t), = choose_starts(held, 3, 1, seed=2)
    ep = held.episodes[i]
    prefix = [context_tokens(run, ep, t)]
    actions = ep.act[t : t + 3][None]
    out = rollout_transformer(run, prefix, 3, actions=actions, greedy=True)
    dS, N = run.obs_dim, run.discretizer.n_bins
    np.testing.assert_allclose(out["act"][0, 0], run.discretizer.decode(
        run.discretizer.encode(np.concatenate([np.zeros((3, dS)), actions[0], np.zeros((3, 2))], 1)))[:, dS:-2])
    # The first predicted state's first dim is the argmax of one uncached forward over [context, a, r, V].
    T, W = run.model.config.transition_dim, run.model.config.block_size
    seq = torch.cat([prefix[0], out_tokens(run, actions[0, 0], dS)])
    reward_logits = run.model(seq[crop_start(len(seq), W, T) :][None])[0, -1, :N]
    r_tok = int(reward_logits.argmax()) + (dS + run.act_dim) * N
    v_tok = (run.discretizer.n_real[-1] - 1) + (T - 1) * N
    seq = torch.cat([seq, torch.tensor([r_tok, v_tok])])
    first = int(run.model(seq[crop_start(len(seq), W, T) :][None])[0, -1].argmax())
    assert out["obs"][0, 0, 0, 0] == pytest.approx(run.discretizer.midpoints[0, first])
    flipped = rollout_transformer(run, prefix, 3, actions=-actions, greedy=True)
    assert not np.allclose(np.nan_to_num(out["obs"]), np.nan_to_num(flipped["obs"]))


def out_tokens(run, values, first_dim):
    from trajformer.tokens import encode_values

    return torch.as_tensor(encode_values(run.discretizer, np.asarray(values), first_dim))


def test_attention_maps_reproduce_the_model(run, held):
    ep = held.episodes[0]
    idx = context_tokens(run, ep, run.config.data.sequence_length - 1)[None]
    maps = attention_maps(run.model, idx)
    L, H, t = run.model.config.n_layer, run.model.config.n_head, idx.shape[1]
    assert maps.shape == (L, 1, H, t, t)
    torch.testing.assert_close(maps.sum(-1), torch.ones(L, 1, H, t))
    T = run.model.config.transition_dim
    assert float(maps[..., T - 1].abs().max()) == 0.0  # no query attends to a value column
    assert float(maps.triu(1).abs().max()) == 0.0  # causal
    # Weights @ values through c_proj reproduce each block's SDPA attention output.
    model = run.model
    x = model.wte(idx) + model.wpe(torch.arange(t))
    for layer, block in enumerate(model.blocks):
        h = block.ln_1(x)
        _, _, v = block.attn.c_attn(h).split(x.shape[-1], dim=2)
        v = v.view(1, t, H, -1).transpose(1, 2)
        y = (maps[layer] @ v).transpose(1, 2).reshape(1, t, -1)
        torch.testing.assert_close(block.attn.c_proj(y), block.attn(h, model.bias[:t, :t]), atol=1e-5, rtol=1e-4)
        x = block(x, model.bias[:t, :t])


def test_attention_maps_of_a_window_model_keep_its_band():
    """A window model's maps rotate queries and keys and stay in the band; weights @ values reproduce each block."""
    from trajformer.model import GPT, GPTConfig

    torch.manual_seed(0)
    T = 6
    model = GPT(GPTConfig(obs_dim=3, act_dim=1, n_bins=8, block_size=4 * T - 1, n_layer=2, n_head=2, n_embd=16,
                          dropout=0.0, attention="window", window=2 * T)).eval()
    t = 4 * T - 1
    idx = (torch.randint(0, 8, (1, t)) + 8 * (torch.arange(t) % T))
    maps = attention_maps(model, idx)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 2, t))
    assert float(maps.tril(-2 * T).abs().max()) == 0.0  # nothing from 2T tokens back or more
    rope = model._rope(torch.arange(t), torch.float32)
    x = model.wte(idx)
    for layer, block in enumerate(model.blocks):
        h = block.ln_1(x)
        v = block.attn.c_attn(h).split(16, dim=2)[2].view(1, t, 2, -1).transpose(1, 2)
        y = (maps[layer] @ v).transpose(1, 2).reshape(1, t, -1)
        torch.testing.assert_close(block.attn.c_proj(y), block.attn(h, model.bias[:t, :t], rope=rope),
                                   atol=1e-5, rtol=1e-4)
        x = block(x, model.bias[:t, :t], rope=rope)


def test_predict_end_to_end_and_npz_slice(run, ensemble_dir, tmp_path):
    npz = save_heldout(run.path, tmp_path / "heldout.npz", episodes=2)
    held = load_heldout(str(npz), run)
    assert len(held.episodes) == 2 and held.obs_std.shape == (run.obs_dim,)
    out = tmp_path / "pred"
    cli.main(["predict", str(run.path), "--dataset", str(npz), "--horizon", "5", "--starts", "3", "--samples", "4",
              "--baseline", str(ensemble_dir), "--out", str(out)])
    record = json.loads((out / "predict.json").read_text())
    assert set(record["summary"]) == {"1", "5"}  # the summary steps up to the horizon, and its last step
    assert len(record["teacher_forced"]["transformer"]["mean"]) == 5 and len(record["open_loop"]["oracle"]) == 5
    for name in ("error_vs_horizon.png", "likelihood_vs_horizon.png", "traces.png", "filmstrip.png"):
        assert (out / name).stat().st_size > 1000
    assert record["compute"]["ensemble"]["epochs"] >= 1 and record["compute"]["transformer"]["steps"] == 300
    ol = record["open_loop"]
    assert all(t <= o for t, o in zip(ol["transformer"], ol["oracle"], strict=True))
    means = record["teacher_forced"]["sample_mean"]
    assert set(means) == {"transformer", "ensemble"} and all(np.isfinite(m["mean"]).all() for m in means.values())
    assert record["summary"]["1"]["transformer_error_sample_mean"] == means["transformer"]["mean"][0]
    # The baseline learned the dynamics and is scored against the right step: its one-step error is well under
    # that of predicting no change (the tiny transformer is not, at 300 steps, so only its bookkeeping is checked).
    still = np.concatenate([normalized_error(e.obs[None, :-1], e.obs[None, 1:], held.obs_std)[0]
                            for e in held.episodes])
    assert record["summary"]["1"]["ensemble_error"] < 0.6 * np.mean(still)


def test_sample_mean_leaves_stopped_rows_out():
    """The point prediction of sampled rollouts averages each start's samples (axis 1), skipping stopped rows."""
    obs = np.arange(2 * 3 * 2 * 1, dtype=float).reshape(2, 3, 2, 1)  # K=2 starts, M=3 samples, H=2, dS=1
    obs[0, 2, 1] = np.nan  # start 0's third sample stopped at step 2
    obs[1, :, 1] = np.nan  # every sample of start 1 stopped at step 2
    mean = sample_mean(obs)
    assert mean.shape == (2, 2, 1)
    np.testing.assert_allclose(mean[0, :, 0], [2.0, 2.0])  # (0+2+4)/3, then (1+3)/2
    assert mean[1, 0, 0] == 8.0 and np.isnan(mean[1, 1, 0])


def _stopper(run, path, p_stop: float):
    """A copy of the run whose model puts p_stop on stop before state dim 0 (uniform bins otherwise)."""
    shutil.copytree(run.path, path)
    model = load_run(path).model
    N, T = model.config.n_bins, model.config.transition_dim
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # every final hidden state is the ones vector
        model.head.zero_()
        model.head[T - 1, :, N] = math.log(p_stop / (1 - p_stop) * N) / model.config.n_embd
    save_torch(path / "model.pt", model.state_dict())
    return path


def test_stop_tokens_end_rollouts_and_are_reported(run, tmp_path):
    """p(stop) 0.3 before each state: greedy decodes never stop (stop must beat the bins), samples stop ~30% of
    the time at each step, end their row there, and are reported; at p(stop) 0.7 greedy rows stop at once."""
    stopper = _stopper(run, tmp_path / "stopper", 0.3)
    assert stops_possible(load_run(stopper))  # the tiny dataset has terminations
    record = predict(stopper, horizon=4, starts=2, samples=16, out=tmp_path / "p", render=False, progress=False)
    assert record["teacher_forced"]["transformer_stops"] == []
    assert all(v is not None for v in record["teacher_forced"]["transformer"]["mean"])
    frac = record["open_loop"]["transformer_stopped_fraction"]
    assert 0.1 < frac[0] < 0.6 and frac[-1] > frac[0]  # some rows stop later than the first step
    stopped = load_run(stopper)
    held = load_heldout(stopped.meta["dataset_id"], stopped)
    (i, t), = choose_starts(held, 4, 1)
    out = rollout_transformer(stopped, [context_tokens(stopped, held.episodes[i], t)], 4, samples=16, greedy=False)
    for row, step in zip(out["obs"][0], out["stop_step"][0], strict=True):
        if step:
            assert np.all(np.isnan(row[step - 1 :])) and np.all(np.isfinite(row[: step - 1]))
        else:
            assert np.all(np.isfinite(row))
    likely = load_run(_stopper(run, tmp_path / "likely", 0.7))
    greedy = rollout_transformer(likely, [context_tokens(likely, held.episodes[i], t)], 4, greedy=True)
    assert greedy["stop_step"].tolist() == [[1]]


def test_no_stop_when_the_data_has_no_terminations(run, tmp_path):
    stopper = load_run(_stopper(run, tmp_path / "stopper", 0.7))
    stopper.meta["dataset_stats"]["terminated_episodes"] = 0
    held = load_heldout(stopper.meta["dataset_id"], stopper)
    (i, t), = choose_starts(held, 4, 1)
    prefix = [context_tokens(stopper, held.episodes[i], t)]
    for greedy in (True, False):
        out = rollout_transformer(stopper, prefix, 4, samples=8, greedy=greedy)
        assert not out["stop_step"].any() and np.isfinite(out["obs"]).all()


def test_live_value_position_gets_the_models_argmax_value_token(run, held):
    """The token fed at the value position of a rollout is the argmax of the model's value logits there."""
    ep = held.episodes[0]
    prefix = context_tokens(run, ep, 3)
    actions = ep.act[3:5][None]
    out = rollout_transformer(run, [prefix], 2, actions=actions, greedy=True)
    dS, dA, N = run.obs_dim, run.act_dim, run.discretizer.n_bins
    T = dS + dA + 2
    seq = torch.cat([prefix, out_tokens(run, actions[0, 0], dS), out_tokens(run, out["rew"][0, 0, :1], dS + dA)])
    block = run.model.config.block_size

    def window(x):  # the planner's sliding window: whole transitions dropped from the front
        return x[None, crop_start(len(x), block, T) :]

    value_logits = run.model(window(seq))[0, -1, :N]
    assert int(value_logits.argmax()) != N - 1  # differs from the placeholder's bin, so the test can tell them apart
    # The rollout's next state is what the model predicts after that value token, not after the placeholder.
    value_token = torch.tensor([int(value_logits.argmax()) + (T - 1) * N])
    after = run.model(window(torch.cat([seq, value_token])))[0, -1, :N]
    first_state = run.discretizer.midpoints[0][int(after.argmax())]
    assert out["obs"][0, 0, 0, 0] == pytest.approx(first_state)


def test_transformer_compute_reads_the_logged_wall_clock(run, tmp_path):
    """The run's logged `seconds` (summed over resumes); a log from before they were kept gets the throughput
    estimate, labelled so."""
    logged = transformer_compute(run)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "tokens_per_s" in r][-1]
    assert logged["train_seconds"] == pytest.approx(last["seconds"]) and logged["train_seconds_source"] == "logged"
    assert logged["steps"] == last["step"] and logged["windows_seen"] == last["step"] * run.config.train.batch_size
    old = tmp_path / "old"
    shutil.copytree(run.path, old)
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "seconds"}) + "\n"
                                               for r in rows))
    estimate = transformer_compute(load_run(old))
    assert estimate["train_seconds_source"] == "estimated from throughput" and estimate["train_seconds"] > 0


def test_one_step_nll_of_a_uniform_model_is_the_bins_widths(run, held):
    """A model whose logits are all equal puts 1/(N+1) on every bin: its one-step NLL per dim, in dataset-std
    units, is log(N+1) + log(bin width / std) of the true next state's bin, averaged over the sampled dims. The
    transitions never include a terminated episode's last one (training put stop tokens after it)."""
    import copy

    from trajformer.predict import one_step_transitions, transformer_one_step

    flat = copy.deepcopy(run)
    with torch.no_grad():
        flat.model.head.zero_()
    dS, N = run.obs_dim, run.discretizer.n_bins
    pairs = one_step_transitions(held, 400, seed=3)
    ends = [(i, e.length - 1) for i, e in enumerate(held.episodes) if e.is_terminal]
    assert ends and not set(ends) & set(pairs) and len(set(pairs)) > 100
    pairs = pairs[:8]
    terms = []
    for i, t in pairs:
        e = held.episodes[i]
        bins = run.discretizer.encode(np.concatenate([e.obs[t + 1], np.zeros(run.act_dim + 2)]))[:dS]
        terms += list(np.log(N + 1) + np.log(run.discretizer.bin_widths()[np.arange(dS), bins] / held.obs_std))
    got = transformer_one_step(flat, held, pairs)
    assert got["transitions"] == 8 and got["obs_nll_std_units"] == pytest.approx(np.mean(terms), rel=1e-6)
    assert transformer_one_step(run, held, pairs)["obs_nll_std_units"] < got["obs_nll_std_units"]


def test_decode_bins_hand_made():
    midpoints = torch.tensor([0.0, 1.0, 2.0, 10.0], dtype=torch.float64)
    inner = torch.tensor([0.5, 1.5, 6.0], dtype=torch.float64)
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64).log()
    ids, vals = decode_bins(logits, midpoints, inner, "argmax")
    assert ids.tolist() == [0] and vals.tolist() == [0.0]
    ids, vals = decode_bins(logits, midpoints, inner, "median")  # cumulative 0.4, 0.7: crosses 1/2 in bin 1
    assert ids.tolist() == [1] and vals.tolist() == [1.0]
    ids, vals = decode_bins(logits, midpoints, inner, "expectation")  # 0.3 + 0.4 + 1.0 = 1.7, in [1.5, 6)
    assert vals.tolist() == [pytest.approx(1.7)] and ids.tolist() == [2]
    with pytest.raises(ValueError, match="choose one of argmax, expectation, median"):
        decode_bins(logits, midpoints, inner, "mode")
    # Uneven bins: the expectation's bin is the one holding it, as the discretizer encodes, not the nearest midpoint.
    from trajformer.discretizer import Discretizer

    disc = Discretizer(np.array([[0.0, 1.0, 10.0]]), np.array([2]), 2)  # midpoints 0.5, 5.5
    probs = torch.tensor([[0.65, 0.35]], dtype=torch.float64)
    ids, vals = decode_bins(probs.log(), torch.as_tensor(disc.midpoints[0]), torch.tensor([1.0], dtype=torch.float64),
                            "expectation")
    assert vals.item() == pytest.approx(2.25)
    assert ids.tolist() == disc.encode(vals.numpy()[:, None])[:, 0].tolist() == [1]


def test_bad_input(tiny_config, run, hopper_dataset, tmp_path, capsys):
    held = load_heldout(run.meta["dataset_id"], run)
    longest = max(e.length for e in held.episodes)
    with pytest.raises(ValueError, match=f"--horizon {longest + 1} is longer than every held-out episode"):
        choose_starts(held, longest + 1, 2)
    other = train_ensemble(tiny_config(hopper_dataset, 'data.obs_dims="0:5"'), tmp_path / "other",
                           EnsembleConfig(members=2, hidden=8, layers=1, max_epochs=1), progress=False)
    with pytest.raises(SystemExit):
        cli.main(["predict", str(run.path), "--baseline", str(other), "--horizon", "3", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert "trajformer predict: error:" in err and "train the ensemble on the run's dataset" in err
    assert not (tmp_path / "p").exists()  # nothing written before the check
    with pytest.raises(FileNotFoundError, match="held-out slice"):
        load_heldout(str(tmp_path / "missing.npz"), run)


class HopperDims(gym.Env):
    """Hopper's observation and action dims, another env."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (11,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 11), {}

    def step(self, action):
        return self.np_random.uniform(-1, 1, 11), 0.0, False, False, {}


def held_ids(run, train: bool = False) -> list[int]:
    return run.meta["split"]["train_episodes" if train else "validation_episodes"]


def test_predict_refuses_starts_that_are_not_held_out_and_bad_slices(run, ensemble_dir, tmp_path):
    """Starts must be held out from both models (no data that shares a part with the run's, no other copy of its
    dataset, no ensemble of another env or split), a held-out slice must be clean data of the run's env, starts are
    distinct, and the output folder is checked before any work."""
    with pytest.raises(ValueError, match="shares .* with the run's training data"):
        load_heldout(f"other/data-v0+{run.meta['dataset_id']}", run)
    changed = tmp_path / "changed"
    shutil.copytree(run.path, changed)
    meta = json.loads((changed / "run.json").read_text())
    meta["provenance"]["dataset_sha256"] = "0" * 64  # a copy collected elsewhere: other float rounding, the same
    (changed / "run.json").write_text(json.dumps(meta))  # episodes
    assert len(load_heldout(run.meta["dataset_id"], load_run(changed)).episodes) == len(held_ids(run))
    meta["dataset_stats"]["episodes"] += 1  # other data under the run's dataset id
    (changed / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not the data the run was trained on"):
        load_heldout(run.meta["dataset_id"], load_run(changed))
    npz = save_heldout(run.path, tmp_path / "heldout.npz", episodes=2)
    with np.load(npz) as z:
        arrays = dict(z)
    for name, edit, message in [("nan", lambda a: a["obs"].__setitem__((0, 1, 0), np.nan), "NaN or inf in 'obs'"),
                                ("act", lambda a: a.__setitem__("act", a["act"][..., :1]), "1-dim actions"),
                                ("env", lambda a: a.__setitem__("env", np.array('{"id": "Walker2d-v5"}')),
                                 "holds Walker2d-v5 episodes")]:
        bad = {k: v.copy() for k, v in arrays.items()}
        edit(bad)
        np.savez(tmp_path / f"{name}.npz", **bad)
        with pytest.raises(ValueError, match=message):
            load_heldout(str(tmp_path / f"{name}.npz"), run)
    # A slice says which episodes it holds: one of the run's training episodes, or none recorded, is refused.
    for name, edit, message in [("trained", lambda a: a["episode_ids"].__setitem__(0, held_ids(run, train=True)[0]),
                                 r"holds episodes \[\d+\] that run .* was trained on"),
                                ("legacy", lambda a: a.pop("episode_ids"), "records no episode indices")]:
        bad = {k: v.copy() for k, v in arrays.items()}
        edit(bad)
        np.savez(tmp_path / f"{name}.npz", **bad)
        with pytest.raises(ValueError, match=message):
            load_heldout(str(tmp_path / f"{name}.npz"), run)
    (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:3000])  # a truncated copy, and an .npz of something else
    for path, message in [(tmp_path / "cut.npz", "is not a readable .npz"),
                          (run.path / "discretizer.npz", "is not a held-out slice .*lacks")]:
        with pytest.raises(ValueError, match=message):
            load_heldout(str(path), run)
    first = held_ids(run)[0]
    for key, edit, message in [
            ("env", lambda m: m.__setitem__("env", {"id": "Walker2d-v5"}), "trained on Walker2d-v5 data"),
            ("split", lambda m: m["split"]["train_episodes"].append(m["split"]["validation_episodes"].pop(0)),
             rf"holds episodes \[{first}\] that baseline .* was trained on"),  # one held-out episode trained on
            ("fewer", lambda m: m["split"].__setitem__("train_episodes", m["split"]["train_episodes"][:-3]),
             r"comes from \d+ episodes .* shares data with the \d+ episodes"),  # data.max_episodes: another list
            ("joined", lambda m: m.__setitem__("dataset_id", m["dataset_id"] + "+other/data-v0"),
             r"shares data with the \d+ episodes of .*\+other/data-v0")]:
        other = tmp_path / f"ens-{key}"
        shutil.copytree(ensemble_dir, other)
        ens_meta = json.loads((other / "ensemble.json").read_text())
        edit(ens_meta)
        (other / "ensemble.json").write_text(json.dumps(ens_meta))
        with pytest.raises(ValueError, match=message):
            predict(run.path, baseline=other, horizon=3, starts=2, samples=2, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    # Data of another env with the run's dims (Walker2d and HalfCheetah are both 17/6) is refused, not predicted.
    from trajformer.collect import collect

    gym.register("trajformer-test/HopperDims-v0", entry_point=f"{__name__}:HopperDims", max_episode_steps=20)
    collect("trajformer-test/HopperDims-v0", "random", steps=60, dataset_id="test/hopper-dims-v0", num_envs=1)
    with pytest.raises(ValueError, match="holds trajformer-test/HopperDims-v0 episodes but the run was trained in"):
        load_heldout("test/hopper-dims-v0", run)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        predict(run.path, horizon=3, starts=2, samples=2, out=tmp_path / "a-file" / "out", progress=False)
    with pytest.raises(ValueError, match="names the main results"):
        predict(run.path, horizon=3, ablations={"ensemble": str(run.path)}, progress=False)
    # Distinct starts: every (episode, t) a horizon allows, and no more.
    held = load_heldout(str(npz), run)
    horizon = min(e.length for e in held.episodes) - 1
    # A terminated episode's last observation is a stop in training, not a state: no horizon reaches it.
    room = sum(e.length - e.is_terminal - horizon + 1 for e in held.episodes)
    assert any(e.is_terminal for e in held.episodes) and room < sum(e.length - horizon + 1 for e in held.episodes)
    starts = choose_starts(held, horizon, room)
    assert len(set(starts)) == room
    assert all(t + horizon <= held.episodes[i].length - held.episodes[i].is_terminal for i, t in starts)
    with pytest.raises(ValueError, match=f"allow only {room} distinct starts"):
        choose_starts(held, horizon, room + 1)


def test_ablations_are_measured_on_the_same_starts_and_dims(run, tiny_config, hopper_dataset, tmp_path, capsys):
    """--ablation: a Markovian run (windows of 2 transitions: each next state sees the latest transition only) and a
    partially observed one (the first 5 of 11 dims),
    each rolled out teacher-forced from the run's starts; the run's own error is also reported on the partial
    run's dims (the same numbers as restricting its predictions by hand)."""
    from trajformer.train import train

    markov = train(tiny_config(hopper_dataset, "train.max_steps=60", "data.sequence_length=2"),
                   tmp_path / "markov", progress=False)
    partial = train(tiny_config(hopper_dataset, "train.max_steps=60", 'data.obs_dims="0:5"'),
                    tmp_path / "partial", progress=False)
    out = tmp_path / "pred"
    cli.main(["predict", str(run.path), "--horizon", "6", "--starts", "3", "--samples", "2", "--no-render",
              "--out", str(out), "--ablation", f"markovian={markov}", "--ablation", f"partial={partial}"])
    record = json.loads((out / "predict.json").read_text())
    ab = record["teacher_forced"]["ablations"]
    assert ab["markovian"]["context_transitions"] == 2 and ab["markovian"]["obs_dims"] == list(range(11))
    assert ab["partial"]["obs_dims"] == [0, 1, 2, 3, 4] and len(ab["partial"]["error"]["mean"]) == 6
    # The Markovian run sees the full dims: the run's "same dims" error is its own error.
    np.testing.assert_allclose(np.array(ab["markovian"]["transformer_same_dims"]["mean"], dtype=float),
                               np.array(record["teacher_forced"]["transformer"]["mean"], dtype=float), rtol=1e-9)
    held = load_heldout(run.meta["dataset_id"], run)
    starts = [(s["episode"], s["t"]) for s in record["starts"]]
    eps = [held.episodes[i] for i, _ in starts]
    acts = np.stack([e.act[t : t + 6] for e, (_, t) in zip(eps, starts, strict=True)])
    tf = rollout_transformer(run, [context_tokens(run, e, t) for e, (_, t) in zip(eps, starts, strict=True)], 6, 1,
                             actions=acts, greedy=True)
    true = np.stack([e.obs[t + 1 : t + 7, :5] for e, (_, t) in zip(eps, starts, strict=True)])
    by_hand = error_summary(normalized_error(tf["obs"][:, 0, :, :5], true, held.obs_std[:5]))["mean"]
    np.testing.assert_allclose(np.array(ab["partial"]["transformer_same_dims"]["mean"], dtype=float),
                               np.array(by_hand, dtype=float), rtol=1e-6)
    # Every decode the main run reports, for the ablations too; the run's own same-dims error under each decode is
    # its error under that decode.
    for how in ("argmax", "expectation", "median"):
        np.testing.assert_allclose(
            np.array(ab["markovian"]["decodes"][how]["transformer_same_dims"]["mean"], dtype=float),
            np.array(record["teacher_forced"]["decodes"][how]["mean"], dtype=float), rtol=1e-9)
    assert ab["partial"]["decodes"]["argmax"]["error"] == ab["partial"]["error"]
    assert "partial_error_median" in record["summary"]["1"]
    assert "partial_error" in record["summary"]["1"] and "ablation markovian" in capsys.readouterr().out
    npz = save_heldout(run.path, tmp_path / "heldout.npz", episodes=2)  # a slice of the full dims serves both
    assert load_heldout(str(npz), load_run(partial)).episodes[0].obs.shape[1] == 5
    with pytest.raises(SystemExit):  # the other way round: the ablation observes dims the run does not
        cli.main(["predict", str(partial), "--horizon", "6", "--starts", "2", "--no-render", "--out",
                  str(tmp_path / "bad"), "--ablation", f"full={run.path}"])
    assert "observes dims the run does not" in capsys.readouterr().err


def test_planner_context_holds_the_training_token_layout(run, held):
    """Driven through a held-out episode (observations given raw, with the run's selected dims in a shuffled order),
    the planner's context transitions are [s, a, r, value placeholder] as training tokenizes a transition
    (bin + dim * N): the selected observation, the executed plan's action tokens, the env's reward."""
    from trajformer.planner import load_planner
    from trajformer.tokens import VALUE_PLACEHOLDER

    planner = load_planner(run.path, ["plan.beam_width=2", "plan.n_expand=1", "plan.horizon=1"])
    dS, dA, T, N = run.obs_dim, run.act_dim, run.model.config.transition_dim, run.discretizer.n_bins
    perm = np.random.default_rng(0).permutation(dS)
    planner.obs_indices = perm  # raw[perm] is the run's observation
    episode, executed = held.episodes[0], []
    for t in range(3):
        raw = np.empty(dS)
        raw[perm] = episode.obs[t]
        planner.act(raw)
        executed.append(planner.last_plans[0].action_tokens[0])
        planner.observe(episode.rew[t])
    contexts = list(planner.contexts[0])
    assert len(contexts) == 3
    for t, tokens in enumerate(contexts):
        row = np.concatenate([episode.obs[t], np.zeros(dA), [episode.rew[t], VALUE_PLACEHOLDER]])
        expected = run.discretizer.encode(row[None])[0] + N * np.arange(T)
        expected[dS : dS + dA] = executed[t]
        assert np.array_equal(tokens.numpy(), expected)
        assert np.array_equal(tokens.numpy() // N, np.arange(T))  # each token in its own dimension's range
