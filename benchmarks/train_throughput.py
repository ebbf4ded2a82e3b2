"""Training throughput (target tokens/s) of the step `trajformer train` runs, against its GEMM bound and,
optionally, the official code's step, all measured in the same run.

    python benchmarks/train_throughput.py [--steps 10] [--batch 64] [--threads 0] [--official DIR] [--device cuda]

Shapes: 4 layers x 4 heads x 128, windows of 10 transitions, batch 64, 100 bins, random tokens, Hopper dims
(obs 11, act 3: 159 target tokens a window) and HalfCheetah dims (17/6: 249). Our step is
`trajformer.train.train_step` at the default settings (`train.dtype = "auto"`, AdamW, clip 1.0, the default
`model.dropout`, 0: the CPU recipe; the headline line), and with the official dropout 0.1, like for like with the
official step.

GEMM bound: every matmul of one training step (forward, and both gradient matmuls in backward, of the linear
layers, the attention scores and weighted values, and the per-slot heads) timed bare, in the step's compute
dtype, at exactly its shapes (the sequence padded to a multiple of 16 as the CPU forward runs it, attention one
head per call); vs_gemm_limit = measured step time / that sum.

--device cuda: the same step, matmuls and bound on the card (bf16 autocast where native; timings synchronise
the device); --batch 1024 shows a batch that fills it.

--official DIR: a checkout of github.com/jannerm/trajectory-transformer (its `trajectory/models/`); times its
GPT (forward with targets and mask, backward, clip, AdamW from its configure_optimizers, fp32) at the same
shapes and dropout, and reports our speed-up over it.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from trajformer.config import ModelConfig
from trajformer.model import GPT, GPTConfig
from trajformer.tokens import TokenWindows, loss_weights
from trajformer.train import resolve_dtype, train_step

DIMS = {"hopper": (11, 3), "halfcheetah": (17, 6)}
LAYERS, HEADS, WIDTH, BINS, SEQ = 4, 4, 128, 100, 10
CPU = torch.device("cpu")


def timed(fn, steps: int, warmup: int = 3, device: torch.device = CPU) -> float:
    """Seconds per call of fn, after warm-up calls (a CUDA device synchronised before each clock read)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def ours(obs: int, act: int, batch: int, steps: int, dropout: float = ModelConfig.dropout,
         device: torch.device = CPU) -> tuple[float, str]:
    """Seconds per `train_step` of our model on random token windows, and the compute dtype it used."""
    torch.manual_seed(0)
    T = obs + act + 2
    cfg = GPTConfig(obs_dim=obs, act_dim=act, n_bins=BINS, block_size=SEQ * T - 1, n_layer=LAYERS, n_head=HEADS,
                    n_embd=WIDTH, dropout=dropout)
    model = GPT(cfg).train().to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4)
    rng = np.random.default_rng(0)
    windows = TokenWindows([rng.integers(0, BINS, (4096, T))], [False], BINS, SEQ)
    windows.to(device)
    weights = loss_weights(obs, act, SEQ, 5.0, 1.0, 1.0).to(device)
    dtype = resolve_dtype("auto", device)
    ids = [torch.from_numpy(rng.integers(0, len(windows), batch)) for _ in range(steps + 3)]
    it = iter(ids)
    return timed(lambda: train_step(model, optimizer, windows, next(it), weights, dtype == "bfloat16", 1.0),
                 steps, device=device), dtype


def gemm_shapes(obs: int, act: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every matmul in one training step: forward y = x w and backward dx = dy w^T,
    dw = x^T dy for each layer; scores, weighted values and their four gradient matmuls; the slot heads."""
    T = obs + act + 2
    t = -(-(SEQ * T - 1) // 16) * 16  # the CPU forward runs the sequence padded to a multiple of 16
    M, C, d = batch * t, WIDTH, WIDTH // HEADS
    shapes = []
    for k, n in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):  # qkv, attention output, MLP in, MLP out
        shapes += [(1, M, k, n), (1, M, n, k), (1, k, M, n)]
    attention = [(batch, t, d, t), (batch, t, t, d),  # q k^T, weights v (one head per call)
                 (batch, t, d, t), (batch, t, t, d),  # d weights = dy v^T, d v = weights^T dy
                 (batch, t, t, d), (batch, t, t, d)]  # d q = d scores k, d k = d scores^T q
    shapes = shapes * LAYERS + attention * HEADS * LAYERS
    rows = batch * SEQ  # per slot: one row per transition
    V = BINS + 1
    shapes += [(T, rows, C, V), (T, rows, V, C), (T, C, rows, V)]
    return shapes


def gemm_bound(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, steps: int,
               device: torch.device = CPU) -> tuple[float, float]:
    """(seconds, FLOPs) of bare matmuls of `shapes` in `dtype`."""
    seconds, flops = 0.0, 0.0
    for b, m, k, n in set(shapes):
        count = shapes.count((b, m, k, n))
        x, w = torch.randn(b, m, k, dtype=dtype, device=device), torch.randn(b, k, n, dtype=dtype, device=device)
        fn = (lambda x=x, w=w: x[0] @ w[0]) if b == 1 else (lambda x=x, w=w: torch.bmm(x, w))
        seconds += count * timed(fn, steps, device=device)
        flops += count * 2.0 * b * m * k * n
    return seconds, flops


def official(repo: str, obs: int, act: int, batch: int, steps: int) -> float:
    """Seconds per training step of the official GPT (jannerm/trajectory-transformer) at the same shapes."""
    sys.path.insert(0, repo)
    from trajectory.models.transformers import GPT as OfficialGPT  # noqa: PLC0415  (optional, outside deps)

    torch.manual_seed(0)
    T = obs + act + 2
    cfg = SimpleNamespace(vocab_size=BINS, block_size=SEQ * T - 1, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                          observation_dim=obs, action_dim=act, transition_dim=T, action_weight=5, reward_weight=1,
                          value_weight=1, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    model = OfficialGPT(cfg).train()
    optimizer = model.configure_optimizers(SimpleNamespace(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95)))
    x = torch.randint(0, BINS, (batch, cfg.block_size))
    y = torch.randint(0, BINS + 1, (batch, cfg.block_size))
    mask = torch.ones(batch, cfg.block_size)

    def step() -> None:
        _, loss = model(x, targets=y, mask=mask)
        model.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after 3 warm-up)")
    parser.add_argument("--batch", type=int, default=64, help="windows per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--official", metavar="DIR", help="checkout of jannerm/trajectory-transformer to time too")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the step on a card")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.official and device.type != "cpu":
        parser.error("--official times the official step on the CPU only; drop --device or --official")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, {args.steps} steps, "
          f"{LAYERS}x{HEADS}x{WIDTH}, windows of {SEQ} transitions")
    speed, ratio = {}, None
    for env, (obs, act) in DIMS.items():
        tokens = args.batch * (SEQ * (obs + act + 2) - 1)
        step, dtype = ours(obs, act, args.batch, args.steps, device=device)
        bound, flops = gemm_bound(gemm_shapes(obs, act, args.batch), getattr(torch, dtype), args.steps, device)
        speed[env] = tokens / step
        line = (f"{env:12s} ours {step * 1e3:7.1f} ms/step {speed[env]:9,.0f} tokens/s ({dtype}, dropout "
                f"{ModelConfig.dropout}); GEMM bound {bound * 1e3:6.1f} ms ({flops / 1e9:.1f} GFLOP at "
                f"{flops / bound / 1e9:.0f} GFLOP/s), step/bound {step / bound:.2f}")
        if env == "hopper":
            ratio = step / bound
        if args.official:
            like, _ = ours(obs, act, args.batch, args.steps, dropout=0.1)
            ref = official(args.official, obs, act, args.batch, args.steps)
            line += (f"\n{'':12s} dropout 0.1 (official's) ours {like * 1e3:7.1f} ms/step {tokens / like:9,.0f} "
                     f"tokens/s; official {ref * 1e3:.1f} ms/step {tokens / ref:,.0f} tokens/s; ours {ref / like:.2f}x "
                     f"like for like, {ref / step:.2f}x at our defaults")
        print(line, flush=True)
    print(f"train_throughput hopper_tokens_per_s={speed['hopper']:.0f} "
          f"halfcheetah_tokens_per_s={speed['halfcheetah']:.0f} vs_gemm_limit={ratio:.2f}")


if __name__ == "__main__":
    main()
