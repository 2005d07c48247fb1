"""Rollout throughput: p3o_jax's batched KV-cache sampler vs transformers' PyTorch `generate`.

Both run the same random GPT-2 (built with transformers, loaded into JAX with
`p3o_jax.hf.load_pretrained`) on the same prompts and sampling settings. Default shapes are
workload W1: 4 layers, d_model 256, 4 heads, vocab 8192, float32; 16 prompts x 2 responses,
prompts of 64 tokens, exactly 48 new tokens per response (EOS disabled).

Prints one JSON line per implementation: tokens/s = generated tokens / median wall time over
`--repeats` runs after one warm-up (compile) run, each run synchronised (block_until_ready).

    .venv/bin/python bench/generate.py [--top-k 50 --top-p 0.95 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from p3o_jax import sampler as S
from p3o_jax.hf import load_pretrained


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--responses", type=int, default=2, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


def timed(fn, repeats):
    """(seconds of the first call, list of seconds of `repeats` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def report(impl, first, times, n_tokens, shapes, **extra):
    median = statistics.median(times)
    print(json.dumps(dict(impl=impl, tokens_per_s=round(n_tokens / median, 1),
                          median_s=round(median, 4), times_s=[round(t, 4) for t in times],
                          first_call_s=round(first, 3), **shapes, **extra)), flush=True)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    B, n, P, N = args.prompts, args.responses, args.prompt_len, args.new_tokens
    shapes = dict(prompts=B, responses=n, prompt_len=P, new_tokens=N, layers=args.layers,
                  d_model=args.d_model, heads=args.heads, vocab=args.vocab,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  backend=jax.default_backend(), threads=args.threads,
                  loadavg_1min=round(os.getloadavg()[0], 2))

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, n_positions=P + N)
    torch_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        torch_model.save_pretrained(d)
        cfg, params = load_pretrained(d)

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (B, P)).astype(np.int32)
    prompt_mask = np.ones((B, P), np.int32)
    scfg = S.SamplingConfig(max_new_tokens=N, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p)   # eos_id=None: every response has N tokens
    n_tokens = B * n * N

    key = jax.random.key(0)
    pairs = lambda: jax.block_until_ready(S.sample_pairs(
        params, cfg, scfg, jnp.asarray(prompts), jnp.asarray(prompt_mask), key, n=n))
    first, times = timed(pairs, args.repeats)
    assert int(pairs().mask.sum()) == n_tokens
    report("p3o_jax.sample_pairs", first, times, n_tokens, shapes)

    rep_prompts, rep_mask = jnp.repeat(prompts, n, 0), jnp.repeat(prompt_mask, n, 0)
    keys = S.pair_keys(key, B, n)
    gen = lambda: jax.block_until_ready(
        S.generate(params, cfg, scfg, rep_prompts, rep_mask, keys))
    first, times = timed(gen, args.repeats)
    compiled = S.generate.lower(params, cfg, scfg, rep_prompts, rep_mask, keys).compile()
    cache_bytes = 2 * cfg.n_layers * B * n * (P + N) * cfg.d_model * 4
    report("p3o_jax.generate (prompts repeated)", first, times, n_tokens, shapes,
           kv_cache_bytes=cache_bytes,
           xla_temp_bytes=compiled.memory_analysis().temp_size_in_bytes)

    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.as_tensor(prompt_mask, dtype=torch.long)

    def hf():
        with torch.inference_mode():
            out = torch_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                num_return_sequences=n, max_new_tokens=N, min_new_tokens=N,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                pad_token_id=0, eos_token_id=None)
        assert out.shape == (B * n, P + N)
    first, times = timed(hf, args.repeats)
    report("transformers.generate (torch)", first, times, n_tokens, shapes,
           torch_version=torch.__version__)


if __name__ == "__main__":
    main()
