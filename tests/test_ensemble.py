"""The PETS-style ensemble: it learns (held-out NLL falls and beats a constant prediction), its disagreement
grows off the data, its directory round-trips, and bad input fails with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trajformer import cli
from trajformer.config import EnsembleConfig
from trajformer.data import load_episodes, split_episodes
from trajformer.ensemble import GaussianEnsemble, gaussian_nll, load_ensemble, train_ensemble, transitions
from trajformer.run import read_metrics

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml")


@pytest.fixture(scope="module")
def split_data(tiny_config, hopper_dataset):
    cfg = tiny_config(hopper_dataset)
    data = load_episodes(hopper_dataset, cfg.data)
    train_idx, val_idx = split_episodes(len(data.episodes), cfg.data.validation_fraction, cfg.train.seed)
    return data, train_idx, val_idx


def test_nll_falls_and_beats_constant_prediction(ensemble_dir, split_data):
    rows = read_metrics(ensemble_dir / "metrics.jsonl")
    meta = json.loads((ensemble_dir / "ensemble.json").read_text())
    assert meta["validation"]["val_nll"] < rows[0]["val_nll"] - 0.3  # held-out NLL fell from the untrained net
    data, train_idx, val_idx = split_data
    assert meta["split"]["validation_episodes"] == val_idx.tolist()  # the transformer's split
    x_tr, y_tr, _ = transitions([data.episodes[i] for i in train_idx])
    _, y_va, _ = transitions([data.episodes[i] for i in val_idx])
    # Constant prediction: the training targets' mean and variance, scored on held-out targets.
    mean, std = y_tr.mean(0), np.where(y_tr.std(0) < 1e-6, 1.0, y_tr.std(0))
    constant = float(gaussian_nll(torch.zeros(1), torch.zeros(1), torch.as_tensor((y_va - mean) / std)).mean())
    assert meta["validation"]["val_nll"] < constant - 0.5
    assert meta["validation"]["val_one_step_error"] < 0.5
    assert meta["training"]["epochs"] >= 1 and meta["training"]["seconds"] > 0


def test_the_kept_weights_are_one_epoch_of_the_whole_ensemble(hopper_dataset, tiny_config, tmp_path, monkeypatch):
    """The saved ensemble is the epoch with the best mean validation NLL, every tensor of it: here epoch 2, though
    member 0 alone is best at epoch 3. (Each member's own best epoch beside the shared log-variance bounds of
    another epoch is a model that no epoch had.)"""
    from trajformer import ensemble as ensemble_module

    scripted = iter([[1.0, 1.0], [0.5, 0.7], [0.4, 0.9], [0.9, 0.9]])  # epochs 1-4; the mean is best at 2
    states = []
    real = ensemble_module.validation_metrics

    def scripted_metrics(model, *args, **kwargs):
        row = real(model, *args, **kwargs)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        if len(states) in (1, 6):  # before training, and the kept weights at the end
            return row
        members = next(scripted)
        return {**row, "val_nll": sum(members) / 2, "val_nll_members": members}

    monkeypatch.setattr(ensemble_module, "validation_metrics", scripted_metrics)
    small = EnsembleConfig(members=2, hidden=16, layers=1, max_epochs=4, patience=10, batch_size=64)
    out = train_ensemble(tiny_config(hopper_dataset), tmp_path / "e", small, progress=False)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], states[2][k]) for k in saved)  # states[0] is before training
    assert not all(torch.equal(saved[k], states[3][k]) for k in saved)


def test_disagreement_larger_off_the_data(ensemble_dir, split_data):
    ens = load_ensemble(ensemble_dir)
    data, train_idx, _ = split_data
    x, _, _ = transitions([data.episodes[i] for i in train_idx])
    obs, act = x[:500, : data.obs_dim], x[:500, data.obs_dim :]
    inside = ens.disagreement(obs, act)
    outside = ens.disagreement(obs, 10.0 * np.sign(act + 1e-9))  # actions far outside the data's [-1, 1]
    assert inside.shape == (500,)
    assert np.median(outside) > 3 * np.median(inside)


def test_round_trip_and_prediction_shapes(ensemble_dir, split_data):
    ens = load_ensemble(ensemble_dir)
    data, _, val_idx = split_data
    x, _, nxt = transitions([data.episodes[val_idx[0]]])
    obs, act = torch.as_tensor(x[:, : data.obs_dim]).float(), torch.as_tensor(x[:, data.obs_dim :]).float()
    mean, std = ens.model.predict(obs, act)
    assert mean.shape == std.shape == (3, len(x), data.obs_dim + 1)
    assert torch.all(std > 0)
    assert np.abs(mean.mean(0)[:, : data.obs_dim].numpy() - nxt).mean() < np.abs(x[:, : data.obs_dim] - nxt).mean()


def test_cli_and_bad_input(hopper_dataset, tmp_path, capsys, ensemble_dir):
    out = tmp_path / "cli-ens"
    cli.main(["train-ensemble", QUICKSTART, "--dataset", hopper_dataset, "--out", str(out),
              "--members", "2", "--hidden", "16", "--layers", "1", "--max-epochs", "1"])
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["ensemble"]["members"] == 2 and meta["training"]["epochs"] == 1
    with pytest.raises(SystemExit):  # the directory already holds an ensemble
        cli.main(["train-ensemble", QUICKSTART, "--dataset", hopper_dataset, "--out", str(out)])
    assert "already holds an ensemble" in capsys.readouterr().err
    run_dir = tmp_path / "a-run"  # a transformer run's weights and log are not overwritten
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit):
        cli.main(["train-ensemble", QUICKSTART, "--dataset", hopper_dataset, "--out", str(run_dir)])
    assert "already holds model.pt, metrics.jsonl" in capsys.readouterr().err
    assert (run_dir / "model.pt").read_bytes() == b"weights"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(SystemExit):
        cli.main(["train-ensemble", QUICKSTART, "--dataset", hopper_dataset, "--out",
                  str(tmp_path / "x"), "--members", "0"])
    assert "members must be >= 1" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not an ensemble directory"):
        load_ensemble(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ensemble.json").write_text((ensemble_dir / "ensemble.json").read_text())
    (tmp_path / "broken" / "model.pt").write_bytes((out / "model.pt").read_bytes())  # other sizes
    with pytest.raises(ValueError, match="does not fit ensemble.json"):
        load_ensemble(tmp_path / "broken")


def test_a_stopped_ensemble_training_is_started_over_by_the_same_command(hopper_dataset, tmp_path, capsys,
                                                                         monkeypatch):
    """Ctrl-C or kill mid-training leaves the ensemble's metrics.jsonl and no ensemble.json: running the command
    again trains it anew (it used to refuse its own leftovers as 'a run directory')."""
    import trajformer.ensemble as ens_module

    out, real, calls = tmp_path / "stopped", ens_module.validation_metrics, []

    def stop_after_first_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 0 is logged; stopped during epoch 1's validation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ens_module, "validation_metrics", stop_after_first_epoch)
    argv = ["train-ensemble", QUICKSTART, "--dataset", hopper_dataset, "--out", str(out), "--members", "2",
            "--hidden", "16", "--layers", "1", "--max-epochs", "2"]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 130 and not (out / "ensemble.json").exists() and (out / "metrics.jsonl").is_file()
    (out / ".model.pt.k1ll3d.tmp.pt").write_bytes(b"PK")  # what a write killed outright (SIGKILL) leaves
    capsys.readouterr()
    other = tmp_path / "not-ours"  # a log of another kind beside weights: not the ensemble's, kept
    other.mkdir()
    (other / "metrics.jsonl").write_text("\n" + (out / "metrics.jsonl").read_text())
    (other / "model.pt").write_bytes(b"weights")
    with pytest.raises(SystemExit):
        cli.main([str(other) if arg == str(out) else arg for arg in argv])
    assert "already holds model.pt, metrics.jsonl" in capsys.readouterr().err and (other / "model.pt").is_file()
    cli.main(argv)
    assert "training it again" in capsys.readouterr().out and not (out / ".model.pt.k1ll3d.tmp.pt").exists()
    assert json.loads((out / "ensemble.json").read_text())["training"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_ensemble_rollout_feeds_each_step_its_own_prediction(ensemble_dir, split_data):
    """rollout_ensemble without sampling: step 1 is the members' mean prediction from the start, step 2 the mean
    prediction from step 1's state; sampled rollouts follow their seed."""
    from trajformer.predict import rollout_ensemble

    ens = load_ensemble(ensemble_dir)
    data, _, val_idx = split_data
    ep = data.episodes[val_idx[0]]
    start, actions = ep.obs[:1], ep.act[None, None, :2]  # K=1 start, M=1, H=2
    out = rollout_ensemble(ens, start, actions)
    with torch.no_grad():
        first = ens.model.predict(torch.as_tensor(start).float(), torch.as_tensor(actions[0, :, 0]).float())[0].mean(0)
        s1 = first[:, : data.obs_dim]
        second = ens.model.predict(s1, torch.as_tensor(actions[0, :, 1]).float())[0].mean(0)
    np.testing.assert_allclose(out["obs"][0, 0, 0], s1[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["rew"][0, 0], [first[0, -1].item(), second[0, -1].item()], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["obs"][0, 0, 1], second[0, : data.obs_dim].numpy(), rtol=1e-5, atol=1e-6)
    a, b = (rollout_ensemble(ens, start, np.repeat(actions, 4, 1), sample=True, seed=s)["obs"] for s in (1, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0, 0], a[0, 1])  # samples differ between rows


def test_each_member_keeps_its_own_bootstrap_resample(hopper_dataset, tiny_config, tmp_path, monkeypatch):
    """A member sees the same resample (about 63% of the distinct rows) every epoch, reshuffled: over 4 epochs it
    still sees well under 70% of the training rows (a resample drawn anew each epoch would show it ~98%)."""
    seen: list[torch.Tensor] = []
    forward = GaussianEnsemble.forward_normalized

    def recording(self, x):
        if x.shape[1] == 64:  # a training batch (validation passes all 369 validation rows at once)
            seen.append(x.detach().clone())
        return forward(self, x)

    monkeypatch.setattr(GaussianEnsemble, "forward_normalized", recording)
    small = EnsembleConfig(members=2, hidden=16, layers=1, max_epochs=4, patience=10, batch_size=64)
    train_ensemble(tiny_config(hopper_dataset), tmp_path / "e", small, progress=False)
    rows = torch.cat(seen, dim=1)  # (members, every row each member trained on, input dims)
    n = rows.shape[1] // 4  # the training rows, less the partial batch each epoch drops (< 64 of ~2600)
    distinct = [len(torch.unique(member, dim=0)) for member in rows]
    assert all(d < 0.7 * n for d in distinct) and all(d > 0.55 * n for d in distinct), (distinct, n)
    assert not torch.equal(rows[0], rows[1])


def test_validation_metrics_match_the_mixture_density_of_next_states():
    """val_obs_nll_std_units is -log of the members' equal mixture of Gaussians over s' / std (s' = s + Δs), per
    obs dim, and val_one_step_error the RMS over dims of (mean of the members' s' - s') / std: computed here in
    numpy from the members' predictions in raw units."""
    from trajformer.ensemble import validation_metrics

    rng = np.random.default_rng(0)
    dS, dA, n = 3, 2, 50
    torch.manual_seed(0)
    model = GaussianEnsemble(dS, dA, members=2, hidden=8, layers=1)
    inputs, targets = rng.normal(size=(n, dS + dA)), rng.normal(size=(n, dS + 1)) * [2.0, 0.5, 1.0, 3.0]
    model.set_normalization(rng.normal(size=(100, dS + dA)), rng.normal(1.0, 2.0, size=(100, dS + 1)))
    std = np.array([0.5, 2.0, 1.5])
    got = validation_metrics(model.eval(), inputs, targets, std)

    with torch.no_grad():
        mean, logvar = model.forward_normalized(torch.as_tensor(inputs, dtype=torch.float32).expand(2, -1, -1))
    out_mean, out_std = model.out_mean.double().numpy(), model.out_std.double().numpy()
    mu = (mean.double().numpy() * out_std + out_mean)[..., :dS] + inputs[:, :dS]  # members' s' (2, n, dS)
    sd = (np.exp(0.5 * logvar.double().numpy()) * out_std)[..., :dS]
    true = (inputs[:, :dS] + targets[:, :dS]) / std
    log_pdf = -0.5 * ((true - mu / std) / (sd / std)) ** 2 - np.log(sd / std) - 0.5 * np.log(2 * np.pi)
    mixture = np.log(np.exp(log_pdf.sum(-1)).mean(0))
    assert got["val_obs_nll_std_units"] == pytest.approx(-mixture.mean() / dS, rel=1e-4)
    error = np.sqrt((((mu.mean(0) / std) - true) ** 2).mean(-1)).mean()
    assert got["val_one_step_error"] == pytest.approx(error, rel=1e-4)
