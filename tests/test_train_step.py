"""The optimised training step against a plain reference, its dropout, the budget schedule, and the GPU path."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trajformer.config import load_config
from trajformer.model import GPT, GPTConfig, additive, attend, attention_mask, drop_mask, dropout, token_losses
from trajformer.tokens import TokenWindows, loss_weights
from trajformer.train import resolve_dtype, schedule, train_step

CFG = GPTConfig(obs_dim=3, act_dim=2, n_bins=10, block_size=3 * 7 - 1, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's forward written plainly: SDPA under the boolean mask, per-slot heads by a Python loop."""
    B, t = idx.shape
    x = model.wte(idx) + model.wpe(torch.arange(t))
    for block in model.blocks:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(x.shape[-1], dim=2)
        q, k, v = (z.view(B, t, block.attn.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=model.mask[:t, :t])
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, t, -1))
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
    x = model.ln_f(x)
    T = model.config.transition_dim
    return torch.stack([x[:, p] @ model.head[p % T] for p in range(t)], dim=1)


def _windows(seed: int = 0) -> TokenWindows:
    rng = np.random.default_rng(seed)
    eps = [rng.integers(0, CFG.n_bins, (n, CFG.transition_dim)) for n in (9, 14)]
    return TokenWindows(eps, [True, False], CFG.n_bins, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimised_step_equals_reference_step(dtype):
    """Loss, gradients and the updated weights of `train_step` equal a plain masked-SDPA step."""
    windows = _windows()
    weights = loss_weights(CFG.obs_dim, CFG.act_dim, 3, 5.0, 1.0, 1.0).to(dtype)
    ids = torch.tensor([0, 3, 5, 8, 12, 20])
    torch.manual_seed(0)
    fast = GPT(CFG).to(dtype).train()
    ref = GPT(CFG).to(dtype).train()
    ref.load_state_dict(fast.state_dict())
    opt_fast = fast.configure_optimizers(0.1, 1e-3)
    opt_ref = ref.configure_optimizers(0.1, 1e-3)

    loss = train_step(fast, opt_fast, windows, ids, weights, autocast=False, grad_clip=1.0)
    x, y, mask = windows.batch(ids)
    ce = token_losses(reference_forward(ref, x), y)
    ref_loss = (ce * weights * mask).sum() / mask.sum()
    opt_ref.zero_grad()
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    opt_ref.step()

    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-10)  # float32: summation order
    assert float(loss) == pytest.approx(float(ref_loss.detach()), abs=atol, rel=rtol)
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, grads[name], atol=atol, rtol=rtol)
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)


@pytest.mark.parametrize("band", [0, 14])
@pytest.mark.parametrize("t", [20, 130, 160, 249])
def test_attend_equals_plain_masked_attention(t, band):
    """`attend` (keys padded to 16, queries in two causal blocks from 128 keys on) equals softmax attention under
    the full mask (causal, or a window model's band), values and gradients, in float64: a split that let a query
    miss a visible key fails it."""
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(3, t, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = attention_mask(torch.arange(t), t, torch.zeros(1, dtype=torch.long), 7, band)
    bias = additive(full[0, 0], torch.float64)
    plain = ((q @ k.transpose(1, 2)) * 8**-0.5 + bias).softmax(-1) @ v
    fast = attend(q, k, v, bias, 0.0)
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=1e-12)
    up = torch.randn(plain.shape, generator=gen, dtype=torch.float64)
    g_plain = torch.autograd.grad((plain * up).sum(), (q, k, v))
    g_fast = torch.autograd.grad((fast * up).sum(), (q, k, v))
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_dropout_rate_scale_and_reproducibility():
    torch.manual_seed(1)
    drop = drop_mask(torch.Size([400, 1000]), 0.1)
    assert abs(float(drop.float().mean()) - 0.1) < 3e-3  # 400k draws: the standard error is 5e-4
    cols = drop.float().mean(0)  # no column or row pattern from the 16-bit slicing
    assert float(cols.std()) < 0.02
    x = torch.ones(200, 500)
    y = dropout(x, 0.1, training=True)
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9) and len(values) == 2
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert torch.equal(dropout(x, 0.1, training=False), x)
    torch.manual_seed(5)
    a = dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.3, True))


def test_training_windows_budget_sets_the_schedule():
    cfg = load_config(None, ["train.max_windows=10000", "train.batch_size=64"])
    batch, per_epoch, total, warmup = schedule(cfg, n_windows=5000)
    assert (batch, per_epoch, total) == (64, 78, math.ceil(10000 / 64))
    assert warmup == min(per_epoch, int(cfg.train.warmup_fraction * total))
    with pytest.raises(ValueError, match="set one training length"):
        load_config(None, ["train.max_windows=10000", "train.max_steps=5"])


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_dtype_auto_picks_bf16_only_where_the_cpu_has_bf16_instructions():
    # oneDNN calls bf16 supported on any AVX512 CPU, where it is emulated and slower than float32.
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_dtype("float32", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_step_matches_cpu_step():
    windows, ids = _windows(), torch.tensor([0, 3, 5, 8])
    weights = loss_weights(CFG.obs_dim, CFG.act_dim, 3, 5.0, 1.0, 1.0)
    torch.manual_seed(0)
    cpu = GPT(CFG).train()
    gpu = GPT(CFG).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    a = train_step(cpu, cpu.configure_optimizers(0.1, 1e-3), windows, ids, weights, False, 1.0)
    b = train_step(gpu, gpu.configure_optimizers(0.1, 1e-3), _windows().to("cuda"), ids, weights.cuda(), False, 1.0)
    assert abs(float(a.detach()) - float(b.detach())) < 1e-4
