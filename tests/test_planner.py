"""Beam-search planner: filters, cached vs uncached exactness, batched vs single envs, stop handling."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from trajformer import decoding
from trajformer import planner as planner_module
from trajformer.config import Config, PlanConfig
from trajformer.decoding import CachedDecoder, ReferenceDecoder, crop_start
from trajformer.discretizer import Discretizer
from trajformer.model import GPT, GPTConfig, KVCache
from trajformer.planner import BeamSearch, Plan, Planner, filter_cdf, filter_top_k, plan_config
from trajformer.run import Run

DS, DA, N, SEQ = 3, 2, 10, 4
T = DS + DA + 2


def make_model(seed: int = 0, head_std: float = 0.3, dtype=torch.float64, attention: str = "absolute") -> GPT:
    """A random GPT whose per-slot heads give peaked but not degenerate distributions (stop included).
    A window model gets a band of 2 transitions, so its cache compacts within every search."""
    torch.manual_seed(seed)
    cfg = GPTConfig(obs_dim=DS, act_dim=DA, n_bins=N, block_size=SEQ * T - 1, n_layer=2, n_head=2, n_embd=16,
                    dropout=0.0, attention=attention, window=2 * T if attention == "window" else 0)
    model = GPT(cfg).to(dtype).eval()
    with torch.no_grad():
        model.head.normal_(0.0, head_std)
    return model


def constant_stop_model(stop: float) -> GPT:
    """A model with the same logits at every position: every bin 0 and stop 16 * `stop` (each final hidden state
    is the ones vector of width 16)."""
    model = make_model()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.head.zero_()
        model.head[:, :, N] = stop
    return model


def make_discretizer() -> Discretizer:
    return Discretizer.fit(np.random.default_rng(0).normal(size=(400, T)), N)


def random_prefix(n_past: int, rng: np.random.Generator) -> torch.Tensor:
    """Token ids of n_past transitions plus an observation, like the planner's context."""
    bins = rng.integers(0, N, size=(n_past + 1) * T)[: n_past * T + DS]
    return torch.as_tensor(bins + N * (np.arange(len(bins)) % T))


class TeeDecoder:
    """Drives a cached and a reference decoder with the same calls and checks their logits agree."""

    def __init__(self, model: GPT, window: int, atol: float):
        self.cached, self.reference = CachedDecoder(model, window), ReferenceDecoder(model, window)
        self.atol, self.checked, self.encodes = atol, 0, 0
        encode = self.cached._encode

        def counting_encode() -> None:
            self.encodes += 1
            encode()

        self.cached._encode = counting_encode

    def start(self, prefixes, max_rows, carried=None):
        assert carried is None  # the reference needs whole episodes: test_carried_context_* compare planners
        self.cached.start(prefixes, max_rows)
        self.reference.start(prefixes, max_rows)

    def reorder(self, index):
        self.cached.reorder(index)
        self.reference.reorder(index)

    def append(self, tokens):
        self.cached.append(tokens)
        self.reference.append(tokens)

    @property
    def generated(self):
        return self.cached.generated

    def logits(self):
        a, b = self.cached.logits(), self.reference.logits()
        torch.testing.assert_close(a, b, atol=self.atol, rtol=0)
        self.checked += 1
        return a


CONFIGS = [
    PlanConfig(beam_width=3, n_expand=2, horizon=7, max_context_transitions=2, cdf_act=0.6),
    PlanConfig(beam_width=4, n_expand=1, horizon=6, max_context_transitions=3, k_act=3, cdf_act=None,
               objective="likelihood"),
    PlanConfig(beam_width=2, n_expand=3, horizon=8, max_context_transitions=4, k_act=5, cdf_act=0.3,
               objective="penalized", penalty_lambda=0.5),
    PlanConfig(beam_width=5, n_expand=2, horizon=5, max_context_transitions=2, cdf_act=None, k_obs=2),
]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- filters


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.01, 1.0))
def test_filter_cdf_keeps_smallest_head_holding_more_than_1_minus_p(values, p):
    logits = torch.tensor([values], dtype=torch.float64)
    kept = torch.isfinite(filter_cdf(logits, p))[0]
    probs = logits.softmax(-1)[0]
    assert kept[probs.argmax()]
    # Kept tokens are the most probable ones: every kept token is at least as likely as every dropped one.
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()
    # The dropped tail has mass below p, and it could not take the least likely kept token as well.
    assert probs[~kept].sum() < p + 1e-12
    if kept.sum() > 1:
        assert probs[~kept].sum() + probs[kept].min() >= p - 1e-12


def test_filter_cdf_worked_example():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_cdf(logits, 0.6)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_cdf(logits, 0.1)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_cdf(logits, 1.0)).tolist() == [[True, False, False, False]]


def test_filter_top_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[False, True, False, False, True]]
    assert torch.equal(filter_top_k(logits, 9), logits)


def test_crop_start_drops_whole_transitions():
    window = 3 * T - 1
    assert crop_start(window, window, T) == 0
    assert crop_start(window + 1, window, T) == T  # 3 full transitions: drop one
    assert crop_start(window + T, window, T) == T
    assert crop_start(window + T + 1, window, T) == 2 * T


# ---------------------------------------------------------------- cached vs uncached


@pytest.mark.parametrize("attention", ["absolute", "window"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["cdf", "topk-likelihood", "both-penalized", "kobs"])
def test_cached_logits_and_plans_equal_reference(cfg, attention):
    """Every token's logits agree with GPT.forward over the cropped window (absolute) or the whole sequence
    (window model), and the plans are identical."""
    model, disc = make_model(attention=attention), make_discretizer()
    rng = np.random.default_rng(1)
    prefixes = [random_prefix(n, rng) for n in (0, 1, cfg.max_context_transitions)]  # ragged envs
    seeds = [11, 12, 13]
    tee_search = BeamSearch(model, disc, cfg, 0.99)
    tee = TeeDecoder(model, tee_search.decoder.window, atol=1e-10)
    tee_search.decoder = tee
    tee_plans = tee_search.search(prefixes, generators(seeds))
    ref_plans = BeamSearch(model, disc, cfg, 0.99, cached=False).search(prefixes, generators(seeds))
    cached_plans = BeamSearch(model, disc, cfg, 0.99, cached=True).search(prefixes, generators(seeds))
    tokens_per_search = cfg.horizon * T - DS
    assert tee.checked == tokens_per_search
    if attention == "absolute":  # the window crops about once per planned transition, and only then re-encodes
        assert cfg.horizon - cfg.max_context_transitions <= tee.encodes <= cfg.horizon + 1
    else:  # the prefix is encoded once; the cache dropped keys from its front instead of re-encoding
        assert tee.encodes == 1 and tee.cached.cache.offset > 0
    for a, b, c in zip(tee_plans, ref_plans, cached_plans, strict=True):
        for plan in (a, c):
            np.testing.assert_array_equal(plan.action_tokens, b.action_tokens)
            np.testing.assert_array_equal(plan.next_observations, b.next_observations)
            assert plan.steps == b.steps
            assert plan.score == pytest.approx(b.score, abs=1e-9)
            assert plan.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-9)


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_cached_logits_match_reference_in_float32(attention):
    model, disc = make_model(dtype=torch.float32, attention=attention), make_discretizer()
    cfg = CONFIGS[0]
    search = BeamSearch(model, disc, cfg, 0.99)
    tee = TeeDecoder(model, search.decoder.window, atol=1e-4)
    search.decoder = tee
    rng = np.random.default_rng(2)
    search.search([random_prefix(n, rng) for n in (2, 0)], generators([0, 1]))
    assert tee.checked == cfg.horizon * T - DS


def test_greedy_plans_equal_reference_in_float32():
    """With greedy actions (k_act = 1) there is no draw to flip: float32 plans match exactly."""
    model, disc = make_model(dtype=torch.float32), make_discretizer()
    cfg = PlanConfig(beam_width=3, n_expand=2, horizon=9, max_context_transitions=2, k_act=1, cdf_act=None)
    rng = np.random.default_rng(3)
    prefixes = [random_prefix(n, rng) for n in (0, 3)]
    a = BeamSearch(model, disc, cfg, 0.99).search(prefixes, generators([0, 1]))
    b = BeamSearch(model, disc, cfg, 0.99, cached=False).search(prefixes, generators([0, 1]))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.action_tokens, y.action_tokens)


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_bfloat16_planning_keeps_float32_scores_and_the_float32_plans(attention, monkeypatch):
    """plan.dtype = bfloat16: weights and KV cache in bf16, logits cast up before any score; with greedy actions
    on well-separated logits the plans are the float32 ones, and rewards/values agree to bf16 precision."""
    model, disc = make_model(head_std=1.0, dtype=torch.float32, attention=attention), make_discretizer()
    cfg = PlanConfig(beam_width=3, n_expand=2, horizon=4, max_context_transitions=2, k_act=1, cdf_act=None)
    rng = np.random.default_rng(5)
    prefixes = [random_prefix(n, rng) for n in (0, 2)]
    full = BeamSearch(model, disc, cfg, 0.99).search(prefixes, generators([0, 1]))
    half_model = GPT(model.config).to(torch.bfloat16).eval()
    half_model.load_state_dict(model.state_dict())
    half = BeamSearch(half_model, disc, cfg, 0.99)
    assert half.midpoints.dtype == torch.float32
    plans = half.search(prefixes, generators([0, 1]))
    assert half.decoder.cache.k.dtype == torch.bfloat16
    for x, y in zip(full, plans, strict=True):
        np.testing.assert_array_equal(x.action_tokens[:1], y.action_tokens[:1])
        assert y.rewards.dtype == np.float64 and np.isfinite(y.score)
        np.testing.assert_allclose(x.rewards[:1], y.rewards[:1], rtol=0.05, atol=0.05)
    assert plan_config(fake_run(), ["plan.dtype=bfloat16"]).dtype == "bfloat16"
    bf16_run = fake_run(PlanConfig(max_context_transitions=2, dtype="bfloat16"))
    for native in (True, False):  # emulated bf16 is no faster than float32: say so, and only then
        monkeypatch.setattr(planner_module, "native_bf16", lambda device, native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert next(Planner.from_run(bf16_run).search.model.parameters()).dtype == torch.bfloat16
        assert len([w for w in caught if "no native bf16" in str(w.message)]) == (0 if native else 1)


@pytest.mark.parametrize("rows, classes", [(1, 7), (64, 101), (2560, 101)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_are_torch_multinomial_bit_for_bit(rows, classes, dtype):
    """The planner's draws (noise from the CPU generators, argmax on the search's device) are torch.multinomial's,
    and leave every generator in the same state, so seeded plans and resumed evaluations do not change."""
    torch.manual_seed(rows)
    probs = torch.rand(3 * rows, classes, dtype=dtype) ** 4
    probs[:, 0] = 0.0  # a filtered-out class is never drawn
    probs /= probs.sum(-1, keepdim=True)
    ours, theirs = generators([5, 6, 7]), generators([5, 6, 7])
    want = torch.cat([torch.multinomial(probs[k * rows : (k + 1) * rows], 1, generator=g)[:, 0]
                      for k, g in enumerate(theirs)])
    assert torch.equal(decoding.draw_per_env(probs, ours), want)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_noise_drawn_ahead_gives_the_same_plans_and_generator_states(cfg, monkeypatch):
    """On a GPU the draws' noise comes from a background thread, drawn ahead for the whole search: the plans
    and every env's generator afterwards equal drawing at each step (forced here on the CPU, k_obs draws too)."""
    model, disc = make_model(), make_discretizer()
    rng = np.random.default_rng(11)
    prefixes = [random_prefix(n, rng) for n in (0, 2)]
    inline, ahead = generators([3, 4]), generators([3, 4])
    want = BeamSearch(model, disc, cfg, 0.99).search(prefixes, inline)
    monkeypatch.setattr(planner_module, "draw_ahead", lambda device: True)
    got = BeamSearch(model, disc, cfg, 0.99).search(prefixes, ahead)
    for x, y in zip(want, got, strict=True):
        np.testing.assert_array_equal(x.action_tokens, y.action_tokens)
        assert x.score == y.score
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(inline, ahead, strict=True))


class ScalarReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (.item(), int(), bool()): each a host-device sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_a_search_reads_no_values_back_per_token(attention):
    """A search on a GPU must not wait on the host every token: values are read back once per window encode (the
    cache's padding) and for the plans at the end, so a longer horizon adds reads only with its encodes."""
    rng = np.random.default_rng(3)
    prefixes = [random_prefix(n, rng) for n in (0, 3)]
    reads = []
    for horizon in (2, 6):
        search = BeamSearch(make_model(attention=attention), make_discretizer(),
                            dataclasses.replace(CONFIGS[0], horizon=horizon), 0.99)
        encodes, encode = [], search.decoder._encode
        search.decoder._encode = lambda encode=encode, encodes=encodes: encodes.append(1) or encode()
        with ScalarReads() as counter:
            search.search(prefixes, generators([0, 1]))
        reads.append(counter.n - len(encodes))
    assert reads[0] == reads[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_planning_on_cuda_gives_the_cpu_plans(attention):
    """plan.device = cuda: the whole search on the card, only the draws' noise from the CPU generators; float64
    plans match the CPU's (sampled actions included: the same noise on the same probabilities)."""
    model, disc = make_model(attention=attention), make_discretizer()
    cfg = CONFIGS[1]
    rng = np.random.default_rng(7)
    prefixes = [random_prefix(n, rng) for n in (0, 3)]
    cpu = BeamSearch(model, disc, cfg, 0.99).search(prefixes, generators([0, 1]))
    gpu = BeamSearch(model.to("cuda"), disc, cfg, 0.99).search(prefixes, generators([0, 1]))
    for x, y in zip(cpu, gpu, strict=True):
        np.testing.assert_array_equal(x.action_tokens, y.action_tokens)
        np.testing.assert_allclose(x.values, y.values, rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_carried_planning_on_cuda_gives_the_cpu_plans():
    """A window model's carried caches on the card (one per env, loaded into the search's) plan as on the CPU."""
    disc = make_discretizer()
    cfg = dataclasses.replace(CONFIGS[1], carry_context=True)
    planners = [Planner(BeamSearch(make_model(seed=2, attention="window").to(device), disc, cfg, 0.99),
                        np.arange(DS), n_envs=2) for device in ("cpu", "cuda")]
    for x, y in zip(*run_planners(planners, steps=8), strict=True):  # same actions: run_planners checks them
        np.testing.assert_allclose(x.values, y.values, rtol=1e-9)


def test_a_carried_search_reads_back_as_many_values_however_long_the_horizon_and_episode():
    """With carried caches (a window model's default) a search reads no more values back for a longer horizon or a
    longer episode: loading them passes the pads' minimum from the host, and each carried transition is encoded
    without a read."""
    reads = []
    for horizon, history in ((2, 1), (6, 5)):
        cfg = dataclasses.replace(CONFIGS[0], horizon=horizon, carry_context=True)
        planner = Planner(BeamSearch(make_model(attention="window"), make_discretizer(), cfg, 0.99), np.arange(DS),
                          n_envs=2)
        rng = np.random.default_rng(0)
        for k in (0, 1):
            planner.reset(k, seed=k)
        for _ in range(history):
            planner.act_batch([0, 1], rng.normal(size=(2, DS)))
            planner.observe_batch([0, 1], rng.normal(size=2))
        for carried in planner.carried:
            carried.clear()  # the counted search encodes every transition of the episode again
        with ScalarReads() as counter:
            planner.plan_batch([0, 1], rng.normal(size=(2, DS)))
        reads.append(counter.n)
    assert reads[0] == reads[1]


def test_plan_device_is_checked_before_planning():
    with pytest.raises(ValueError, match="plan.device = 'tpu' is not valid"):
        plan_config(fake_run(), ["plan.device=tpu"])
    with pytest.raises(ValueError, match="plan.device = 'cuda:x' is not valid"):
        plan_config(fake_run(), ["plan.device=\"cuda:x\""])
    cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"plan.device = 'cuda:{cards}' but torch sees {cards} CUDA device"):
        Planner.from_run(fake_run(PlanConfig(max_context_transitions=2, device=f"cuda:{cards}")))


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_prefix_sharing_encode_equals_one_forward_over_every_row(attention, monkeypatch):
    """Rows that descend from a few ancestors share the encode of their common first tokens: the logits and every
    written cache slot equal one plain forward over all rows (ragged envs), and fewer tokens go through the model."""
    model = make_model(attention=attention)
    rng = np.random.default_rng(4)
    prefixes = [random_prefix(n, rng) for n in (1, 3)]
    rows = 12
    dec = CachedDecoder(model, SEQ * T - 1)
    dec.start(prefixes, 2 * rows)
    dec.reorder(torch.arange(2).repeat_interleave(rows))
    row = torch.arange(2 * rows) % rows
    for i, groups in enumerate([2, 2, 2, 4, 4, 4, 12, 12]):  # a shared past, then ever more distinct rows
        dec.append((row * groups // rows + 3 * i) % N + N * ((DS + i) % T))
    monkeypatch.setattr(decoding, "ENCODE_CHUNK", 4)  # several chunks in these short windows
    fed = []
    forward = model.forward_cached
    monkeypatch.setattr(model, "forward_cached",
                        lambda idx, cache, **kw: fed.append(idx.numel()) or forward(idx, cache, **kw))
    dec._encode()
    windows = dec.windows()
    length = max(w.shape[1] for w in windows)
    idx = torch.cat([F.pad(w, (length - w.shape[1], 0)) for w in windows])
    pad = torch.tensor([length - w.shape[1] for w in windows]).repeat_interleave(rows)
    plain = KVCache(model.config, 2 * rows, dec.cache_len, dtype=torch.float64)
    plain.reset(pad)
    torch.testing.assert_close(dec.logits(), forward(idx, plain), atol=1e-12, rtol=0)
    assert dec.cache.length == plain.length == length
    for got, want in ((dec.cache.k, plain.k), (dec.cache.v, plain.v)):
        for r in range(2 * rows):  # the slots a row's queries can see: from its padding on
            seen = slice(int(pad[r]), length)
            torch.testing.assert_close(got[:, r, :, seen], want[:, r, :, seen], atol=1e-12, rtol=0)
    assert sum(fed) < 0.7 * idx.numel()


# ---------------------------------------------------------------- batched envs


def test_batched_search_equals_single_env_searches():
    model, disc = make_model(seed=1), make_discretizer()
    cfg = CONFIGS[2]
    rng = np.random.default_rng(4)
    prefixes = [random_prefix(n, rng) for n in (0, 2, 4, 1)]
    seeds = [5, 6, 7, 8]
    batched = BeamSearch(model, disc, cfg, 0.99).search(prefixes, generators(seeds))
    single = BeamSearch(model, disc, cfg, 0.99)
    for prefix, seed, plan in zip(prefixes, seeds, batched, strict=True):
        (alone,) = single.search([prefix], generators([seed]))
        np.testing.assert_array_equal(plan.action_tokens, alone.action_tokens)
        assert plan.score == pytest.approx(alone.score, abs=1e-9)


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_left_padding_writes_no_nan_and_changes_no_plan(attention):
    """Ragged envs are left-padded. A padding query that saw no key got NaN from an attention's softmax over
    nothing (the CPU encode's, CUDA's memory-efficient kernel's), and the NaN keys it wrote reached every later
    score through the additive mask (NaN + -inf). A padding query sees its own key now: no NaN, and each env's plan
    is the one it gets alone, unpadded."""
    model, disc = make_model(seed=3, attention=attention), make_discretizer()
    rng = np.random.default_rng(0)
    prefixes = [random_prefix(0, rng), random_prefix(3, rng)]
    search = BeamSearch(model, disc, CONFIGS[0], 0.99)
    plans = search.search(prefixes, generators([0, 1]))
    assert not torch.isnan(search.decoder.cache.k).any()
    for k, plan in enumerate(plans):
        (alone,) = BeamSearch(model, disc, CONFIGS[0], 0.99).search([prefixes[k]], generators([k]))
        assert np.isfinite(plan.score) and plan.score == pytest.approx(alone.score, abs=1e-9)
        np.testing.assert_array_equal(plan.action_tokens, alone.action_tokens)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_an_envs_float32_logits_are_bit_for_bit_the_same_alone_and_batched(attention, threads, torch_threads):
    """An env's float32 search does not depend on which envs share its batch: every weight matmul runs on at least
    model.MIN_ROWS rows, as the CPU's few-row kernels round otherwise (an env alone encodes its prefix as one row,
    and its beam of 6 rows is a few-row product: 24 rows beside three other envs; test_model checks the encode's
    attention at two threads). Env 0 has the longest context, so it is not left-padded in the batch either: a
    padded env's keys sit at other offsets of the sums, and it agrees up to float rounding (checked here too).
    Widths of 32 and 21 logits: MKL takes yet another path for outputs narrower than 16."""
    bins, T = 20, DS + DA + 2
    torch.manual_seed(1)
    config = GPTConfig(obs_dim=DS, act_dim=DA, n_bins=bins, block_size=SEQ * T - 1, n_layer=2, n_head=2, n_embd=32,
                       dropout=0.0, attention=attention, window=2 * T if attention == "window" else 0)
    model = GPT(config).eval()
    with torch.no_grad():
        model.head.normal_(0.0, 0.3)
    disc = Discretizer.fit(np.random.default_rng(0).normal(size=(400, T)), bins)
    rng = np.random.default_rng(4)
    prefixes = [torch.as_tensor(rng.integers(0, bins, n * T + DS) + bins * (np.arange(n * T + DS) % T))
                for n in (2, 0, 1, 2)]

    def logits_of_env_0(envs: int) -> list[torch.Tensor]:
        search = BeamSearch(model, disc, CONFIGS[0], 0.99)
        calls, logits = [], search.decoder.logits

        def logged() -> torch.Tensor:
            out = logits()
            calls.append(out[: len(out) // envs].clone())  # env 0's rows come first, each env has as many
            return out

        search.decoder.logits = logged
        search.search(prefixes[:envs], generators(range(envs)))
        return calls

    with torch_threads(threads):
        alone, batched = logits_of_env_0(1), logits_of_env_0(len(prefixes))
    assert len(alone) == len(batched) > 20
    for a, b in zip(alone, batched, strict=True):
        assert torch.equal(a, b)
    prefixes[:] = prefixes[1:] + prefixes[:1]  # env 0 now the shortest context (none): left-padded in the batch
    assert len(prefixes[0]) < min(len(p) for p in prefixes[1:])
    for a, b in zip(logits_of_env_0(1), logits_of_env_0(len(prefixes)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["absolute", "window"])
@pytest.mark.parametrize("plan_freq", [1, 2])
def test_planner_batched_envs_at_different_steps_equal_single_planners(plan_freq, attention):
    """K envs started at different times, planned in one batch, act like K planners of their own."""
    model, disc = make_model(seed=2, attention=attention), make_discretizer()
    cfg = dataclasses.replace(CONFIGS[0], plan_freq=plan_freq)
    K, steps = 3, 7
    batched = Planner(BeamSearch(model, disc, cfg, 0.99), np.arange(DS), n_envs=K)
    singles = [Planner(BeamSearch(model, disc, cfg, 0.99), np.arange(DS)) for _ in range(K)]
    rng = np.random.default_rng(5)
    obs = rng.normal(size=(K, steps + K, DS + 1))  # one extra raw dim the selection drops
    rewards = rng.normal(size=(K, steps + K))
    for k in range(K):
        singles[k].reset(0, seed=100 + k)
    for t in range(steps + K):
        envs = [k for k in range(K) if t >= k]  # env k starts its episode at global step k
        for k in envs:
            if t == k:
                batched.reset(k, seed=100 + k)
        actions = batched.act_batch(envs, np.stack([obs[k, t - k] for k in envs]))
        batched.observe_batch(envs, np.array([rewards[k, t - k] for k in envs]))
        for k, action in zip(envs, actions, strict=True):
            alone = singles[k].act(obs[k, t - k])
            singles[k].observe(rewards[k, t - k])
            np.testing.assert_array_equal(action, alone)


def run_planners(planners: list[Planner], steps: int, K: int = 2, seed: int = 5) -> list[list[Plan]]:
    """Drive planners through the same episodes (env k starts at step k, so contexts are ragged); each planner's
    plans, in order, and every env's actions equal across planners."""
    rng = np.random.default_rng(seed)
    obs, rewards = rng.normal(size=(K, steps, DS)), rng.normal(size=(K, steps))
    plans: list[list[Plan]] = [[] for _ in planners]
    for t in range(steps):
        envs = [k for k in range(K) if t >= k]
        actions = []
        for p, made in zip(planners, plans, strict=True):
            for k in envs:
                if t == k:
                    p.reset(k, seed=100 + k)
            before = list(p.last_plans)
            actions.append(p.act_batch(envs, np.stack([obs[k, t - k] for k in envs])))
            made.extend(p.last_plans[k] for k in envs if p.last_plans[k] is not before[k])
            p.observe_batch(envs, np.array([rewards[k, t - k] for k in envs]))
        for a in actions[1:]:
            np.testing.assert_array_equal(a, actions[0])
    return plans


@pytest.mark.parametrize("plan_freq", [1, 2])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3],
                                 dataclasses.replace(CONFIGS[0], objective="critic", critic="(in memory)")])
def test_carried_context_plans_equal_the_whole_episode_uncached(cfg, plan_freq):
    """plan.carry_context (DESIGN.md §5b): each env's cache carried across env steps plans as the uncached model
    over the whole episode (scores, likelihoods, expected rewards and values to 1e-10 in float64, same actions),
    with ragged envs, compactions in every search and every objective; a fresh context of max_context_transitions
    plans otherwise once the episode reaches past it through the layers (2 layers x a band of 2 transitions)."""
    model, disc = make_model(seed=2, attention="window"), make_discretizer()
    cfg = dataclasses.replace(cfg, plan_freq=plan_freq, carry_context=True)
    critic = (lambda obs, act: 10.0 * act[:, 0] + obs[:, 0]) if cfg.objective == "critic" else None
    carried, whole = (Planner(BeamSearch(model, disc, cfg, 0.99, cached=c, critic=critic), np.arange(DS), n_envs=2)
                      for c in (True, False))
    fresh = Planner(BeamSearch(model, disc, dataclasses.replace(cfg, carry_context=False), 0.99, critic=critic),
                    np.arange(DS), n_envs=2)
    assert carried.carried is not None and whole.carried is None
    a, b = run_planners([carried, whole], steps=10)
    assert len(a) == len(b) >= 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.actions, y.actions)
        for field in ("score", "log_likelihood", "rewards", "values"):
            np.testing.assert_allclose(getattr(x, field), getattr(y, field), rtol=0, atol=1e-10)
    (c,) = run_planners([fresh], steps=10)
    assert max(abs(x.log_likelihood - y.log_likelihood) for x, y in zip(a, c, strict=True)) > 1e-6


def test_a_plan_for_another_observation_leaves_the_carried_context_as_it_was():
    """Planner.plan(obs) at any observation between env steps (a what-if plan) changes nothing the next act plans
    from: the carried cache holds executed transitions only, and each search encodes its own observation."""
    model, disc = make_model(seed=2, attention="window"), make_discretizer()
    cfg = dataclasses.replace(CONFIGS[0], carry_context=True)
    carried, whole = (Planner(BeamSearch(model, disc, cfg, 0.99, cached=c), np.arange(DS)) for c in (True, False))
    rng = np.random.default_rng(4)
    for p in (carried, whole):
        p.reset(0, seed=3)
    for t in range(6):
        probe, obs = rng.normal(size=(2, DS))
        for p in (carried, whole):  # both draw from their random streams; only `carried` could keep a cache of it
            p.plan(probe)
        np.testing.assert_array_equal(carried.act(obs), whole.act(obs))
        assert carried.last_plans[0].log_likelihood == pytest.approx(whole.last_plans[0].log_likelihood, abs=1e-10)
        for p in (carried, whole):
            p.observe(float(t))


def test_fresh_context_as_deep_as_the_receptive_field_plans_as_the_carried_one():
    """With max_context_transitions = layers x band (4 transitions), a fresh context holds all a window model can
    see, so it plans as the carried cache does: what carrying adds is only what lies beyond it."""
    model, disc = make_model(seed=2, attention="window"), make_discretizer()
    cfg = dataclasses.replace(CONFIGS[2], carry_context=True)
    carried = Planner(BeamSearch(model, disc, cfg, 0.99), np.arange(DS), n_envs=2)
    fresh = Planner(BeamSearch(model, disc, dataclasses.replace(cfg, carry_context=False), 0.99), np.arange(DS),
                    n_envs=2)
    for x, y in zip(*run_planners([carried, fresh], steps=9), strict=True):
        assert x.log_likelihood == pytest.approx(y.log_likelihood, abs=1e-10)


def test_carried_context_restores_bit_for_bit_and_is_window_only():
    """A carried cache rebuilt from a restored episode's tokens gives the plans of the cache built step by step,
    bit for bit in float32 (a resumed evaluation); an absolute model cannot carry its context."""
    model, disc = make_model(seed=3, attention="window", dtype=torch.float32), make_discretizer()
    cfg = dataclasses.replace(CONFIGS[0], carry_context=True)
    live, resumed = (Planner(BeamSearch(model, disc, cfg, 0.99), np.arange(DS)) for _ in range(2))
    rng = np.random.default_rng(1)
    live.reset(0, seed=7)
    for t in range(12):
        if t == 6:
            resumed.reset(0, seed=7)
            resumed.restore(0, json.loads(json.dumps(live.state(0))))
        obs = rng.normal(size=DS)
        action = live.act(obs)
        if t >= 6:
            np.testing.assert_array_equal(resumed.act(obs), action)
            assert resumed.last_plans[0].log_likelihood == live.last_plans[0].log_likelihood
            resumed.observe(float(t))
        live.observe(float(t))
    assert len(live.carried[0].tokens) == 11 * T  # the executed transitions; each search encodes its observation
    with pytest.raises(ValueError, match="plan.carry_context = true needs a window model"):
        BeamSearch(make_model(), disc, cfg, 0.99)
    window_run = Run(path=None, model=model, discretizer=disc, config=Config(), meta={"obs_indices": list(range(DS))})
    assert plan_config(window_run, ["plan.carry_context=true"]).carry_context is True
    assert plan_config(window_run).carry_context is True and plan_config(fake_run()).carry_context is False


# ---------------------------------------------------------------- semantics


def test_stop_is_never_an_action_and_terminates_rows():
    """A model that always predicts stop: actions are still bins, the first decoded observation stops the row."""
    model, disc = constant_stop_model(1.0), make_discretizer()  # stop logit 16, every bin 0
    cfg = PlanConfig(beam_width=4, n_expand=2, horizon=4, max_context_transitions=2)
    (plan,) = BeamSearch(model, disc, cfg, 0.9).search([random_prefix(1, np.random.default_rng(0))],
                                                       generators([0]))
    assert np.all(np.isfinite(plan.actions[0]))
    assert plan.steps == 1
    assert np.isnan(plan.next_observations).all() and np.isnan(plan.actions[1:]).all()
    # Score frozen after step 0: r_0 + gamma V_0 (uniform bins: the mean midpoints).
    r, v = disc.midpoints[T - 2].mean(), disc.midpoints[T - 1].mean()
    assert plan.score == pytest.approx(r + 0.9 * v, abs=1e-9)
    assert np.isfinite([plan.rewards[0], plan.values[0]]).all()
    assert np.isnan(plan.rewards[1:]).all() and np.isnan(plan.values[1:]).all()  # after the termination


@pytest.mark.parametrize("always_stop", [True, False])
def test_planner_replans_where_the_plan_predicted_a_termination(always_stop, monkeypatch):
    """plan_freq 3: a plan whose first predicted state is stop (steps 1) is used for one action, then the planner
    searches again, never stepping into its NaN actions; a plan that lives 4 steps serves 3 actions."""
    model, disc = constant_stop_model(1.0 if always_stop else -1.0), make_discretizer()  # stop logit 16 or -16
    cfg = PlanConfig(beam_width=4, n_expand=2, horizon=4, max_context_transitions=2, plan_freq=3)
    planner = Planner(BeamSearch(model, disc, cfg, 0.9), np.arange(DS))
    searches = []
    search = planner.search.search
    monkeypatch.setattr(planner.search, "search", lambda *a: searches.append(search(*a)) or searches[-1])
    rng = np.random.default_rng(0)
    for _ in range(3):
        assert np.isfinite(planner.act(rng.normal(size=DS))).all()
        planner.observe(0.0)
    assert [p.steps for (p,) in searches] == ([1, 1, 1] if always_stop else [4])


@pytest.mark.parametrize("objective", ["reward", "likelihood", "penalized"])
def test_objective_scores_and_best_row(objective, monkeypatch):
    model, disc = make_model(seed=3, head_std=0.1), make_discretizer()
    cfg = PlanConfig(beam_width=4, n_expand=3, horizon=3, max_context_transitions=3, objective=objective,
                     penalty_lambda=2.0)
    search = BeamSearch(model, disc, cfg, 0.95)
    ranks = []
    rank = search._rank
    monkeypatch.setattr(search, "_rank", lambda rows: ranks.append(rank(rows)) or ranks[-1])
    (plan,) = search.search([random_prefix(2, np.random.default_rng(1))], generators([3]))
    assert plan.steps == cfg.horizon  # the small head never makes stop the argmax
    assert plan.score == pytest.approx(float(ranks[-2].max()), abs=1e-12)  # [-1] is the final re-read
    reward_score = sum(0.95**t * plan.rewards[t] for t in range(3)) + 0.95**3 * plan.values[-1]
    expected = {"reward": reward_score, "likelihood": plan.log_likelihood,
                "penalized": reward_score + 2.0 * plan.log_likelihood / (3 * T - DS)}[objective]
    assert plan.score == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_plan_bookkeeping_matches_one_plain_forward_pass_of_its_tokens(attention):
    """Each env's best plan against a plain forward pass over its own tokens (no cache, no beam): the summed
    log-probability of its generated tokens, the expected reward and value at each step, the reward score and the
    action tokens. Checks that the rows' search state moves with the decoder's rows through every re-order."""
    model, disc = make_model(seed=5, head_std=0.1, attention=attention), make_discretizer()
    cfg = PlanConfig(beam_width=4, n_expand=3, horizon=2, max_context_transitions=SEQ, cdf_act=0.8)
    search = BeamSearch(model, disc, cfg, 0.9)
    rng = np.random.default_rng(7)
    prefixes = [random_prefix(1, rng), random_prefix(1, rng)]  # 1 transition + obs: no crop within the search
    plans = search.search(prefixes, generators([1, 2]))
    mid = torch.as_tensor(disc.midpoints)
    for k, (prefix, plan) in enumerate(zip(prefixes, plans, strict=True)):
        generated = search.decoder.generated[k * cfg.beam_width]  # rows are sorted best-first within each env
        seq = torch.cat([prefix, generated])
        with torch.no_grad():
            logits = model(seq[None, :-1])[0, len(prefix) - 1 :]  # the logits of each generated token
        dims = (torch.arange(len(prefix), len(seq)) % T)
        local = torch.where(generated == model.config.stop_id, N, generated - dims * N)
        logp = logits.log_softmax(-1).gather(1, local[:, None]).sum()
        assert plan.steps == cfg.horizon and plan.log_likelihood == pytest.approx(float(logp), abs=1e-9)
        for t in range(cfg.horizon):
            at = t * T + DA  # the reward token of step t (each step: dA actions, reward, value, dS observations)
            r = float(logits[at, :N].softmax(-1) @ mid[T - 2])
            v = float(logits[at + 1, :N].softmax(-1) @ mid[T - 1])
            assert (plan.rewards[t], plan.values[t]) == pytest.approx((r, v), abs=1e-9)
            assert np.array_equal(plan.action_tokens[t], generated[t * T : t * T + DA].numpy())
        score = sum(0.9**t * plan.rewards[t] for t in range(cfg.horizon)) + 0.9**cfg.horizon * plan.values[-1]
        assert plan.score == pytest.approx(score, abs=1e-9)


def test_objectives_choose_different_plans():
    model, disc = make_model(seed=4), make_discretizer()
    prefix = [random_prefix(2, np.random.default_rng(2))]
    plans = {}
    for objective in ("reward", "likelihood"):
        cfg = PlanConfig(beam_width=8, n_expand=2, horizon=3, max_context_transitions=3, objective=objective)
        (plans[objective],) = BeamSearch(model, disc, cfg, 0.99).search(prefix, generators([0]))
    assert plans["likelihood"].log_likelihood > plans["reward"].log_likelihood
    reward_of = {k: sum(0.99**t * p.rewards[t] for t in range(3)) + 0.99**3 * p.values[-1] for k, p in plans.items()}
    assert reward_of["reward"] > reward_of["likelihood"]


# ---------------------------------------------------------------- bad input


def fake_run(plan: PlanConfig | None = None) -> Run:
    cfg = Config()
    if plan is not None:
        cfg.plan = plan
    return Run(path=None, model=make_model(), discretizer=make_discretizer(), config=cfg,
               meta={"obs_indices": list(range(DS))})


@pytest.mark.parametrize("override, message", [
    ("plan.beam_width=0", "plan.beam_width must be >= 1"),
    ("plan.horizon=0", "plan.horizon must be >= 1"),
    ("plan.cdf_act=0", "plan.cdf_act must be in (0, 1]"),
    ("plan.cdf_act=1.5", "plan.cdf_act must be in (0, 1]"),
    ("plan.max_context_transitions=1", "plan.max_context_transitions must be >= 2"),
    ("plan.objective=greedy", "plan.objective = 'greedy' is not valid"),
    ("plan.num_threads=-1", "plan.num_threads must be >= 0"),
    ("train.max_steps=3", "only plan.* keys"),
    ("plan.carry_context=true", "plan.carry_context = true needs model.attention = \"window\""),
])
def test_bad_plan_settings_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as err:
        plan_config(fake_run(), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_context_longer_than_training_window_is_an_error():
    run = fake_run(PlanConfig(max_context_transitions=SEQ + 1))
    with pytest.raises(ValueError, match=r"max_context_transitions = 5 .* set plan.max_context_transitions <= 4"):
        Planner.from_run(run, dtype=torch.float64)


def test_act_twice_without_observe_is_an_error():
    planner = Planner.from_run(fake_run(PlanConfig(beam_width=2, horizon=2, max_context_transitions=2)))
    planner.act(np.zeros(DS))
    state = planner.generators[0].get_state()
    with pytest.raises(ValueError, match="without observe"):
        planner.act(np.zeros(DS))
    assert torch.equal(planner.generators[0].get_state(), state)  # refused before replanning


def test_plan_config_fits_the_context_to_the_model_unless_set():
    """A model trained on windows of 4 transitions plans with 4 under a [plan] of 5, as the protocol does; an
    explicit plan.max_context_transitions stays what it says (and the planner refuses it)."""
    run = fake_run(PlanConfig(max_context_transitions=5))
    assert plan_config(run).max_context_transitions == SEQ
    explicit = plan_config(run, ["plan.max_context_transitions=5"])
    with pytest.raises(ValueError, match="set plan.max_context_transitions <= 4"):
        Planner.from_run(run, explicit)


def test_planner_leaves_the_runs_model_as_it_is_and_checks_observations():
    run = fake_run(PlanConfig(beam_width=2, horizon=2, max_context_transitions=2))
    run.meta["raw_obs_dim"] = DS
    before = {name: p.clone() for name, p in run.model.named_parameters()}
    planner = Planner.from_run(run, dtype=torch.bfloat16)
    assert next(planner.search.model.parameters()).dtype == torch.bfloat16
    for name, p in run.model.named_parameters():  # a planner in another dtype next gets the run's own weights
        assert p.dtype == before[name].dtype and torch.equal(p, before[name]), name
    for obs in (np.zeros(DS + 2), np.zeros((1, DS))):
        with pytest.raises(ValueError, match=rf"observation of shape .*trained on {DS}-dim observations"):
            planner.act(obs)


def test_critic_objective_scores_rows_with_the_critic_and_changes_plans():
    """objective = critic: rows rank by sum_{i<t} gamma^i r_i + gamma^t Q(s_t, a_t); a critic that likes large
    first action dims makes the planner pick them."""
    model, disc = make_model(seed=5), make_discretizer()
    prefix = [random_prefix(2, np.random.default_rng(3))]
    calls = []

    def critic(obs, act):
        calls.append((obs.shape, act.shape))
        return 100.0 * act[:, 0]

    cfg = PlanConfig(beam_width=6, n_expand=2, horizon=3, max_context_transitions=3, cdf_act=None)
    (reward_plan,) = BeamSearch(model, disc, cfg, 0.9).search(prefix, generators([0]))
    critic_cfg = dataclasses.replace(cfg, objective="critic", critic="(in memory)")
    (critic_plan,) = BeamSearch(model, disc, critic_cfg, 0.9, critic=critic).search(prefix, generators([0]))
    assert calls and calls[0] == ((12, DS), (12, DA))  # B x E rows, decoded states and actions
    assert critic_plan.actions[-1, 0] > reward_plan.actions[-1, 0]
    expected = sum(0.9**i * critic_plan.rewards[i] for i in range(2)) + 0.9**2 * 100.0 * critic_plan.actions[2, 0]
    assert critic_plan.score == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="needs a critic"):
        BeamSearch(model, disc, critic_cfg, 0.9)
