"""Discretizer: bins contain their values, round trips, atoms (constants, the -100 penalty), uniform trap."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trajformer.discretizer import Discretizer

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


def _check_contains(disc: Discretizer, data: np.ndarray) -> None:
    ids = disc.encode(data)
    cols = np.arange(disc.dim)
    assert (ids >= 0).all() and (ids < disc.n_real).all()
    lo, hi = disc.edges[cols, ids], disc.edges[cols, ids + 1]
    # Every in-range value lies in its bin (the last bin is closed) ...
    assert ((data >= lo) & (data <= hi)).all()
    # ... so its reconstruction error is at most half that bin's width.
    assert (np.abs(disc.decode(ids) - data) <= (hi - lo) / 2 + 1e-9 * np.maximum(1, np.abs(data))).all()


def _check_round_trip(disc: Discretizer) -> None:
    reachable = np.stack([np.minimum(np.arange(disc.n_bins), n - 1) for n in disc.n_real], axis=1)
    assert (disc.encode(disc.decode(reachable)) == reachable).all()


@settings(max_examples=60, deadline=None)
@given(data=arrays(np.float64, st.tuples(st.integers(1, 300), st.integers(1, 4)), elements=finite),
       n_bins=st.integers(2, 40), kind=st.sampled_from(["quantile", "uniform"]))
@example(data=np.array([[-5e-324], [1.0], [0.0], [0.0]]), n_bins=2, kind="quantile")  # midpoint rounds onto 0
@example(data=np.array([[1 + 2**-52], [1 + 2**-51], [1 + 2**-51], [5.0]]), n_bins=2, kind="quantile")  # one ulp wide
def test_values_fall_in_their_bins_and_bins_round_trip(data, n_bins, kind):
    disc = Discretizer.fit(data, n_bins, kind)
    _check_contains(disc, data)
    _check_round_trip(disc)


def test_constant_column_and_out_of_range_values_clip():
    data = np.column_stack([np.full(50, 3.0), np.linspace(0, 1, 50)])
    disc = Discretizer.fit(data, 10)
    assert disc.n_real[0] == 1
    assert np.allclose(disc.decode(disc.encode(data))[:, 0], 3.0, atol=1e-5)
    # The planner's value placeholder (1e6) and values below the data clip to the last/first real bin.
    assert (disc.encode(np.array([[1e6, 1e6], [-1e6, -1e6]])) == [[0, 9], [0, 0]]).all()
    # Bin ids past a column's last real bin decode like the last real bin.
    assert disc.decode(np.array([[7, 9]]))[0, 0] == disc.decode(np.array([[0, 9]]))[0, 0]


@pytest.mark.parametrize("kind", ["quantile", "uniform"])
def test_termination_penalty_gets_its_own_bin_and_spares_ordinary_rewards(kind):
    rng = np.random.default_rng(0)
    reward = rng.uniform(0.5, 3.5, 5000)
    reward[:40] = -100.0  # terminal penalty on 0.8% of transitions
    data = np.column_stack([rng.normal(size=5000), reward])
    disc = Discretizer.fit(data, 100, kind, quantile_columns=(1,))
    decoded = disc.decode(disc.encode(data))
    # The penalty decodes to itself, not to the middle of a wide bin reaching into ordinary rewards.
    assert np.allclose(decoded[:40, 1], -100.0, atol=1e-3)
    # Ordinary rewards keep ~all the bins: error well under 1% of their range.
    assert np.abs(decoded[40:, 1] - reward[40:]).max() < 0.05
    assert len(np.unique(disc.encode(data)[40:, 1])) >= 90


def test_uniform_reward_column_without_quantile_would_collapse():
    """The trap the quantile override avoids: uniform bins stretched by the penalty."""
    reward = np.r_[np.full(40, -100.0), np.random.default_rng(0).uniform(0.5, 3.5, 5000)]
    disc = Discretizer.fit(reward[:, None], 100, "uniform")
    assert len(np.unique(disc.encode(reward[40:, None]))) <= 4


def test_state_dict_round_trip():
    data = np.random.default_rng(1).normal(size=(200, 3))
    disc = Discretizer.fit(data, 16)
    again = Discretizer.from_state_dict(disc.state_dict())
    assert (again.encode(data) == disc.encode(data)).all()
    assert np.array_equal(again.midpoints, disc.midpoints)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        Discretizer.fit(np.array([[0.0], [np.nan]]), 4)
    disc = Discretizer.fit(np.zeros((5, 2)), 4)
    with pytest.raises(ValueError, match="dim 3"):
        disc.encode(np.zeros((1, 3)))


def test_nan_is_refused_not_binned():
    """NaN (an unstable simulation) is an error, not the last bin's token."""
    disc = Discretizer.fit(np.random.default_rng(0).normal(size=(200, 2)), 10)
    with pytest.raises(ValueError, match=r"NaN to encode in dims \[1\]"):
        disc.encode(np.array([[0.0, np.nan]]))
