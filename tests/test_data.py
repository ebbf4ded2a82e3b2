"""Values, terminal penalty, episode split and token windows against hand-worked cases."""

import numpy as np
import pytest
import torch

from trajformer.config import DataConfig
from trajformer.data import (
    Episode,
    describe_split,
    joined_transitions,
    same_split,
    select_obs,
    split_episodes,
    split_record,
    values_to_go,
)
from trajformer.tokens import TokenWindows, loss_weights


def _episode(rewards, terminal: bool, obs_dim=2, act_dim=1) -> Episode:
    T = len(rewards)
    term = np.zeros(T, bool)
    trunc = np.zeros(T, bool)
    (term if terminal else trunc)[-1] = True
    obs = np.arange((T + 1) * obs_dim, dtype=float).reshape(T + 1, obs_dim)
    return Episode(obs, np.full((T, act_dim), 0.5), np.asarray(rewards, float), term, trunc)


def test_values_exclude_current_reward_and_penalty_replaces_last_reward():
    ep = _episode([1.0, 2.0, 3.0], terminal=True)
    joined = joined_transitions(ep, DataConfig(discount=0.5, termination_penalty=-100.0))
    # r = [1, 2, -100]; V_t = r_{t+1} + 0.5 r_{t+2} + ...
    assert joined[:, 3].tolist() == [1.0, 2.0, -100.0]
    assert joined[:, 4].tolist() == [2.0 + 0.5 * -100.0, -100.0, 0.0]
    assert np.array_equal(joined[:, :2], ep.obs[:-1])
    # Truncation is not a termination: the last reward stays.
    joined = joined_transitions(_episode([1.0, 2.0, 3.0], terminal=False), DataConfig(discount=0.5))
    assert joined[:, 3].tolist() == [1.0, 2.0, 3.0]
    assert values_to_go(np.array([1.0, 1.0, 1.0, 1.0]), 1.0).tolist() == [3.0, 2.0, 1.0, 0.0]


def test_windows_stop_tokens_after_termination_and_masked_padding_after_truncation():
    n_bins, L = 4, 3
    terminal, truncated = _episode([1.0, 2.0], True), _episode([1.0, 2.0], False)
    bins = [np.array([[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]])] * 2  # (T=2 transitions, 5 dims)
    windows = TokenWindows(bins, [terminal.is_terminal, truncated.is_terminal], n_bins, L)
    assert len(windows) == 4  # a window starts at every transition
    stop = n_bins * 5
    offsets = np.arange(5) * n_bins
    x, y, mask = windows.batch(torch.tensor([1, 3]))
    assert x.shape == y.shape == mask.shape == (2, L * 5 - 1)
    # Terminal episode, window at its last transition: [t1, stop x5, stop x5]; all targets learned.
    assert x[0, :5].tolist() == (bins[0][1] + offsets).tolist()
    assert (x[0, 5:] == stop).all()
    assert (y[0, 4:] == n_bins).all() and y[0, :4].tolist() == bins[0][1][1:].tolist()
    assert (mask[0] == 1).all()
    # Truncated episode: the same window, but padding after the time limit is masked out of the loss.
    assert (mask[1, :4] == 1).all() and (mask[1, 4:] == 0).all()
    # Targets are local class ids aligned with the mask: Y[p] is the token of dimension (p + 1) mod T.
    x0, y0, _ = windows.batch(torch.tensor([0]))
    assert y0[0, :9].tolist() == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert x0[0, 1:10].tolist() == (y0[0, :9] + windows.target_slot[:9] * n_bins).tolist()


def test_loss_weights_follow_target_dimension():
    w = loss_weights(obs_dim=2, act_dim=1, sequence_length=2, action_weight=5, reward_weight=1, value_weight=2)
    # Target positions p = 0..8 predict dims (p + 1) mod 5 = 1, 2(act), 3(r), 4(V), 0, 1, 2(act), 3, 4.
    assert w.tolist() == [1, 5, 1, 2, 1, 1, 5, 1, 2]


def test_split_is_seeded_and_disjoint():
    a = split_episodes(20, 0.2, seed=3)
    b = split_episodes(20, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(a[1]) == 4 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 20
    assert not np.array_equal(split_episodes(20, 0.2, seed=4)[1], a[1])


def test_split_records_compare_by_lists_or_by_the_counts_of_older_records():
    rec = split_record(20, 0.2, seed=3)
    assert rec["validation_episodes"] == split_episodes(20, 0.2, seed=3)[1].tolist()
    assert same_split(rec, split_record(20, 0.2, seed=3))
    assert not same_split(rec, split_record(20, 0.2, seed=4))  # same counts, other episodes
    assert not same_split(rec, split_record(21, 0.2, seed=3)) and not same_split(rec, split_record(20, 0.1, seed=3))
    old_bc = {"seed": 3, "validation_fraction": 0.2, "train_episodes": 16, "validation_episodes": 4}
    old_iql = {"seed": 3, "validation_fraction": 0.2, "train_episodes": 16}  # no validation count recorded
    assert same_split(old_bc, rec) and same_split(rec, old_iql)
    assert not same_split({**old_bc, "train_episodes": 17}, rec) and not same_split({**old_iql, "seed": 4}, rec)
    assert describe_split(rec) == describe_split(old_bc) == "seed 3, validation fraction 0.2, 16 + 4 episodes"


def test_obs_selection():
    assert select_obs("0:3", 5).tolist() == [0, 1, 2]
    assert select_obs([], 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"out of range for 5-dim"):
        select_obs([0, 7], 5)
    with pytest.raises(ValueError, match=r"out of range for 5-dim"):
        select_obs("0:45", 5)
    assert select_obs("-2:", 5).tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"out of range for 5-dim"):
        select_obs("-50:", 5)  # Python would clamp it to every dim


def test_prefix_reference_past_the_time_limit_is_the_complete_episodes():
    """Episodes cut at more steps than the env's time limit are whole episodes: their reference is the mean over
    the episodes that reach the limit or terminate before, not over the terminated ones alone."""
    from trajformer.data import OfflineData, prefix_return_mean

    def episode(length: int, terminal: bool) -> Episode:
        end, never = np.arange(length) == length - 1, np.zeros(length, dtype=bool)
        return Episode(np.zeros((length + 1, 1)), np.zeros((length, 1)), np.ones(length),
                       end if terminal else never, never if terminal else end)

    data = OfflineData("test/x-v0", [episode(50, False), episode(20, True), episode(30, False)], np.arange(1), 1,
                       env_spec={"id": "X-v0", "max_episode_steps": 50})
    assert prefix_return_mean(data, 10) == 10.0  # every episode reaches 10 steps
    assert prefix_return_mean(data, 80) == prefix_return_mean(data, 50) == 35.0  # the 50-step one and the fallen one
