"""Rollout throughput: p3o_jax's sampler vs transformers' PyTorch `generate` on workload W1.

A thin wrapper: `p3o_jax.bench --only iteration,torch` (the iteration's generate stage gives our
tokens/s). Any other `p3o_jax.bench` option passes through, e.g. `--top-k 50 --top-p 0.95`.

    .venv/bin/python bench/generate.py [options of python -m p3o_jax.bench]
"""
import sys

from p3o_jax.bench import main

if __name__ == "__main__":
    main(["--only", "iteration,torch", *sys.argv[1:]])
