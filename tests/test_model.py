"""The GPT's masks: causal, and no position sees a value column; the cached path equals the full pass."""

import pytest
import torch
import torch.nn.functional as F

import trajformer.model as model_module
from trajformer.model import GPT, GPTConfig, KVCache

CFG = GPTConfig(obs_dim=3, act_dim=2, n_bins=10, block_size=4 * 7 - 1, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
T = CFG.transition_dim


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).double().eval()


def _tokens(batch: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.n_bins, (batch, t), generator=g) + (torch.arange(t) % T) * CFG.n_bins


def test_changing_a_token_changes_no_earlier_logit():
    model, x = _model(), _tokens(1, CFG.block_size)
    base = model(x)
    for p in range(0, CFG.block_size, 3):
        changed = x.clone()
        changed[0, p] = (p % T) * CFG.n_bins + (x[0, p] - (p % T) * CFG.n_bins + 1) % CFG.n_bins
        out = model(changed)
        assert torch.equal(out[0, :p], base[0, :p])
        if (p % T) != T - 1:
            assert not torch.allclose(out[0, p:], base[0, p:])  # the change is visible downstream


def test_value_tokens_are_invisible_to_every_other_position():
    model, x = _model(), _tokens(1, CFG.block_size)
    base = model(x)
    for p in range(T - 1, CFG.block_size, T):  # every value column
        changed = x.clone()
        changed[0, p] = (T - 1) * CFG.n_bins + (x[0, p] - (T - 1) * CFG.n_bins + 3) % CFG.n_bins
        out = model(changed)
        others = torch.ones(CFG.block_size, dtype=torch.bool)
        others[p] = False
        assert torch.allclose(out[0, others], base[0, others], atol=1e-12)
        assert not torch.allclose(out[0, p], base[0, p])  # its own logits still see the token itself


def test_cached_decoding_matches_full_forward_with_ragged_rows_and_reordering():
    model, x = _model(), _tokens(3, 20)
    cache = KVCache(CFG, max_rows=6, max_len=27, dtype=torch.float64)
    # Row 1 is left-padded by one transition: its tokens are x[1, :13] at positions 7..19.
    pad = torch.tensor([0, T, 0])
    ragged = x.clone()
    ragged[1, T:] = x[1, : 20 - T]
    cache.reset(pad)
    logits = model.forward_cached(ragged[:, :10], cache, all_logits=True)
    assert torch.allclose(logits[0], model(x[:1, :10])[0], atol=1e-10)
    assert torch.allclose(logits[1, T:], model(x[1:2, : 10 - T])[0], atol=1e-10)
    for i in range(10, 15):
        last = model.forward_cached(ragged[:, i : i + 1], cache)
        assert torch.allclose(last[0], model(x[:1, : i + 1])[0, -1], atol=1e-10)
        assert torch.allclose(last[1], model(x[1:2, : i + 1 - T])[0, -1], atol=1e-10)
    # Re-ranking: rows (2, 2, 0) continue exactly as their sources would.
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = ragged[[2, 2, 0], 15:16]
    last = model.forward_cached(nxt, cache)
    assert torch.allclose(last[0], model(x[2:3, :16])[0, -1], atol=1e-10)
    assert torch.allclose(last[1], last[0]) and torch.allclose(last[2], model(x[:1, :16])[0, -1], atol=1e-10)


def test_weight_decay_only_on_matmul_weights():
    model = _model()
    decay, no_decay = model.configure_optimizers(0.1, 1e-3).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.head) in decayed and id(model.blocks[0].attn.c_attn.weight) in decayed
    assert id(model.wte.weight) not in decayed and id(model.blocks[0].ln_1.weight) not in decayed


WCFG = GPTConfig(obs_dim=3, act_dim=2, n_bins=10, block_size=4 * 7 - 1, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                 attention="window", window=2 * T)


def _window_model() -> GPT:
    torch.manual_seed(1)
    return GPT(WCFG).double().eval()


def test_window_model_sees_at_most_layers_times_band_back():
    """Each layer looks W - 1 tokens back, so a token more than n_layer * (W - 1) back cannot move a logit;
    one inside the band does."""
    model = _window_model()
    t = 6 * T
    x = _tokens(1, t, seed=3)
    base = model(x)
    q = t - 1
    far = q - WCFG.n_layer * (WCFG.window - 1) - 1  # no path of n_layer band hops reaches it
    changed = x.clone()
    changed[0, far] = (far % T) * WCFG.n_bins + (x[0, far] - (far % T) * WCFG.n_bins + 1) % WCFG.n_bins
    assert torch.equal(model(changed)[0, q], base[0, q])
    near = q - WCFG.window + 1  # the oldest key the band shows the query directly
    if near % T == T - 1:
        near += 1
    changed = x.clone()
    changed[0, near] = (near % T) * WCFG.n_bins + (x[0, near] - (near % T) * WCFG.n_bins + 1) % WCFG.n_bins
    assert not torch.allclose(model(changed)[0, q], base[0, q])


def test_window_model_is_shift_invariant():
    """Rotary positions: the same tokens give the same logits wherever the sequence starts (a transition later)."""
    model = _window_model()
    x = _tokens(1, 5 * T, seed=4)
    shifted = torch.cat([_tokens(1, T, seed=5), x], dim=1)
    # Beyond n_layer * W tokens from the start the prepended transition is out of reach.
    reach = WCFG.n_layer * WCFG.window
    torch.testing.assert_close(model(shifted)[0, T + reach :], model(x)[0, reach:], atol=1e-10, rtol=0)


def test_window_cache_compacts_and_stays_exact_with_ragged_rows_and_reordering():
    model = _window_model()
    t = 9 * T  # far longer than the cache: it drops keys from its front several times
    x = _tokens(3, t, seed=6)
    cache = KVCache(WCFG, max_rows=3, max_len=WCFG.window + 5, dtype=torch.float64)
    pad = torch.tensor([0, T, 0])  # row 1 starts one transition later
    ragged = x.clone()
    ragged[1, T:] = x[1, : t - T]
    cache.reset(pad)
    first = model.forward_cached(ragged[:, : 2 * T], cache, all_logits=True)
    torch.testing.assert_close(first[0], model(x[:1, : 2 * T])[0], atol=1e-10, rtol=0)
    full = [model(x[k : k + 1])[0] for k in range(3)]
    source = [0, 1, 2]
    for i in range(2 * T, t):
        if i == 5 * T:  # re-ranking: rows (1, 1, 0) continue as their sources would
            cache.reorder(torch.tensor([1, 1, 0]))
            ragged, pad, source = ragged[[1, 1, 0]], pad[[1, 1, 0]], [1, 1, 0]
        last = model.forward_cached(ragged[:, i : i + 1], cache)
        for r in range(3):
            torch.testing.assert_close(last[r], full[source[r]][i - int(pad[r])], atol=1e-10, rtol=0)
    assert cache.offset > 0


def test_bf16_linear_without_native_bf16_rounds_once_from_float32(monkeypatch):
    """On a CPU without native bf16 matmuls a planning (no-grad) bf16 Linear multiplies float32 copies of its bf16
    operands: its output is the exact result rounded once to bf16 (within a step of it, from float32 accumulation);
    under autograd it is nn.Linear's own, and the gradient reaches the weights."""
    torch.manual_seed(0)
    layer = model_module.Linear(128, 384).to(torch.bfloat16)
    x = torch.randn(300, 128).to(torch.bfloat16)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    monkeypatch.setattr(model_module, "cpu_bf16", lambda: False)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16))
    assert bool(((y.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-6).all())
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("attention", ["absolute", "window"])
def test_an_encoded_row_is_the_same_bits_alone_and_among_others(attention, threads, torch_threads):
    """A float32 row's logits and cached keys from a chunked, left-padded encode (a first chunk, then 1-15 tokens)
    do not depend on the rows encoded beside it, at one and at two threads: SDPA's CPU kernel split its work by
    batch size under threads (a 3-token chunk differed at two), and few-row weight matmuls round otherwise."""
    T = 16
    torch.manual_seed(0)
    cfg = GPTConfig(obs_dim=11, act_dim=3, n_bins=100, block_size=10 * T - 1, n_layer=2, n_head=4, n_embd=128,
                    dropout=0.0, attention=attention, window=5 * T if attention == "window" else 0)
    model = GPT(cfg).eval()
    pads = torch.tensor([0, 3, 16, 0, 5, 7, 0, 2, 9])
    with torch_threads(threads), torch.no_grad():
        for first, t in ((16, 3), (32, 1), (16, 11)):
            idx = torch.randint(0, 100, (len(pads), first + t)) + 100 * (torch.arange(first + t) % T)
            outs = []
            for rows in (1, 2, 5, len(pads)):
                cache = KVCache(cfg, len(pads), 96)
                cache.reset(pads[:rows])
                model.forward_cached(idx[:rows, :first], cache)
                logits = model.forward_cached(idx[:rows, first:], cache, all_logits=True)
                outs.append((logits[0], cache.k[:, 0, :, : first + t].clone()))
            for logits, keys in outs[1:]:
                assert torch.equal(logits, outs[0][0]) and torch.equal(keys, outs[0][1])
