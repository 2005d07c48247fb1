"""Performance of an RL iteration (workload W1), measured against the machine's own limits.

    python -m p3o_jax.cli.bench [dtype=bfloat16] [only=machine,iteration,torch,memory]
    make bench ARGS="dtype=bfloat16"

Workload W1: GPT-2 architecture, 4 layers, d_model 256, 4 heads, vocab 8192, float32 compute;
a policy, its frozen copy as the reference and a reward model of the same size. Per iteration
16 prompts of 64 tokens, 2 responses each of exactly 48 tokens (EOS disabled), then one P3O
update (one epoch of one minibatch, beta 0.05). The iteration is the training loop's own
`rl.RLIteration`: three compiled programs, each timed up to `block_until_ready`: generate
(`sampler.sample_pairs`), score (the reference's log-probs, the old ones too with
`recompute_old=true`, the reward model, P3O's Delta: `rollout.score` and `algos.p3o.prepare`)
and update (`train_state.make_update` of `algos.p3o.loss` under `jit_step`, state donated).
Scoring and the update run each prompt once for its n responses (`rollout.prompt_once_hidden`).
Every workload field is a key (`layers=12 d_model=768 ...`), plus `only`, `repeats`,
`torch_threads`.

Sections, one JSON line each (every line carries the load average, since the machine is often
shared): `machine` (the best float32/bfloat16 matmul rate over square sizes and the workload's
own matmul shapes; the bandwidth of an in-place update and of a sum, at DRAM size and at a
decode step's working-set size), `iteration` (stage times, medians over `repeats` iterations
after a compiling one; tokens/s; the decode step against its
bandwidth and FLOP bounds; MFU), `torch` (transformers' PyTorch `generate` on the same weights
and shapes, best over thread counts), `memory` (peak resident memory of a P3O and of a PPO
iteration, each in a fresh process).

Model FLOPs. A multiply-add is 2 FLOPs; every necessary matmul is counted once, recomputation
is not. L layers, D d_model, H heads (K kv heads) of E features, F MLP width, V vocabulary;
B prompts, n responses each, P prompt tokens, N response tokens.

    per token, trunk:           t    = 2 L (2 D H E + 2 D K E + m D F)       m = 2 (3 if gated)
    one query over s keys:      a(s) = 4 L H E s                                 (q.k and p.v)
    one position, LM head:      h    = 2 D V
    prompt, once per prompt:    pre  = P t + sum_{s=1..P} a(s)
    j response tokens after it: r(j) = sum_{i=1..j} (t + a(P + i))

    generate    = B (pre + h) + B n (r(N-1) + (N-1) h)     prefill; decode feeds N-1 tokens
    log-probs   = the same count                           (the logits of every response token)
    score       = log-probs (the reference's) + RM         RM = B pre + B n r(N) + B n 2 D
    update      = 3 x log-probs                            forward + backward of the policy
    iteration   = generate + score + update

Old log-probs are a recomputation (the sampler had them, and at theta_old the update's own
forward computes them again), so with `--recompute-old` they are timed but add no model FLOPs;
nor would a response's prompt computed once per response instead of once per prompt. MFU =
model FLOPs / time / the best matmul rate measured in the same run. `executed_gflop` counts what
the programs do run (attention over every one of the P + N key slots, where the model count has
the causal triangle; old log-probs if recomputed), so `iteration_hfu` (hardware FLOPs
utilisation) separates kernel efficiency from recomputation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import model as M
from p3o_jax import sampler as S
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import OneOf, Positive, SubsetOf
from p3o_jax.config import ConfigError, ExperimentConfig, RLConfig, tool_args
from p3o_jax.rl import RLIteration, initial_params
from p3o_jax.sharding import make_mesh
from p3o_jax.train_state import OptimConfig, make_optimizer

SECTIONS = ("machine", "iteration", "torch", "memory")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes and model of one benchmark workload; the defaults are W1."""
    family: Annotated[str, OneOf(*M.FAMILIES)] = "gpt2"
    prompts: int = 16
    responses: int = 2
    prompt_len: int = 64
    new_tokens: int = 48
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    vocab: int = 8192
    dtype: str = "float32"
    beta: float = 0.05
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    recompute_old: bool = False     # recompute pi_old's log-probs (off: the sampler's are reused)

    @property
    def name(self) -> str:
        """Prefix of the output keys: `w1` (`w1_bfloat16` with that dtype) or `custom`."""
        if dataclasses.replace(self, dtype="float32") != Workload():
            return "custom"
        return "w1" if self.dtype == "float32" else f"w1_{self.dtype}"

    @property
    def model(self) -> M.ModelConfig:
        return M.ModelConfig(family=self.family, vocab_size=self.vocab, d_model=self.d_model,
                             n_layers=self.layers, n_heads=self.heads,
                             max_len=self.prompt_len + self.new_tokens, dtype=self.dtype)

    @property
    def sampling(self) -> S.SamplingConfig:   # eos_id=None: every response has N tokens
        return S.SamplingConfig(max_new_tokens=self.new_tokens, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p)

    def experiment(self, algo: str = "p3o") -> ExperimentConfig:
        """The run config the workload's iteration uses (one epoch of one minibatch)."""
        return ExperimentConfig(algo=algo, policy=self.model, rl=RLConfig(
            prompts_per_iter=self.prompts, n_samples=self.responses, epochs=1, minibatches=1,
            beta=self.beta, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            recompute_logp_old=self.recompute_old, optim=OptimConfig(lr=1e-5, warmup_steps=0)))

    @property
    def generated_tokens(self) -> int:
        return self.prompts * self.responses * self.new_tokens


def emit(section: str, **fields):
    """One JSON line: the section, its fields, and the 1/5/15-minute load average."""
    print(json.dumps(dict(section=section, **fields,
                          loadavg=[round(x, 2) for x in os.getloadavg()])), flush=True)


def timed(fn, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn`, each synchronised, after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------
# the machine's limits

def matmul_rate(dtype, shapes, repeats: int = 7) -> dict:
    """FLOP/s of [m, k] x [k, n] matmuls, per (m, k, n): the fastest of `repeats` calls."""
    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    rates = {}
    for m, k, n in shapes:
        a = jnp.asarray(rng.standard_normal((m, k)), dtype)
        b = jnp.asarray(rng.standard_normal((k, n)), dtype)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / min(timed(lambda: matmul(a, b), repeats))
    return rates


def memory_bandwidth(mib: int, repeats: int = 5) -> dict:
    """Bytes/s of an in-place update (read + write) and of a sum (read) of `mib` MiB."""
    x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
    nbytes = x.nbytes
    total = jax.jit(jnp.sum)
    read = nbytes / min(timed(lambda: total(x), repeats))
    increment = jax.jit(lambda x: x + 1, donate_argnums=0)   # donated: no fresh output pages

    def update():
        nonlocal x
        x = increment(x)
        return x
    return {"copy": 2 * nbytes / min(timed(update, repeats)), "sum": read}


def machine_section(w: Workload) -> dict:
    """The best matmul rate over square sizes and the workload's own trunk and LM-head shapes,
    and the bandwidth of DRAM (512 MiB) and of a decode step's working set (48 MiB, which the
    last-level cache may hold)."""
    rows = w.prompts * w.responses
    tokens, heads = rows * (w.prompt_len + w.new_tokens), rows * w.new_tokens
    shapes = [(n, n, n) for n in (512, 1024, 2048)] + [
        (tokens, w.d_model, 4 * w.d_model), (tokens, 4 * w.d_model, w.d_model),
        (heads, w.d_model, w.vocab)]
    f32, bf16 = matmul_rate(jnp.float32, shapes), matmul_rate(jnp.bfloat16, shapes)
    dram, cached = memory_bandwidth(512), memory_bandwidth(48)
    limits = dict(matmul_f32=max(f32.values()), matmul_bf16=max(bf16.values()),
                  bandwidth=max(cached.values()))
    gflops = lambda rates: {k: round(v / 1e9, 1) for k, v in rates.items()}
    emit("machine", cpu_count=os.cpu_count(), backend=jax.default_backend(),
         xla_flags=os.environ.get("XLA_FLAGS", ""),
         **{"machine.matmul_gflops_f32": round(limits["matmul_f32"] / 1e9, 1),
            "machine.matmul_gflops_f32_by_shape": gflops(f32),
            "machine.matmul_gflops_bf16": round(limits["matmul_bf16"] / 1e9, 1),
            "machine.matmul_gflops_bf16_by_shape": gflops(bf16),
            "machine.copy_gbps_512mib": round(dram["copy"] / 1e9, 1),
            "machine.sum_gbps_512mib": round(dram["sum"] / 1e9, 1),
            "machine.copy_gbps_48mib": round(cached["copy"] / 1e9, 1),
            "machine.sum_gbps_48mib": round(cached["sum"] / 1e9, 1)})
    return limits


# ---------------------------------------------------------------------------------------------
# FLOPs (formula in the module docstring)

def unit_flops(cfg: M.ModelConfig):
    """(t, a, h): trunk FLOPs per token, attention FLOPs per key (a(s) = a s), LM head FLOPs
    per position."""
    L, D, H, K, E, F = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                        cfg.d_ff)
    mlp = (3 if cfg.gated_mlp else 2) * D * F
    return 2 * L * (2 * D * H * E + 2 * D * K * E + mlp), 4 * L * H * E, 2 * D * cfg.vocab_size


def model_flops(w: Workload) -> dict:
    """{"model": ..., "executed": ...} FLOPs per stage and per iteration."""
    t, a, h = unit_flops(w.model)
    B, n, P, N = w.prompts, w.responses, w.prompt_len, w.new_tokens
    pre = P * t + a * P * (P + 1) // 2
    r = lambda j: sum(t + a * (P + i) for i in range(1, j + 1))
    logprobs = B * (pre + h) + B * n * (r(N - 1) + (N - 1) * h)
    score = B * pre + B * n * r(N) + B * n * 2 * w.d_model
    model = dict(generate=logprobs, score=logprobs + score, update=3 * logprobs)
    # What the programs run: attention over every key slot of the [P + N] cache, the LM head
    # on every response token, old log-probs only if recomputed.
    S_ = P + N
    once = B * P * (t + a * P) + B * n * N * (t + a * S_)     # `rollout.prompt_once_hidden`
    executed = dict(generate=B * P * (t + a * S_) + B * h + B * n * (N - 1) * (t + a * S_ + h),
                    score=(1 + w.recompute_old) * (once + B * n * N * h)
                    + once + B * n * (N + 1) * 2 * w.d_model,
                    update=3 * (once + B * n * N * h))
    return {kind: dict(f, iteration=sum(f.values())) for kind, f in
            (("model", model), ("executed", executed))}


# ---------------------------------------------------------------------------------------------
# the iteration

def build_models(w: Workload, seed: int = 0):
    """Policy, reference (a copy) and a reward model with a random reward head; prompts."""
    cfg = w.model
    policy = M.init_params(cfg, jax.random.key(seed))
    rm = M.init_params(cfg, jax.random.key(seed + 1))
    rm["reward_head"]["w"] = 0.02 * jax.random.normal(jax.random.key(seed + 2), (cfg.d_model,))
    prompts = np.random.default_rng(seed).integers(1, cfg.vocab_size, (w.prompts, w.prompt_len))
    return policy, jax.tree.map(jnp.copy, policy), rm, (
        jnp.asarray(prompts, jnp.int32), jnp.ones((w.prompts, w.prompt_len), jnp.int32))


class Iteration:
    """The training loop's `rl.RLIteration` on the workload's models and prompts.

    `algo="p3o"` is the timed iteration; `algo="ppo"` (a separate critic initialised from the
    reward model, its values, GAE) exists to compare memory at the same shapes.
    """

    def __init__(self, w: Workload, algo: str = "p3o"):
        self.w = w
        policy, self.ref, self.rm, (ids, mask) = build_models(w)
        self.prompts = {"ids": ids, "mask": mask}
        cfg = w.experiment(algo)
        self.rl = RLIteration(cfg, make_mesh(), w.sampling, make_optimizer(cfg.rl.optim, 1000))
        self.state = self.rl.init_state(initial_params(cfg, policy, self.rm))
        self.carry = ALGORITHMS[algo].init_carry(cfg)

    @functools.partial(jax.jit, static_argnums=0)
    def prefill(self, params):
        """The prefill part of `generate` alone (for the per-step decode time)."""
        return S.prefill(params["policy"], self.w.model, self.prompts["ids"],
                         self.prompts["mask"], self.w.new_tokens)

    def buffer(self):
        """A prepared buffer of the current policy, as the update takes it."""
        samples = self.rl.sample(self.state.params, self.prompts, jax.random.key(0))
        buffer, _ = self.rl.score(self.state.params, self.ref, self.rm, self.prompts, samples,
                                  self.carry)
        return buffer.replace(entropy=None)

    def step(self, it: int) -> dict:
        """One iteration; the wall seconds of each program (`generate`, `score`, `update`)."""
        self.state, _, metrics = self.rl(self.state, self.carry, self.ref, self.rm, self.prompts,
                                         jax.random.key(it))
        if metrics["skipped_nonfinite"]:
            raise FloatingPointError(f"iteration {it}: the update was skipped (non-finite)")
        return {k: metrics[f"time_{k}"] for k in STAGES}


STAGES = ("generate", "score", "update")


def decode_bounds(w: Workload, limits: dict) -> dict:
    """Bytes and FLOPs of one decode step (every weight once, the whole KV cache) and the time
    each would take at the measured bandwidth and matmul rate."""
    cfg = w.model
    rows, S_ = w.prompts * w.responses, w.prompt_len + w.new_tokens
    weights = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
    cache = (2 * cfg.n_layers * rows * cfg.n_kv_heads * S_ * cfg.head_dim
             * cfg.compute_dtype.itemsize)
    t, a, h = unit_flops(cfg)
    flops = rows * (t + a * S_ + h)
    peak = limits["matmul_bf16" if w.dtype == "bfloat16" else "matmul_f32"]
    return dict(bytes=weights + cache, weight_bytes=weights, cache_bytes=cache,
                bandwidth_s=(weights + cache) / limits["bandwidth"], compute_s=flops / peak)


def iteration_section(w: Workload, limits: dict, repeats: int):
    with jax.set_mesh(make_mesh()):
        run = Iteration(w)
        run.step(0)   # compiles every program
        steps = [run.step(i + 1) for i in range(repeats)]
        prefill = statistics.median(timed(lambda: run.prefill(run.state.params), repeats))
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    total = [sum(s[k] for k in STAGES) for s in steps]
    iteration = statistics.median(total)
    flops = model_flops(w)
    peak = limits["matmul_bf16" if w.dtype == "bfloat16" else "matmul_f32"]
    mfu = lambda f, s: round(f / s / peak, 3)
    decode_step = (med["generate"] - prefill) / (w.new_tokens - 1)
    bounds = decode_bounds(w, limits)
    p = w.name
    emit("iteration", workload=dataclasses.asdict(w), repeats=repeats, **{
        f"{p}.iteration_s": round(iteration, 4),
        f"{p}.iteration_times_s": [round(x, 4) for x in total],
        **{f"{p}.{k}_s": round(v, 4) for k, v in med.items()},
        f"{p}.generate_tokens_per_s": round(w.generated_tokens / med["generate"], 1),
        f"{p}.prefill_s": round(prefill, 4),
        f"{p}.decode_step_ms": round(1e3 * decode_step, 3),
        f"{p}.decode_step_bytes_mb": round(bounds["bytes"] / 1e6, 1),
        f"{p}.decode_step_weight_mb": round(bounds["weight_bytes"] / 1e6, 1),
        f"{p}.decode_step_at_bandwidth_ms": round(1e3 * bounds["bandwidth_s"], 3),
        f"{p}.decode_step_at_peak_flops_ms": round(1e3 * bounds["compute_s"], 3),
        f"{p}.model_gflop": {k: round(v / 1e9, 2) for k, v in flops["model"].items()},
        f"{p}.executed_gflop": {k: round(v / 1e9, 2) for k, v in flops["executed"].items()},
        f"{p}.peak_gflops": round(peak / 1e9, 1),
        **{f"{p}.{k}_mfu": mfu(flops["model"][k], med[k]) for k in STAGES},
        f"{p}.iteration_mfu": mfu(flops["model"]["iteration"], iteration),
        f"{p}.iteration_hfu": mfu(flops["executed"]["iteration"], iteration)})


# ---------------------------------------------------------------------------------------------
# transformers' PyTorch generate on the same weights and shapes

def torch_section(w: Workload, repeats: int, threads: list[int]):
    """transformers' `generate` at each PyTorch thread count and our `sample_pairs`, on the same
    weights, prompts and sampling settings, timed in alternation so that both see the same
    load; medians of `repeats` rounds, and our speed-up over the best thread count."""
    import torch
    import transformers

    from p3o_jax.hf import save_pretrained

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    policy, _, _, (prompts, prompt_mask) = build_models(w)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(policy, w.model, d)
        model = transformers.GPT2LMHeadModel.from_pretrained(
            d, dtype=torch.bfloat16 if w.dtype == "bfloat16" else torch.float32).eval()
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    attention_mask = torch.tensor(np.asarray(prompt_mask), dtype=torch.long)
    B, n, P, N = w.prompts, w.responses, w.prompt_len, w.new_tokens

    def theirs(n_threads):
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attention_mask, do_sample=True,
                                 num_return_sequences=n, max_new_tokens=N, min_new_tokens=N,
                                 temperature=w.temperature, top_k=w.top_k, top_p=w.top_p,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape == (B * n, P + N)

    ours = lambda: S.sample_pairs(policy, w.model, w.sampling, prompts, prompt_mask,
                                  jax.random.key(0), n=n)
    runs = {"ours": ours, **{t: functools.partial(theirs, t) for t in threads}}
    times = {k: [] for k in runs}
    for k, fn in runs.items():
        jax.block_until_ready(fn())   # compile / warm up
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    rate = {k: w.generated_tokens / statistics.median(v) for k, v in times.items()}
    best = max(rate[t] for t in threads)
    p = w.name
    emit("torch", torch_version=torch.__version__, transformers_version=transformers.__version__,
         **{f"{p}.torch_generate_tokens_per_s": round(best, 1),
            f"{p}.torch_generate_tokens_per_s_by_threads": {t: round(rate[t], 1) for t in threads},
            f"{p}.generate_tokens_per_s_alongside": round(rate["ours"], 1),
            f"{p}.generate_speedup_vs_torch": round(rate["ours"] / best, 2)})


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh process per algorithm

def peak_rss_mib() -> float:
    """Peak resident memory of this process image (Linux VmHWM). Not `ru_maxrss`: after a
    fork + exec that starts from the parent's resident size, which would hide the child's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory_child(w: Workload, algo: str):
    """Run in a fresh process: peak resident memory of three iterations beyond the peak after
    imports, the train state's size and XLA's temporary buffers of the update."""
    base = peak_rss_mib()
    with jax.set_mesh(make_mesh()):
        run = Iteration(w, algo)
        for i in range(3):
            run.step(i)
        peak = peak_rss_mib()
        update = run.rl.update.lower(run.state, run.buffer()).compile().memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
    print(json.dumps(dict(peak_mib=peak - base, state_mib=state_bytes / 2 ** 20,
                          update_temp_mib=update.temp_size_in_bytes / 2 ** 20)))


def memory_section(w: Workload):
    """Each algorithm runs twice in a fresh process sharing a persistent compilation cache: the
    first run fills the cache, the second (measured) loads its programs from it, so its peak
    is the iteration's own memory and not the compiler's."""
    workload = [f"{k}={v}" for k, v in dataclasses.asdict(w).items()]
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        for algo in ("p3o", "ppo"):
            for _ in range(2):
                res = subprocess.run([sys.executable, "-m", "p3o_jax.cli.bench", *workload,
                                      f"memory_child={algo}"], check=True, capture_output=True,
                                     text=True, env=env)
            out[algo] = json.loads(res.stdout.strip().splitlines()[-1])
    p = w.name
    emit("memory", **{f"{p}.{algo}_{k}": round(v, 1) for algo, r in out.items()
                      for k, v in r.items()},
         **{f"{p}.p3o_saves_mib": round(out["ppo"]["peak_mib"] - out["p3o"]["peak_mib"], 1)})


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchArgs:
    only: Annotated[str, SubsetOf(*SECTIONS)] = ",".join(SECTIONS)   # sections to run
    repeats: Annotated[int, Positive] = 7           # timed iterations (median)
    torch_threads: Annotated[tuple[int, ...], Positive] = tuple(sorted({1, os.cpu_count()}))
    memory_child: Annotated[str, OneOf("", *ALGORITHMS)] = ""   # internal: memory_section


def parse_args(argv: list[str]) -> tuple[BenchArgs, Workload]:
    """`key=value` for the workload's fields and BenchArgs'; any other key is an error."""
    w, rest = tool_args(argv, Workload())
    args, rest = tool_args(rest, BenchArgs())
    if rest:
        raise ConfigError(f"unknown config key {rest[0].partition('=')[0]!r} (the benchmark's "
                          f"keys: the fields of Workload and BenchArgs)")
    return args, w


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, w = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.memory_child:
        memory_child(w, args.memory_child)
        return 0
    sections = args.only.split(",")
    limits = machine_section(w) if {"machine", "iteration"} & set(sections) else None
    if "iteration" in sections:
        iteration_section(w, limits, args.repeats)
    if "torch" in sections:
        torch_section(w, args.repeats, list(args.torch_threads))
    if "memory" in sections:
        memory_section(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
