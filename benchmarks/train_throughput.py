"""Training throughput (target tokens/s) of the hopper-sized GPT on this machine, float32 vs bfloat16.

    python benchmarks/train_throughput.py [--steps 20] [--batch 64] [--threads 0]

Hopper dims (obs 11, act 3: 16 tokens per transition), 4 layers x 4 heads x 128, windows of 10 transitions,
one full optimiser step (forward, weighted masked loss, backward, clip, AdamW) per batch on random tokens.
"""

import argparse
import sys
import time

import torch

from trajformer.model import GPT, GPTConfig, token_losses


def measure(dtype: str, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    cfg = GPTConfig(obs_dim=11, act_dim=3, n_bins=100, block_size=10 * 16 - 1, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg).train()
    opt = model.configure_optimizers(0.1, 6e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.n_bins + 1, (batch, cfg.block_size))
    mask = torch.ones(batch, cfg.block_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
        loss = (token_losses(logits, y) * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * cfg.block_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps")
    results = {dtype: measure(dtype, args.steps, args.batch) for dtype in ("float32", "bfloat16")}
    for dtype, tok_s in results.items():
        print(f"{dtype:9s} {tok_s:10,.0f} tokens/s")
    print(f"train_throughput float32={results['float32']:.0f} bfloat16={results['bfloat16']:.0f} "
          f"bf16_vs_fp32={results['bfloat16'] / results['float32']:.2f}")


if __name__ == "__main__":
    main()
