"""Per-dimension discretizer of joined [s, a, r, V] vectors (DESIGN.md §2).

Each column has its own sorted, deduplicated bin edges; a column may have fewer than N real bins
(constant columns, heavy atoms, little data). Bin ids past a column's last real bin decode to that last
bin, and values outside the edges clip into the first or last bin, so encode/decode never fail.
"""

from __future__ import annotations

import math

import numpy as np


def _atom_width(value: float) -> float:
    return 1e-6 * max(abs(value), 1.0)


def _quantile_edges(column: np.ndarray, n_bins: int) -> np.ndarray:
    """Official quantile edges (every ceil(n/N)-th sorted value, plus the max) of a sorted column, deduplicated.

    A repeated minimum or maximum (the -100 termination penalty, actions saturated at their bounds) is an
    atom: it gets a narrow bin of its own, so it decodes to itself instead of the midpoint of a bin that
    spans the gap to ordinary values. Each such atom costs two bins (the atom and the empty gap after it).
    """
    lo, hi = column[0], column[-1]
    lo_atom = len(column) > 1 and column[1] == lo < hi
    hi_atom = len(column) > 1 and column[-2] == hi > lo
    hi_atom = hi_atom and n_bins - 2 * lo_atom >= 3  # keep at least one ordinary bin
    lo_atom = lo_atom and n_bins - 2 * hi_atom >= 3
    keep = np.ones(len(column), dtype=bool)
    if lo_atom:
        keep &= column > lo
    if hi_atom:
        keep &= column < hi
    rest = column[keep]
    budget = n_bins - 2 * lo_atom - 2 * hi_atom
    edges = [lo, hi]
    if len(rest) and budget >= 1:
        step = math.ceil(len(rest) / budget)
        edges += [*rest[::step], rest[-1]]
    if lo_atom and lo + _atom_width(lo) < edges[2 if len(edges) > 2 else 1]:
        edges.append(lo + _atom_width(lo))
    if hi_atom and hi - _atom_width(hi) > max(edges[2:] or [lo]):
        edges.append(hi - _atom_width(hi))
    return np.unique(edges)


class Discretizer:
    """Edges per column: `edges[d, :n_real[d] + 1]` are the real edges of column d (the rest padding)."""

    def __init__(self, edges: np.ndarray, n_real: np.ndarray, n_bins: int):
        self.edges = np.asarray(edges, dtype=np.float64)
        self.n_real = np.asarray(n_real, dtype=np.int64)
        self.n_bins = int(n_bins)
        dim = len(self.n_real)
        if self.edges.shape != (dim, self.n_bins + 1):
            raise ValueError(f"discretizer edges have shape {self.edges.shape}, expected {(dim, self.n_bins + 1)}")
        if np.any(self.n_real < 1) or np.any(self.n_real > self.n_bins):
            raise ValueError(f"discretizer n_real must lie in 1..{self.n_bins}, got {self.n_real.min()}.."
                             f"{self.n_real.max()}")
        for d in range(dim):
            real = self.edges[d, : self.n_real[d] + 1]
            if not (np.all(np.isfinite(real)) and np.all(np.diff(real) > 0)):
                raise ValueError(f"discretizer column {d}: its real edges are not finite and increasing")
        # Midpoint of every bin id 0..N-1 per column, ids past the last real bin mapped to it.
        ids = np.minimum(np.arange(self.n_bins)[None, :], self.n_real[:, None] - 1)
        lo = np.take_along_axis(self.edges, ids, axis=1)
        hi = np.take_along_axis(self.edges, ids + 1, axis=1)
        mid = (lo + hi) / 2.0
        # A bin one float wide (subnormal or adjacent edges) can round its midpoint onto its upper edge, which
        # encodes into the next bin; its lower edge belongs to it, so it decodes there instead.
        self.midpoints = np.where(mid < hi, mid, lo)

    @property
    def dim(self) -> int:
        return len(self.n_real)

    @classmethod
    def fit(cls, data: np.ndarray, n_bins: int, kind: str = "quantile", quantile_columns=()) -> Discretizer:
        """Fit edges per column of `data` (n, dim); `quantile_columns` use quantile bins whatever `kind` is."""
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"cannot fit a discretizer on data of shape {data.shape}; need (n > 0, dim)")
        if not np.all(np.isfinite(data)):
            raise ValueError("cannot fit a discretizer on data with NaN or inf; clean the dataset first")
        dim = data.shape[1]
        edges = np.zeros((dim, n_bins + 1))
        n_real = np.zeros(dim, dtype=np.int64)
        for d in range(dim):
            column = np.sort(data[:, d])
            if kind == "quantile" or d in quantile_columns:
                col_edges = _quantile_edges(column, n_bins)
            elif kind == "uniform":
                col_edges = np.unique(np.linspace(column[0], column[-1], n_bins + 1))
            else:
                raise ValueError(f"unknown discretizer kind {kind!r}; choose quantile or uniform")
            if len(col_edges) == 1:  # constant column: one narrow bin around the constant
                col_edges = np.array([col_edges[0], col_edges[0] + _atom_width(col_edges[0])])
            n_real[d] = len(col_edges) - 1
            edges[d, : len(col_edges)] = col_edges
            edges[d, len(col_edges) :] = col_edges[-1]
        return cls(edges, n_real, n_bins)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Bin ids (..., dim) of values (..., dim): the bin containing x, clipped to the real bins."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(f"encode got vectors of dim {x.shape[-1]}, the discretizer has {self.dim}")
        flat = x.reshape(-1, self.dim)
        if np.isnan(flat).any():  # searchsorted would put NaN in the last bin: a plausible token for garbage
            bad = sorted(set(np.nonzero(np.isnan(flat))[1].tolist()))
            raise ValueError(f"NaN to encode in dims {bad[:8]}; the env or data gave NaN (an unstable simulation?)")
        out = np.empty(flat.shape, dtype=np.int64)
        for d in range(self.dim):
            inner = self.edges[d, 1 : self.n_real[d]]  # interior edges
            out[:, d] = np.searchsorted(inner, flat[:, d], side="right")
        return out.reshape(x.shape)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Bin midpoints (..., dim) of bin ids (..., dim); ids past a column's last bin clip to it."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[-1] != self.dim:
            raise ValueError(f"decode got ids of dim {ids.shape[-1]}, the discretizer has {self.dim}")
        ids = np.clip(ids, 0, self.n_bins - 1)
        return self.midpoints[np.arange(self.dim), ids]

    def bin_widths(self) -> np.ndarray:
        """(dim, N) widths of each bin id (the clipped bins repeat the last real one)."""
        ids = np.minimum(np.arange(self.n_bins)[None, :], self.n_real[:, None] - 1)
        return np.take_along_axis(self.edges, ids + 1, axis=1) - np.take_along_axis(self.edges, ids, axis=1)

    def reconstruction_error(self, data: np.ndarray) -> np.ndarray:
        """Mean absolute error per column of decode(encode(data))."""
        return np.abs(self.decode(self.encode(data)) - data).mean(axis=0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays for `np.savez` (loaded back without pickle)."""
        return {"edges": self.edges, "n_real": self.n_real, "n_bins": np.array(self.n_bins)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Discretizer:
        return cls(state["edges"], state["n_real"], int(state["n_bins"]))
