"""The Trajectory Transformer's GPT: one file, nanoGPT style (DESIGN.md §4, §5b).

Pre-LN blocks, fused QKV, attention under a mask that is causal *and* hides every value (V) column, and one
output head per dimension slot (N bins + stop). Two ways positions enter (`attention`):
- "absolute" (official): learned absolute position embeddings; the planner re-encodes its window after a crop.
- "window": rotary embeddings on queries and keys and a band of `window` tokens (each query sees at most the
  previous `window` keys), in training and decoding alike, so a KV cache that drops its oldest keys stays exact.
`forward` is the training pass over whole windows; `forward_cached` is the exact incremental path over a
preallocated KV cache with per-row left padding, used by the planner.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class GPTConfig:
    """Sizes of the network; vocab and slots follow from the transition layout."""

    obs_dim: int
    act_dim: int
    n_bins: int = 100
    block_size: int = 139
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    attention: str = "absolute"  # or "window" (DESIGN.md §5b)
    window: int = 0  # band width in tokens for attention = "window"

    @property
    def transition_dim(self) -> int:
        return self.obs_dim + self.act_dim + 2

    @property
    def vocab_size(self) -> int:
        return self.n_bins * self.transition_dim + 1  # + the stop token

    @property
    def stop_id(self) -> int:
        return self.n_bins * self.transition_dim

    @property
    def context_transitions(self) -> int | None:
        """Transitions an absolute model's training windows hold, the most context it can plan with; None for a
        window model (its band bounds what each query sees, whatever the context)."""
        return (self.block_size + 1) // self.transition_dim if self.attention == "absolute" else None

    def fit_context(self, transitions: int) -> int:
        """A planner context of `transitions`, cut to what this model can take (`context_transitions`)."""
        fits = self.context_transitions
        return transitions if fits is None else min(transitions, fits)


def near(query_pos: torch.Tensor, keys: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Boolean (q, k): key slot k is at or before query slot q and, with a band (`window` > 0), q - k < window."""
    causal = keys[None, :] <= query_pos[:, None]
    if window > 0:
        causal &= query_pos[:, None] - keys[None, :] < window
    return causal


def attention_mask(query_pos: torch.Tensor, n_keys: int, pad: torch.Tensor, transition_dim: int,
                   window: int = 0, first_key: int = 0) -> torch.Tensor:
    """Boolean (B, 1, q, k) mask over buffer slots first_key..n_keys-1: key k is visible from the query in slot
    q if k <= q, k is not left padding, k is not a value column (relative position (k - pad) % T == T - 1)
    and, with a band (`window` > 0), q - k < window. A query in a padding slot sees its own key only: no row is
    empty, as an attention kernel may return NaN for one (CUDA's memory-efficient kernel did), and a NaN written
    at a padding slot would reach every later score through the additive mask (NaN + -inf). No other query sees
    a padding key, so nothing else changes."""
    keys = torch.arange(first_key, n_keys, device=pad.device)
    rel = keys[None, :] - pad[:, None]  # (B, k)
    visible = (rel >= 0) & (rel % transition_dim != transition_dim - 1)
    mask = visible[:, None, :] & near(query_pos, keys, window)[None]
    own = (keys[None, :] == query_pos[:, None])[None] & (query_pos[None, :] < pad[:, None])[:, :, None]
    return (mask | own).unsqueeze(1)


def additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive form (0 / -inf) of a boolean attention mask, for the training and single-query attention."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def rotary_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of the rotary angles position * 10000^(-2i/d), each angle for both channels it rotates:
    (t, d) for positions (t,) or (B, 1, t, d) for (B, t); once per forward, shared by every layer. Angles are
    computed in float64, so positions in the tens of thousands (a long episode's cache) rotate as exactly as small
    ones."""
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def rotary(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding of (..., t, d) queries or keys: channel pairs (i, i + d/2) rotated by the angles
    of `rotary_tables`, as x cos + (x2, x1) (-sin, sin) in four ops (a decoding step runs it every layer)."""
    cos, sin = tables
    if cos.dtype != x.dtype:  # under autocast
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Preallocated keys and values (layer, row, head, position, head_dim) with per-row left padding."""

    def __init__(self, config: GPTConfig, max_rows: int, max_len: int, device=None, dtype=torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, max_rows, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Re-ordering and compaction copy into these and swap (one pass instead of a copy + copy back).
        self._k_spare = torch.zeros(shape, device=device, dtype=dtype)
        self._v_spare = torch.zeros(shape, device=device, dtype=dtype)
        self.transition_dim = config.transition_dim
        self.window = config.window if config.attention == "window" else 0
        self.rows = 0
        self.length = 0
        self.offset = 0  # slots dropped from the front by `compact` (window models); positions keep counting
        self.first_key = 0  # first slot the current forward pass attends to
        self.pad = torch.zeros(0, dtype=torch.long, device=device)
        self.min_pad = 0  # a lower bound of pad.min() on the host (reorders only select rows), for position checks
        # The single-query mask, kept up to date instead of rebuilt every token (`decode_bias`): each row's visible
        # slots (written, not padding, not a value column) as an additive (row, head, slot) bias, re-indexed with
        # the rows, and per query slot the causal limit (and a window model's band).
        self.n_head = config.n_head
        self.row_bias = torch.zeros(0, config.n_head, max_len, device=device, dtype=dtype)
        slots = torch.arange(max_len, device=device)
        self.slot_bias = additive(near(slots, slots, self.window), dtype)

    @property
    def max_rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self, pad: torch.Tensor, min_pad: int | None = None) -> None:
        """Empty the cache for len(pad) rows, row i starting with pad[i] left-padding positions (`min_pad`: pad's
        minimum where the caller knows it, which spares a read from a GPU)."""
        if len(pad) > self.max_rows:
            raise ValueError(f"KV cache holds {self.max_rows} rows, asked for {len(pad)}")
        self.rows, self.length, self.offset, self.pad = len(pad), 0, 0, pad.to(self.k.device, torch.long)
        self.min_pad = min_pad if min_pad is not None else int(pad.min()) if len(pad) else 0
        self._update_row_bias()

    def _update_row_bias(self) -> None:
        """Each row's visible slots from its padding and the offset (after a reset or a compaction)."""
        last = torch.full((1,), self.max_len - 1, device=self.k.device)  # a query that every slot precedes
        visible = attention_mask(last, self.max_len, self.pad - self.offset, self.transition_dim)[:, 0, 0]
        self.row_bias = additive(visible, self.k.dtype)[:, None].expand(-1, self.n_head, -1).contiguous()

    def decode_bias(self) -> torch.Tensor:
        """The additive mask (rows * heads, 1, max_len) of one query per row in slot `length` over every slot of
        the buffer (unwritten ones hidden by the causal limit)."""
        return (self.row_bias + self.slot_bias[self.length]).view(-1, 1, self.max_len)

    def load(self, caches: list[KVCache]) -> None:
        """Row i := the one row of caches[i] (window models' carried env caches): its last window - 1 slots at most
        (no later query sees further back), right-aligned so every row ends in the same slot, its positions going on
        from its own. A row's pad may go negative: its unwritten slots then lie before those window - 1 keys, out
        of every later query's band."""
        kept = [min(c.length, self.window - 1) for c in caches]
        length = max(kept)
        shift = [length - c.length - c.offset for c in caches]  # a one-row cache's min_pad is its pad
        self.reset(torch.tensor(shift, device=self.k.device) + torch.cat([c.pad for c in caches]),
                   min(s + c.min_pad for s, c in zip(shift, caches, strict=True)))
        for i, (c, n) in enumerate(zip(caches, kept, strict=True)):
            self.k[:, i, :, length - n : length] = c.k[:, 0, :, c.length - n : c.length]
            self.v[:, i, :, length - n : length] = c.v[:, 0, :, c.length - n : c.length]
        self.length = length

    def compact(self, incoming: int) -> None:
        """Make room for `incoming` tokens by dropping the oldest slots that no future query can see (window
        models only: a query sees the previous `window` keys). One copy of the kept slots (to the spare's front)."""
        if self.length + incoming <= self.max_len:
            return
        keep = self.window - 1
        if not self.window or keep + incoming > self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} cannot take {self.length + incoming} positions")
        drop = self.length - keep
        rows = slice(0, self.rows)
        with torch.no_grad():  # into the spare buffers, then swap: one pass (in place it needs a clone first)
            self._k_spare[:, rows, :, :keep] = self.k[:, rows, :, drop : self.length]
            self._v_spare[:, rows, :, :keep] = self.v[:, rows, :, drop : self.length]
        self.k, self._k_spare = self._k_spare, self.k
        self.v, self._v_spare = self._v_spare, self.v
        self.offset += drop
        self.length = keep
        self._update_row_bias()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (any length up to max_rows, repeats allowed): beam re-ranking and expansion."""
        n = len(index)
        if n > self.max_rows:
            raise ValueError(f"KV cache holds {self.max_rows} rows, asked for {n}")
        index = index.to(self.k.device)
        # Only the written slots when they are under half the buffer (a chunked encode's early steps); a strided
        # gather of most of the buffer is slower than the contiguous whole. Unwritten slots are masked anyway.
        slots = slice(0, self.length if 2 * self.length <= self.max_len else self.max_len)
        with torch.no_grad():  # the cache is an inference structure; out= gathers cannot carry autograd
            torch.index_select(self.k[..., slots, :], 1, index, out=self._k_spare[:, :n, :, slots])
            torch.index_select(self.v[..., slots, :], 1, index, out=self._v_spare[:, :n, :, slots])
        self.k, self._k_spare = self._k_spare, self.k
        self.v, self._v_spare = self._v_spare, self.v
        self.pad = self.pad[index]
        self.row_bias = self.row_bias[index]
        self.rows = n


def drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Boolean CPU mask, True with probability p (rounded to a multiple of 2**-16): 16-bit slices of 64-bit
    random integers, a quarter of the generator calls of the Bernoulli draws behind `F.dropout`, whose cost
    alone was a fifth of a training step here."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    return bits.view(shape) < round(-(2**15) + p * 2**16)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on CPU with `drop_mask`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x.masked_fill(drop_mask(x.shape, p), 0.0) * (1.0 / (1.0 - p))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, t, d): one head on CPU, with an additive causal (t, t) mask and
    attention dropout, by explicit batched matmuls (they beat SDPA's CPU kernels under a mask, with dropout and in
    bfloat16). q, k, v may be strided views of the fused QKV output. Keys are padded (masked) to a multiple of 16
    unless the caller already padded the sequence: the CPU softmax over rows of another length takes a scalar path
    3x slower. From 128 keys on, the queries run in two blocks split at a multiple of 16 near the middle, the first
    over only the keys before the split (causality hides the rest from it): a quarter of the scores, softmax and
    weighted sums skipped (0.86-0.95x the step at 160-256 tokens; the extra calls cost more below). The dropout
    scale is applied to the (t, d) output, not the (t, t) weights (benchmarks/train_throughput.py)."""
    t, d = q.shape[-2:]
    n = -(-t // 16) * 16
    if n != t:
        k, v, bias = F.pad(k, (0, 0, 0, n - t)), F.pad(v, (0, 0, 0, n - t)), F.pad(bias, (0, n - t), value=-math.inf)
    split = n // 32 * 16 if n >= 128 else 0
    blocks = [(slice(0, split), split), (slice(split, t), n)] if 0 < split < t else [(slice(0, t), n)]
    out = []
    for rows, keys in blocks:
        scores = torch.baddbmm(bias[rows, :keys].to(q.dtype).expand(len(q), -1, keys), q[:, rows],
                               k[:, :keys].transpose(1, 2), alpha=d**-0.5)
        weights = scores.softmax(-1)
        if p > 0.0:
            weights = weights.masked_fill(drop_mask(weights.shape, p), 0.0)
        out.append(torch.bmm(weights, v[:, :keys]))
    y = torch.cat(out, dim=1) if len(out) > 1 else out[0]
    return y * (1.0 / (1.0 - p)) if p > 0.0 else y


MIN_ROWS = 16
"""Weight matmuls outside autograd on a CPU run on at least this many rows. MKL's kernels for a few rows (1-3, and
5-11 under several threads, on the CPUs measured) round differently from its blocked kernel, whose rows come out
bit for bit the same at any row count: so an env's plans depended, by float rounding, on which envs shared its
batch (its prefix alone is one row of the encode's shared rows)."""


def min_rows(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """matmul(x) over the last dim, with zero rows appended to reach MIN_ROWS where x has fewer (then dropped)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":  # training, or a GPU: no rows appended
        return matmul(x)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows < MIN_ROWS:
        return matmul(x)
    flat = x.reshape(rows, x.shape[-1])
    out = matmul(torch.cat([flat, flat.new_zeros(MIN_ROWS - rows, flat.shape[1])]))[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def encode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the visible keys, for an encode's (B, H, t, d) queries against (B, H, n, d)
    cached keys and values under a boolean (B, 1, t, n) mask, by explicit batched matmuls. SDPA's CPU kernel splits
    its work by batch size under several threads, so a row's bits depended on the rows beside it; batched matmuls
    give every (row, head) the same bits at any batch size from two (one is doubled: a single matrix takes
    another path)."""
    B, H, t, d = q.shape
    if B * H == 1:
        return encode_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                mask.expand(2, -1, -1, -1))[:1]
    scores = (q @ k.transpose(-1, -2)).mul_(d**-0.5).masked_fill_(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class Linear(nn.Linear):
    """nn.Linear whose products outside autograd on a CPU are the same whatever the row count (`min_rows`), and that,
    in bfloat16 on a CPU without native bf16 matmuls, multiplies float32 copies of its bf16 operands: the same
    exact products, accumulated in float32 and rounded to bf16 once, as a native bf16 GEMM does, at float32 speed
    instead of the emulated bf16 kernel's (4x slower in a profiled walker2d search on an AVX512 Xeon without
    AVX512-BF16; benchmarks/README.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return min_rows(self._product, x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not cpu_bf16()):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return super().forward(x)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.rotary = config.attention == "window"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, t, C = x.shape
        H, d = self.n_head, C // self.n_head
        if cache is None and x.device.type == "cpu":  # training: per-head strided views, no transpose copies
            heads = self.c_attn(x).view(B, t, 3 * H, d).unbind(2)
            q, k, v = heads[:H], heads[H : 2 * H], heads[2 * H :]
            if self.rotary:
                q, k = [rotary(z, rope) for z in q], [rotary(z, rope) for z in k]
            p = self.dropout if self.training else 0.0
            y = torch.stack([attend(q[h], k[h], v[h], mask, p) for h in range(H)], dim=2).view(B, t, C)
            return dropout(self.c_proj(y), self.dropout, self.training)
        if cache is not None and t == 1:
            return self._decode_one(x, mask, cache, layer, rope)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, t, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.rotary:
            q, k = rotary(q, rope), rotary(k, rope)
        if cache is not None:
            start = cache.length
            cache.k[layer, :B, :, start : start + t] = k
            cache.v[layer, :B, :, start : start + t] = v
            keys = slice(cache.first_key, cache.first_key + mask.shape[-1])  # the slots forward_cached chose
            k = cache.k[layer, :B, :, keys]
            v = cache.v[layer, :B, :, keys]
        if cache is None:  # training on a GPU: the fused SDPA kernel under the additive (t, t) bias
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype),
                                               dropout_p=self.dropout if self.training else 0.0)
        elif x.device.type == "cpu":
            y = encode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, t, C)
        return dropout(self.c_proj(y), self.dropout, self.training)

    def _decode_one(self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache, layer: int,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The cached pass of one new token per row (the planner's step) in as few ops as the math allows (each
        costs ~10 us of dispatch here, ~30% of a 32/5 search): the query against every slot of the cache buffer,
        `bias` the additive (B*H, 1, max_len) mask that hides the unwritten ones. Batched matmuls beat SDPA here."""
        B, _, C = x.shape
        H, d, L = self.n_head, C // self.n_head, cache.max_len
        qkv = self.c_attn(x).view(B, 3, H, d)
        q, k = (rotary(qkv[:, :2], rope) if self.rotary else qkv[:, :2]).unbind(1)  # rotated together
        keys, values = cache.k[layer, :B], cache.v[layer, :B]
        keys[:, :, cache.length] = k
        values[:, :, cache.length] = qkv[:, 2]
        scores = torch.baddbmm(bias, q.reshape(B * H, 1, d), keys.view(B * H, L, d).transpose(1, 2), alpha=d**-0.5)
        return self.c_proj(torch.bmm(scores.softmax(-1), values.view(B * H, L, d)).view(B, 1, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT over discretized transitions with per-slot output heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.attention not in ("absolute", "window"):
            raise ValueError(f"model attention {config.attention!r} is not valid; choose absolute or window")
        if config.attention == "window" and config.window < 1:
            raise ValueError("a window model needs window >= 1 tokens (model.window_transitions * transition_dim)")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # Absolute models learn one embedding per position; window models rotate queries and keys instead.
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.attention == "absolute" else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        # Head for slot j reads position p with p mod T == j and predicts dimension (j + 1) mod T.
        self.head = nn.Parameter(torch.empty(config.transition_dim, config.n_embd, config.n_bins + 1))
        self.apply(self._init_weights)
        nn.init.normal_(self.head, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        T = config.transition_dim
        self.band = config.window if config.attention == "window" else 0
        size = -(-config.block_size // 16) * 16  # the CPU forward pads to a multiple of 16
        full = attention_mask(torch.arange(size), size, torch.zeros(1, dtype=torch.long), T, self.band)
        self.register_buffer("mask", full[0, 0], persistent=False)
        self.register_buffer("bias", additive(full[0, 0]), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, t, N+1) for token ids (B, t) of windows that start at a transition boundary. A window
        model takes sequences of any length (positions are relative; the band bounds what each query sees)."""
        B, t = idx.shape
        T = self.config.transition_dim
        if self.wpe is not None and t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds the model's block size {self.config.block_size}")
        # On CPU the sequence runs padded at its end to a multiple of 16 (the CPU softmax's fast row length; see
        # `attend`): causal attention keeps the padding out of every real position, and it is cut off below.
        n = -(-t // 16) * 16 if idx.device.type == "cpu" else t
        positions = torch.arange(n, device=idx.device)
        if n <= len(self.bias):
            bias = self.bias[:n, :n]
        else:
            bias = additive(attention_mask(positions, n, torch.zeros(1, dtype=torch.long, device=idx.device), T,
                                           self.band)[0, 0])
        idx = F.pad(idx, (0, n - t))
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions.clamp(max=self.config.block_size - 1))
        x = dropout(x, self.config.dropout, self.training)
        rope = self._rope(positions, x.dtype)
        for block in self.blocks:
            x = block(x, bias, rope=rope)
        x = self.ln_f(x)
        whole = -(-t // T) * T  # whole transitions: each slot through its own head
        x = x[:, :whole] if n >= whole else F.pad(x, (0, 0, 0, whole - n))
        x = rearrange(x, "b (n slot) c -> b n slot c", slot=T)
        logits = torch.einsum("bntc,tcv->bntv", x, self.head)
        return rearrange(logits, "b n slot v -> b (n slot) v")[:, :t]

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, all_logits: bool = False,
                       slot: int | None = None) -> torch.Tensor:
        """Append tokens (B, t) to the cache and return the logits of the last position (B, N+1), or of
        every new position (B, t, N+1) with `all_logits`. Row b's positions count from cache.pad[b]; a window
        model's cache drops keys no query can see any more when it runs out of room. `slot`: the head slot of
        every row's last position when the caller knows they all share it (the decoders do), which spares a
        host-device sync per token on a GPU."""
        B, t = idx.shape
        if B != cache.rows:
            raise ValueError(f"cache has {cache.rows} rows, got {B}")
        if self.wpe is None:
            cache.compact(t)
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache of length {cache.max_len} cannot take {start + t} positions")
        if t == 1:
            rel = (start + cache.offset) - cache.pad[:, None]  # (B, 1): position from the row's start
        else:
            query_pos = torch.arange(start, start + t, device=idx.device)
            rel = query_pos[None, :] + cache.offset - cache.pad[:, None]  # (B, t)
        if self.wpe is not None and start + t - 1 + cache.offset - cache.min_pad >= self.config.block_size:
            cache.min_pad = int(cache.pad.min())  # the bound may be stale after reorders: the exact check
            if start + t - 1 + cache.offset - cache.min_pad >= self.config.block_size:
                raise ValueError(f"position {start + t - 1 + cache.offset - cache.min_pad} exceeds the model's "
                                 f"block size {self.config.block_size}")
        x = self.wte(idx) if self.wpe is None else self.wte(idx) + self.wpe(rel.clamp(min=0))
        if t == 1:
            # One query per row reads every slot of the buffer: the mask hides the unwritten ones (k > q) and
            # those out of the band. A partial slot range would make each (row, head) block a strided view, and
            # the CPU's batched matmul over strided blocks runs 3-4x slower than over the whole contiguous
            # buffer (benchmarks/plan_speed.py); the cache is sized to what the search can reach.
            cache.first_key, mask = 0, cache.decode_bias()
        else:  # an encode attends over the written slots, a window model's only over those its band can reach
            cache.first_key = max(0, start - self.band + 1) if self.band else 0
            mask = attention_mask(query_pos, start + t, cache.pad - cache.offset, self.config.transition_dim,
                                  self.band, cache.first_key)
        rope = self._rope(rel, x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, rope)
        cache.length = start + t
        if all_logits:
            return torch.einsum("btc,btcv->btv", self.ln_f(x), self.head[rel % self.config.transition_dim])
        return self.head_logits(self.ln_f(x[:, -1]), rel[:, -1] % self.config.transition_dim if slot is None else slot)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A window model's rotary tables for these positions (None for an absolute model)."""
        if self.wpe is not None:
            return None
        return rotary_tables(positions, self.config.n_embd // self.config.n_head, dtype)

    def head_logits(self, h: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        """Logits (B, N+1) of final hidden states h (B, C) through each row's slot head (`slot` an int when all
        rows share it, the planner's case); one matmul when they do."""
        if isinstance(slot, torch.Tensor) and bool((slot == slot[0]).all()):
            slot = int(slot[0])
        if isinstance(slot, int):
            return min_rows(lambda rows: rows @ self.head[slot], h)
        return torch.bmm(h[:, None], self.head[slot])[:, 0]

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        """AdamW with weight decay on matmul weights only (not biases, LayerNorms or embeddings)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            is_matmul = p.dim() >= 2 and not name.startswith(("wte", "wpe"))
            (decay if is_matmul else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel: one pass over all parameters, ~5x faster than the per-tensor loop on CPU.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)


def usable_device(key: str, name: str) -> torch.device:
    """The torch device `name` ("cpu", "cuda", "cuda:N") of config key `key`, refused in one line when this machine
    has no such CUDA card."""
    device = torch.device(name)
    if device.type == "cuda":
        cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cards == 0 or (device.index or 0) >= cards:
            raise ValueError(f"{key} = {name!r} but torch sees {cards} CUDA device(s) here; use \"cpu\""
                             + (f" or \"cuda:0\" .. \"cuda:{cards - 1}\"" if cards else ""))
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs). Elsewhere torch
    emulates bf16, several times slower than float32 (6.6x at the official Hopper search on an AVX2 EPYC), except
    in our `Linear` on a CPU. oneDNN reports bf16 support on any AVX512 CPU (emulated there), so the CPU's own
    instruction sets decide."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):  # the card asked for, not the current one; emulation does not count
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16()


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16 or AMX); asked once per process."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position (B, t) of local class targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none").view(targets.shape)
