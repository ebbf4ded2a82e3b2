"""Next-token decoding over a GPT, shared by the planner and long-horizon prediction (DESIGN.md §5, §5b).

Two decoders produce next-token logits for rows of token sequences: `CachedDecoder` (incremental over a KV
cache: an absolute model re-encodes its window only when the official sliding window drops a transition from
its front, sharing the encode of rows' common first tokens; a window model's cache drops its oldest keys and
never re-encodes) and `ReferenceDecoder` (the official algorithm: one GPT.forward over each row's cropped
window per generated token), which the tests and the benchmark compare. A window model's search may start from
`CarriedCache`s (each env's executed transitions encoded once, across env steps) instead of encoding prefixes. Rows are
env-major, with the same number per env, and env k draws from its own torch.Generator, so a batch of envs decodes
as the envs would alone.
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading

import torch

from trajformer.model import GPT, KVCache


def crop_start(length: int, window: int | None, transition_dim: int) -> int:
    """Official sliding window: how many tokens to drop from the front (whole transitions) to fit `window`
    (None: no crop, as for window models, whose attention band bounds what each query sees)."""
    if window is None:
        return 0
    excess = max(0, length - window)
    return -(-excess // transition_dim) * transition_dim


def exp_noise(rows: int, classes: int, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """Exp(1) noise (len(generators) * rows, classes) for one draw per row, env k's rows from generators[k]."""
    return torch.cat([torch.empty(rows, classes, dtype=dtype).exponential_(generator=g) for g in generators])


class NoiseAhead:
    """The noise of a search's draws, drawn ahead by a background thread: for each draw in `shapes` (rows per
    env, classes), in order, exactly the numbers `draw_per_env` would draw at that step (one long draw from a
    generator equals the same draws made one by one), pinned for an asynchronous copy to the GPU. A GPU search
    then never waits for the host's ~30 ns per exponential (0.7 s a walker2d 10-env search). The search must
    make exactly these draws and `close` it, which leaves the generators where drawing step by step would."""

    def __init__(self, shapes: list[tuple[int, int]], generators: list[torch.Generator], dtype: torch.dtype,
                 pin: bool):
        self._queue: queue.Queue = queue.Queue()

        def draw() -> None:
            for rows, classes in shapes:
                noise = exp_noise(rows, classes, generators, dtype)
                self._queue.put(noise.pin_memory() if pin else noise)

        self._thread = threading.Thread(target=draw, daemon=True)
        self._thread.start()

    def next(self, rows: int, classes: int) -> torch.Tensor:
        noise = self._queue.get()
        if noise.shape != (rows, classes):
            raise RuntimeError(f"noise drawn ahead for {tuple(noise.shape)}, asked for {(rows, classes)}")
        return noise

    def close(self) -> None:
        """Check that the search took every draw (the generators are then where step-by-step drawing leaves them)."""
        self._thread.join()
        if not self._queue.empty():
            raise RuntimeError(f"{self._queue.qsize()} draws were drawn ahead but not taken")


def draw_per_env(probs: torch.Tensor, generators: list[torch.Generator], ahead: NoiseAhead | None = None
                 ) -> torch.Tensor:
    """One categorical draw per row; env k's equal block of rows uses only generators[k] (CPU generators).

    torch.multinomial's own single-draw algorithm (argmax of probs / q with q ~ Exp(1), drawn with the env's
    generator), bit for bit, including each generator's state after the draw. The noise is drawn on the CPU
    (here, or ahead by `ahead`) and moved to wherever `probs` are, so a search on a GPU draws from the same
    streams as on the CPU without bringing probabilities back to the host."""
    if ahead is not None:
        noise = ahead.next(*probs.shape)
    else:
        noise = exp_noise(len(probs) // len(generators), probs.shape[-1], generators, probs.dtype)
        if probs.device.type == "cuda":
            noise = noise.pin_memory()  # so the copy is asynchronous: the host does not wait for the card's queue
    return (probs / noise.to(probs.device, non_blocking=True)).argmax(-1)


class ReferenceDecoder:
    """Next-token logits by one GPT.forward over each env's cropped window per token (uncached, official).
    An absolute model's window is cropped to `window` tokens; a window model's sequence is never cropped.

    Rows are env-major with the same number per env; `generated` holds every row's tokens after its prefix.
    Prefixes, tokens and logits live on the model's device, so a search on a GPU stays there.
    """

    def __init__(self, model: GPT, window: int):
        self.model = model
        self.window = window
        cfg = model.config
        self.crop = window if cfg.attention == "absolute" else None
        self.transition_dim = cfg.transition_dim
        # A window model's last token depends on the n_layer x (band - 1) tokens before it and no others: `logits`
        # runs the forward over the whole transitions that hold them (exact: rotary positions are relative), so a
        # long episode's reference costs what its receptive field does.
        self.reach = None if self.crop is not None else cfg.n_layer * (cfg.window - 1) + 1

    def start(self, prefixes: list[torch.Tensor], max_rows: int, carried: list[CarriedCache] | None = None) -> None:
        """Begin a search with one row per env holding its prefix (ids, starting at a transition boundary). With
        `carried` (a cached window model's), env k's prefix is only its current observation and carried[k] holds
        the episode's executed transitions before it, encoded."""
        if carried is not None:
            raise ValueError("the reference decoder takes each env's whole episode as its prefix, not a carried cache")
        self.prefixes = [p.to(self.device) for p in prefixes]
        self.generated = torch.zeros(len(prefixes), 0, dtype=torch.long, device=self.device)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (expansion and re-ranking)."""
        self.generated = self.generated[index.to(self.device)]

    def append(self, tokens: torch.Tensor) -> None:
        """Append one token (rows,) to every row."""
        self.generated = torch.cat([self.generated, tokens[:, None].to(self.device)], dim=1)

    def next_slot(self) -> int | None:
        """The head slot every row's next token comes from (its last token's position mod T: prefixes start at
        a transition boundary and rows generate in step), or None if the envs' prefixes disagree on it."""
        n = self.generated.shape[1]
        slots = {(len(p) + n - 1) % self.transition_dim for p in self.prefixes}
        return slots.pop() if len(slots) == 1 else None

    def crop_starts(self) -> list[int]:
        """Per env, the first sequence position inside the current window."""
        n = self.generated.shape[1]
        return [crop_start(len(p) + n, self.crop, self.transition_dim) for p in self.prefixes]

    def windows(self) -> list[torch.Tensor]:
        """Per env, its rows' current windows (rows_per_env, length)."""
        rows = len(self.generated) // len(self.prefixes)
        out = []
        for k, (prefix, start) in enumerate(zip(self.prefixes, self.crop_starts(), strict=True)):
            seq = torch.cat([prefix.expand(rows, -1), self.generated[k * rows : (k + 1) * rows]], dim=1)
            out.append(seq[:, start:])
        return out

    @property
    def device(self) -> torch.device:
        """Where the model computes, and where the decoder keeps its tokens and returns logits."""
        return next(self.model.parameters()).device

    def logits(self) -> torch.Tensor:
        """Logits (rows, N+1) of the next token of every row, on the model's device."""
        T, windows = self.transition_dim, self.windows()
        if self.reach is not None:  # whole transitions only: a window starts at a transition boundary
            windows = [w[:, max(0, w.shape[1] - self.reach) // T * T :] for w in windows]
        return torch.cat([self.model(w)[:, -1] for w in windows])


_MALLOC_TUNED = False
ENCODE_CHUNK = 16  # tokens per step of a prefix-sharing encode (CachedDecoder._encode)


def keep_freed_memory() -> None:
    """Keep large freed blocks in the process heap (glibc): by default blocks above the mmap threshold go back to
    the OS on free, so every re-encode's fresh activations page-fault in again (338k minor faults in one 128/15
    Hopper search; planning 9-21% faster without them, benchmarks/plan_speed.py). Once per process; a no-op
    off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not hand the heap's top back to the OS below 2 GiB


class CachedDecoder(ReferenceDecoder):
    """Exact incremental decoding: the prefix is encoded once (one row per env) and broadcast by re-indexing
    the KV cache; each token is one cached step. An absolute model's window is re-encoded when a crop moves its
    start; a window model's cache drops its oldest keys instead (`KVCache.compact`) and never re-encodes.
    """

    def __init__(self, model: GPT, window: int):
        super().__init__(model, window)
        keep_freed_memory()
        self.cache: KVCache | None = None
        self._pending: torch.Tensor | None = None  # rows the cache has yet to take (`reorder`)
        band = model.config.window
        # Room for a prefix of `window` tokens plus one transition; a window model compacts to its band's last
        # keys about once a transition. Single-token steps read the whole buffer, so it is no longer than that.
        self.cache_len = window if self.crop is not None else max(window, band) + self.transition_dim

    def start(self, prefixes: list[torch.Tensor], max_rows: int, carried: list[CarriedCache] | None = None) -> None:
        super().start(prefixes, max_rows)
        dtype = next(self.model.parameters()).dtype
        # Carried caches bring at most the band's last keys, whatever the context: a buffer sized for those (each
        # single-token step reads all of it).
        length = self.cache_len if carried is None else self.model.config.window + self.transition_dim
        if (self.cache is None or self.cache.max_rows < max_rows or self.cache.max_len != length
                or self.cache.k.dtype != dtype or self.cache.k.device != self.device):
            self.cache = KVCache(self.model.config, max_rows, length, device=self.device, dtype=dtype)
        if carried is None:
            self._encode()
            return
        if len(carried) != len(prefixes) or any(len(p) != self.model.config.obs_dim for p in prefixes):
            raise ValueError(f"{len(carried)} carried caches for {len(prefixes)} envs: give each env's carried cache "
                             "and its current observation alone")
        self.cache.load([c.cache for c in carried])
        observations = torch.stack(self.prefixes)
        self._pending, self._logits = None, self.model.forward_cached(observations, self.cache,
                                                                      slot=observations.shape[1] - 1)
        self._starts, self._fed = self.crop_starts(), 0

    def _encode(self) -> None:
        """Encode every row's window from scratch into the cache, left-padded to a common length. Rows that share
        their first tokens share those tokens' keys and values (causal attention), and a beam's rows mostly
        descend from a few ancestors: the window is encoded in chunks of `ENCODE_CHUNK` tokens, each chunk only
        for the distinct (padding, tokens so far) rows, whose cache rows are then copied to their descendants."""
        self._pending = None  # the cache is rebuilt from the tokens
        windows, device = self.windows(), self.device
        length = max(w.shape[1] for w in windows)
        idx = torch.zeros(len(self.generated), length, dtype=torch.long, device=device)
        pad = torch.empty(len(self.generated), dtype=torch.long, device=device)
        rows = len(self.generated) // len(windows)
        for k, w in enumerate(windows):
            idx[k * rows : (k + 1) * rows, length - w.shape[1] :] = w
            pad[k * rows : (k + 1) * rows] = length - w.shape[1]
        parent, first = pad, 0  # parent[r]: row r's class of equal (padding, tokens so far) up to `first`
        slot = self.next_slot()  # of every row's last token: only the last chunk's logits are kept
        for end in [*range(ENCODE_CHUNK, length, ENCODE_CHUNK), length]:
            classes, group = torch.unique(torch.cat([parent[:, None], idx[:, first:end]], dim=1), dim=0,
                                          return_inverse=True)
            rep = torch.full((len(classes),), len(idx), device=device).scatter_reduce(
                0, group, torch.arange(len(idx), device=device), "amin")
            if first == 0:
                self.cache.reset(pad[rep])
            else:  # each class continues from its parent class's cache row
                self.cache.reorder(parent[rep])
            logits = self.model.forward_cached(idx[rep, first:end], self.cache, slot=slot)
            parent, first = group, end
        self.cache.reorder(parent)
        self._logits = logits[parent]
        self._starts = self.crop_starts()
        self._fed = self.generated.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index`. The KV cache follows lazily: the next cached step gathers it once for every re-order
        since the last one, and a re-encode, which rebuilds it from the tokens, skips the gather (the re-ranking
        before each crop of a 128/15 search: ~2% of it). An expansion first computes the pending token's logits at
        the rows before it: each row's copies would compute the same ones (a beam's E-fold expansion)."""
        index = index.to(self.device)
        if self._logits is None and len(index) > len(self.generated):
            self.logits()
        super().reorder(index)
        self._pending = index if self._pending is None else self._pending[index]
        if self._logits is not None:
            self._logits = self._logits[index]

    def append(self, tokens: torch.Tensor) -> None:
        super().append(tokens)
        self._logits = None

    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self.crop_starts() != self._starts:
                self._encode()
            else:
                if self._pending is not None:
                    self.cache.reorder(self._pending)
                    self._pending = None
                self._logits = self.model.forward_cached(self.generated[:, self._fed :], self.cache,
                                                         slot=self.next_slot())
                self._fed = self.generated.shape[1]
        return self._logits


class CarriedCache:
    """One env's executed transitions [s, a, r, V] encoded once into a single-row KV cache that keeps the band's
    last keys (a window model's context carried across env steps, DESIGN.md §5b); each search encodes the current
    observation after it. One transition a forward pass, so a cache rebuilt from an episode's tokens (a resumed
    evaluation) is bit for bit the one built step by step."""

    def __init__(self, model: GPT):
        cfg = model.config
        if cfg.attention != "window":
            raise ValueError("only a window model's context can be carried across env steps (model.attention = "
                             "\"window\"); an absolute model re-encodes its crop")
        param = next(model.parameters())
        self.model = model
        self.cache = KVCache(cfg, 1, cfg.window - 1 + cfg.transition_dim, device=param.device, dtype=param.dtype)
        self.clear()

    def clear(self) -> None:
        """Forget the episode (a new one starts)."""
        self.cache.reset(torch.zeros(1, dtype=torch.long))
        self.tokens = torch.zeros(0, dtype=torch.long)  # the transitions in the cache

    @torch.inference_mode()
    def extend(self, transitions: torch.Tensor) -> None:
        """Encode the episode's executed transitions not yet in the cache; `transitions` holds all of them so far
        (ids, whole transitions). Ones that are not those already encoded start the cache over."""
        T = self.model.config.transition_dim
        if len(transitions) % T:
            raise ValueError(f"{len(transitions)} tokens are not whole transitions of {T}")
        if len(transitions) < len(self.tokens) or not torch.equal(transitions[: len(self.tokens)], self.tokens):
            self.clear()  # another episode (a restored slot): encode it from its start
        for start in range(len(self.tokens), len(transitions), T):
            chunk = transitions[None, start : start + T].to(self.cache.k.device)
            self.model.forward_cached(chunk, self.cache, slot=T - 1)
        self.tokens = transitions.clone()


def pick(logits: torch.Tensor, greedy: bool, generators: list[torch.Generator]) -> torch.Tensor:
    """Local class ids (rows,): the argmax, or one draw per row from the softmax with each env's generator."""
    return logits.argmax(-1) if greedy else draw_per_env(logits.softmax(-1), generators)


DECODES = ("argmax", "expectation", "median")


def decode_bins(logits: torch.Tensor, midpoints: torch.Tensor, inner_edges: torch.Tensor, how: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A greedy decode of one dimension from logits (rows, N) over its N bins (stop excluded): (bin ids, values).
    argmax: the most probable bin and its midpoint; expectation: the mean of the midpoints under the
    renormalised distribution, in the bin that contains it (the column's interior edges, as the discretizer
    encodes); median: the bin where the cumulative probability reaches 1/2, and its midpoint."""
    probs = logits.softmax(-1)
    if how == "argmax":
        ids = probs.argmax(-1)
        return ids, midpoints[ids]
    if how == "median":
        ids = (probs.cumsum(-1) < 0.5).sum(-1).clamp(max=len(midpoints) - 1)
        return ids, midpoints[ids]
    if how == "expectation":
        values = probs @ midpoints
        return torch.bucketize(values, inner_edges, right=True), values
    raise ValueError(f"decode {how!r} is not valid; choose one of {', '.join(DECODES)}")
