"""Performance of an RL iteration (workloads W1, W2, W2-var, W3), measured against the
machine's own limits.

    python -m p3o_jax.cli.bench [workloads=w1,w2,w2_var,w3]
        [only=machine,iteration,loop,torch,memory,staleness,engine]
    make bench ARGS="workloads=w2 only=iteration"

Workloads (`WORKLOADS`; kept exactly, so that numbers compare across changes):
- W1: GPT-2 architecture, 4 layers, d_model 256, 4 heads, vocab 8192; 16 prompts of 64 tokens,
  2 responses each of exactly 48 tokens.
- W2: GPT-NeoX / Pythia-160M shape (12 layers, d_model 768, 12 heads, vocab 50304, rotary_pct
  0.25, parallel residual); 8 prompts whose real lengths are drawn uniformly from 128..512
  (fixed seed) and left-padded to 512, 2 responses each of exactly 53 tokens.
- W2-var: W2 with each response's length drawn uniformly from 8..53 (per-response limits, in
  place of EOS).
- W3, reasoning-shaped: SmolLM2-135M's shape (Llama, 30 layers, d_model 576, 9 heads / 3 KV
  heads, MLP 1536, vocab 49152, tied embeddings); 32 prompts of 64..256 real tokens (left-padded
  to 256) x 4 responses, each response's length drawn once from a log-normal with median 96
  and sigma 0.8, clipped to [8, 512] (per-response limits, as W2-var's).
Float32 compute; a policy, its frozen copy as the reference and a reward model of the same
shape; EOS disabled; one P3O update (one epoch of one minibatch, beta 0.05). The iteration is
the training loop's own `rl.RLIteration`: three compiled programs, each timed up to
`block_until_ready`: generate (`sampler.sample_responses`), score (the reference's log-probs, the
old ones too with `recompute_old=true`, the reward model, P3O's Delta: `rollout.score` and
`algos.p3o.prepare`) and update (`train_state.make_update` of `algos.p3o.loss` under
`jit_step`, state donated). Scoring and the update run each prompt once for its n responses
(`rollout.prompt_once_hidden`), and every prompt pass runs on the prompts packed
(`packing.py`; `pack_prompts=false` for the padded programs). Every workload field is a key
(`layers=12 d_model=768 ...`, applied to each selected workload; a changed workload is called
`custom`), plus `workloads`, `only`, `repeats`, `torch_threads`.

Sections, one JSON line each per workload (every line carries the load average, since the
machine is often shared): `machine` (once: the best float32/bfloat16 matmul rate over square
sizes and the workloads' own matmul shapes; the bandwidth of an in-place update and of a sum, at
DRAM size and at a decode step's working-set size), `iteration` (stage times, medians over
`repeats` iterations after a compiling one; tokens/s; the decode step against its bandwidth and
FLOP bounds; MFU on the padded shapes and useful MFU on the real tokens), `loop` (the training
loop's own RL stage, `pipeline.stage_rl`, with its host code, metrics, logging and checkpoints:
the wall time per iteration beside the sum of its three programs), `torch` (transformers'
PyTorch `generate` on the same weights and shapes, best over thread counts), `memory` (peak
resident memory of a P3O and of a PPO iteration, each in a fresh process), `staleness` (once,
on the toy task whatever the workloads: the training command with 2 CPU devices and a reward
function that sleeps `reward_sleep_s` per batch, per-iteration wall time at `rl.max_staleness`
0 and 1), `engine` (the static sampler against the continuous-batching engine,
`engine.sample_continuous`, on the same weights and keys: generation time each, timed
alternately, slot-steps per real token, KV cache bytes; `engine_slots=32,64` times the engine
at each slot count, a line each; `engine=continuous slots=C` runs the other sections'
iteration on it).

Model FLOPs. A multiply-add is 2 FLOPs; every necessary matmul is counted once, recomputation
is not. L layers, D d_model, H heads (K kv heads) of E features, F MLP width, V vocabulary;
B prompts, n responses each; prompt b has p_b real tokens, its responses j_bi.

    per token, trunk:           t    = 2 L (2 D H E + 2 D K E + m D F)       m = 2 (3 if gated)
    one query over s keys:      a(s) = 4 L H E s                                 (q.k and p.v)
    one position, LM head:      h    = 2 D V
    prompt of p tokens:         pre(p)  = p t + sum_{s=1..p} a(s)
    j response tokens after it: r(p, j) = sum_{i=1..j} (t + a(p + i))

    generate    = sum_b (pre(p_b) + h) + sum_bi (r(p_b, j_bi - 1) + (j_bi - 1) h)
    log-probs   = the same count                       (the logits of every response token)
    score       = log-probs (the reference's) + RM     RM = sum_b pre(p_b) + sum_bi r(p_b, j_bi) + 2 D
    update      = 3 x log-probs                        forward + backward of the policy
    iteration   = generate + score + update

`model_gflop` and `*_mfu` count the padded shapes (every p_b = P, j_bi = N); `useful_gflop` and
`*_useful_mfu` the real tokens only (W1: the same). Old log-probs are a recomputation (the
sampler had them), so with `recompute_old` they are timed but add no model FLOPs. MFU = FLOPs /
time / the best matmul rate measured in the same run. `executed_gflop` counts what the
programs do run (the prompt passes over R packed rows of P slots, or B rows unpacked, with
attention over all P slots; responses over N slots attending to all P + N key slots; decoding
until the longest response ends; old log-probs if recomputed), so `iteration_hfu` (hardware
FLOPs utilisation) separates kernel efficiency from padding and recomputation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
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
from p3o_jax import packing as PK
from p3o_jax import sampler as S
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import OneOf, Positive, SubsetOf
from p3o_jax.cli.help import help_text, section_lines, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig, RLConfig
from p3o_jax.config_args import tool_args
from p3o_jax.rl import RLIteration, initial_params
from p3o_jax.sharding import make_mesh
from p3o_jax.train_state import OptimConfig, make_optimizer

SECTIONS = ("machine", "iteration", "loop", "torch", "memory", "staleness", "engine")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes and model of one benchmark workload; the defaults are W1."""
    family: Annotated[str, OneOf(*M.FAMILIES)] = "gpt2"
    prompts: int = 16
    responses: int = 2
    prompt_len: int = 64            # P: prompts are left-padded to P slots
    prompt_len_min: int = 0         # > 0: real prompt lengths uniform in [min, P] (else P)
    new_tokens: int = 48            # N
    new_tokens_min: int = 0         # > 0: per-response limits uniform in [min, N] (else N)
    new_tokens_median: float = 0.0  # > 0: the limits log-normal with this median instead,
    new_tokens_sigma: float = 0.8   # and this sigma, clipped to [new_tokens_min, N]
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    kv_heads: int = 0               # 0: = heads
    d_ff: int = 0                   # 0: the family's (4 d_model)
    tie_embeddings: bool | None = None   # None: the family's
    vocab: int = 8192
    rotary_pct: float = 1.0
    dtype: str = "float32"
    beta: float = 0.05
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    recompute_old: bool = False     # recompute pi_old's log-probs (off: the sampler's are reused)
    pack_prompts: bool = True       # prompt passes on the packed prompts (`rl.pack_prompts`)
    pack_responses: bool = False    # scoring and the update on prompt-and-response trees
                                    # (`rl.pack_responses`)
    seed: int = 0                   # weights, prompts and lengths
    engine: Annotated[str, OneOf("static", "continuous")] = "static"   # the sampler's
    slots: int = 0                  # continuous: decode slots (0: engine.slot_count's rule)

    @property
    def name(self) -> str:
        """Prefix of the output keys: the preset's name (`w2_bfloat16` with that dtype, and
        `_padded` without packing) or `custom`."""
        base = dataclasses.replace(self, dtype="float32", pack_prompts=True, engine="static",
                                   slots=0, pack_responses=False)
        name = next((k for k, v in WORKLOADS.items() if v == base), "custom")
        return (name + ("" if self.dtype == "float32" else f"_{self.dtype}")
                + ("" if self.pack_prompts else "_padded")
                + ("_trees" if self.pack_responses else "")
                + ("" if self.engine == "static" else f"_{self.engine}"))

    @property
    def model(self) -> M.ModelConfig:
        return M.ModelConfig(family=self.family, vocab_size=self.vocab, d_model=self.d_model,
                             n_layers=self.layers, n_heads=self.heads,
                             n_kv_heads=self.kv_heads or None, d_ff=self.d_ff or None,
                             tie_embeddings=self.tie_embeddings, rotary_pct=self.rotary_pct,
                             max_len=self.prompt_len + self.new_tokens, dtype=self.dtype)

    @property
    def sampling(self) -> S.SamplingConfig:   # no eos_ids: responses end at their limits
        return S.SamplingConfig(max_new_tokens=self.new_tokens, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p, engine=self.engine,
                                slots=self.slots)

    def experiment(self, algo: str = "p3o") -> ExperimentConfig:
        """The run config the workload's iteration uses (one epoch of one minibatch)."""
        return ExperimentConfig(algo=algo, policy=self.model, rl=RLConfig(
            prompts_per_iter=self.prompts, n_samples=self.responses, epochs=1, minibatches=1,
            beta=self.beta, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            recompute_logp_old=self.recompute_old, pack_prompts=self.pack_prompts,
            pack_responses=self.pack_responses, optim=OptimConfig(lr=1e-5, warmup_steps=0)))

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Real prompt lengths [B] and response lengths [B, n] (fixed by `seed`)."""
        rng = np.random.default_rng(self.seed + 100)
        B, n, P, N = self.prompts, self.responses, self.prompt_len, self.new_tokens
        prompt = (rng.integers(self.prompt_len_min, P + 1, B) if self.prompt_len_min
                  else np.full(B, P))
        if self.new_tokens_median:
            draw = rng.lognormal(np.log(self.new_tokens_median), self.new_tokens_sigma, (B, n))
            response = np.clip(np.round(draw), max(self.new_tokens_min, 1), N).astype(int)
        elif self.new_tokens_min:
            response = rng.integers(self.new_tokens_min, N + 1, (B, n))
        else:
            response = np.full((B, n), N)
        return prompt, response

    @property
    def limited(self) -> bool:
        """Responses have per-response length limits (W2-var, W3), not all N tokens."""
        return bool(self.new_tokens_min or self.new_tokens_median)

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths()[1].sum())


W2 = Workload(family="gpt_neox", prompts=8, prompt_len=512, prompt_len_min=128, new_tokens=53,
              layers=12, d_model=768, heads=12, vocab=50304, rotary_pct=0.25)
W3 = Workload(family="llama", prompts=32, responses=4, prompt_len=256, prompt_len_min=64,
              new_tokens=512, new_tokens_min=8, new_tokens_median=96, new_tokens_sigma=0.8,
              layers=30, d_model=576, heads=9, kv_heads=3, d_ff=1536, vocab=49152,
              tie_embeddings=True)
WORKLOADS = {"w1": Workload(), "w2": W2, "w2_var": dataclasses.replace(W2, new_tokens_min=8),
             "w3": W3}


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


def machine_section(workloads: list[Workload]) -> dict:
    """The best matmul rate over square sizes and the workloads' own trunk and LM-head shapes,
    and the bandwidth of DRAM (512 MiB) and of a decode step's working set (48 MiB, which the
    last-level cache may hold)."""
    shapes = [(n, n, n) for n in (512, 1024, 2048)]
    for w in workloads:
        rows = w.prompts * w.responses
        tokens, heads = rows * (w.prompt_len + w.new_tokens), rows * w.new_tokens
        shapes += [(tokens, w.d_model, 4 * w.d_model), (tokens, 4 * w.d_model, w.d_model),
                   (heads, w.d_model, w.vocab)]
    shapes = list(dict.fromkeys(shapes))
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


def stage_flops(cfg: M.ModelConfig, prompt_lengths, response_lengths) -> dict:
    """Model FLOPs of each stage (module docstring) for prompts of `prompt_lengths` [B] real
    tokens with responses of `response_lengths` [B, n]."""
    t, a, h = unit_flops(cfg)
    pre = lambda p: p * t + a * p * (p + 1) // 2
    r = lambda p, j: j * t + a * (j * p + j * (j + 1) // 2)
    pairs = [(int(p), int(j)) for p, row in zip(prompt_lengths, response_lengths) for j in row]
    logprobs = (sum(pre(int(p)) + h for p in prompt_lengths)
                + sum(r(p, max(j - 1, 0)) + max(j - 1, 0) * h for p, j in pairs))
    rm = sum(pre(int(p)) for p in prompt_lengths) + sum(r(p, j) + 2 * cfg.d_model
                                                         for p, j in pairs)
    return dict(generate=logprobs, score=logprobs + rm, update=3 * logprobs)


def model_flops(w: Workload, packed_rows: int | None = None,
                trees: tuple[int, int] | None = None) -> dict:
    """{"model": the padded shapes' FLOPs, "useful": the real tokens', "executed": what the
    programs run} per stage and per iteration; `packed_rows`: R of the packed prompts (None:
    unpacked, R = B); `trees`: (R' rows of P + N slots, Hc LM-head positions per row) of the
    packed prompt-and-response trees that scoring and the update run on (None: prompt once,
    then N-slot responses)."""
    t, a, h = unit_flops(w.model)
    B, n, P, N = w.prompts, w.responses, w.prompt_len, w.new_tokens
    prompt_lengths, response_lengths = w.lengths()
    model = stage_flops(w.model, [P] * B, [[N] * n] * B)
    useful = stage_flops(w.model, prompt_lengths, response_lengths)
    # What the programs run: the prompt passes over R rows of P slots (attention over all P),
    # responses' N slots attending to all P + N keys, the LM head on every response slot,
    # decoding until the longest response ends, old log-probs only if recomputed.
    R, S_, steps = packed_rows or B, P + N, int(response_lengths.max())
    once = R * P * (t + a * P) + B * n * N * (t + a * S_)     # `rollout.prompt_once_hidden`
    heads = B * n * N                                         # LM-head positions
    if trees:                                       # `packing.packed_trunk`, `packed_logits`
        once, heads = trees[0] * S_ * (t + a * S_), trees[0] * trees[1]
    executed = dict(generate=R * P * (t + a * P) + B * h
                    + B * n * (steps - 1) * (t + a * S_ + h),
                    score=(1 + w.recompute_old) * (once + heads * h)
                    + once + B * n * (N + 1) * 2 * w.d_model,
                    update=3 * (once + heads * h))
    return {kind: dict(f, iteration=sum(f.values())) for kind, f in
            (("model", model), ("useful", useful), ("executed", executed))}


# ---------------------------------------------------------------------------------------------
# the iteration

def build_models(w: Workload):
    """Policy, reference (a copy) and a reward model with a random reward head; prompts
    {"ids", "mask"} [B, P] left-padded to their real lengths; per-response limits [B, n]
    (None when every response has N tokens)."""
    cfg, seed = w.model, w.seed
    policy = M.init_params(cfg, jax.random.key(seed))
    rm = M.init_params(cfg, jax.random.key(seed + 1))
    rm["reward_head"]["w"] = 0.02 * jax.random.normal(jax.random.key(seed + 2), (cfg.d_model,))
    prompt_lengths, response_lengths = w.lengths()
    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, (w.prompts, w.prompt_len))
    mask = np.arange(w.prompt_len)[None] >= w.prompt_len - prompt_lengths[:, None]
    limits = jnp.asarray(response_lengths, jnp.int32) if w.limited else None
    return policy, jax.tree.map(jnp.copy, policy), rm, {
        "ids": jnp.asarray(ids * mask, jnp.int32), "mask": jnp.asarray(mask, jnp.int32)}, limits


class Iteration:
    """The training loop's `rl.RLIteration` on the workload's models and prompts.

    `algo="p3o"` is the timed iteration; `algo="ppo"` (a separate critic initialised from the
    reward model, its values, GAE) exists to compare memory at the same shapes.
    """

    def __init__(self, w: Workload, algo: str = "p3o", mesh=None):
        self.w = w
        policy, self.ref, self.rm, self.prompts, self.limits = build_models(w)
        cfg = w.experiment(algo)
        self.rl = RLIteration(cfg, mesh or make_mesh(), w.sampling,
                              make_optimizer(cfg.rl.optim, 1000))
        self.state = self.rl.init_state(initial_params(cfg, policy, self.rm))
        self.carry = ALGORITHMS[algo].init_carry(cfg)
        self.packing = self.rl.packing(self.prompts["ids"], self.prompts["mask"])

    @property
    def packed_rows(self) -> int | None:
        return None if self.packing is None else self.packing.tokens.shape[0]

    @property
    def trees(self) -> tuple[int, int] | None:
        """(R' rows, Hc LM-head positions per row) of scoring's and the update's packed trees
        (`rl.pack_responses`), else None."""
        if not self.w.pack_responses:
            return None
        resp_mask = np.arange(self.w.new_tokens) < self.w.lengths()[1][..., None]
        return self.rl.score_packing(self.prompts["ids"], self.prompts["mask"],
                                     resp_mask).heads.shape

    @functools.partial(jax.jit, static_argnums=0)
    def prefill(self, params):
        """The prefill part of `generate` alone (for the per-step decode time)."""
        return S.prefill(params["policy"], self.w.model, self.prompts["ids"],
                         self.prompts["mask"], self.w.new_tokens, self.packing)

    def buffer(self):
        """A prepared buffer of the current policy, as the update takes it."""
        samples = self.rl.sample(self.state.params, self.prompts, jax.random.key(0),
                                 self.packing, self.limits)
        packing = self.rl.score_packing(self.prompts["ids"], self.prompts["mask"], samples.mask)
        buffer, _ = self.rl.score(self.state.params, self.ref, self.rm, self.prompts, samples,
                                  self.carry, None, packing)
        return buffer.replace(entropy=None)

    def step(self, it: int) -> dict:
        """One iteration; the wall seconds of each program (`generate`, `score`, `update`)."""
        self.state, _, metrics = self.rl(self.state, self.carry, self.ref, self.rm, self.prompts,
                                         jax.random.key(it), max_lengths=self.limits)
        if metrics["skipped_nonfinite"]:
            raise FloatingPointError(f"iteration {it}: the update was skipped (non-finite)")
        return {k: metrics[f"time_{k}"] for k in STAGES}


STAGES = ("generate", "score", "update")


def kv_cache_bytes(w: Workload, rows: int, length: int) -> int:
    """Bytes of a KV cache of `rows` rows of `length` slots."""
    cfg = w.model
    return (2 * cfg.n_layers * rows * cfg.n_kv_heads * length * cfg.head_dim
            * cfg.compute_dtype.itemsize)


def decode_bounds(w: Workload, limits: dict) -> dict:
    """Bytes and FLOPs of one decode step (every weight once, the whole KV cache) and the time
    each would take at the measured bandwidth and matmul rate."""
    cfg = w.model
    rows, S_ = w.prompts * w.responses, w.prompt_len + w.new_tokens
    weights = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
    cache = kv_cache_bytes(w, rows, S_)
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
    flops = model_flops(w, run.packed_rows, run.trees)
    peak = limits["matmul_bf16" if w.dtype == "bfloat16" else "matmul_f32"]
    mfu = lambda f, s: round(f / s / peak, 3)
    prompt_lengths, response_lengths = w.lengths()
    decode_step = (med["generate"] - prefill) / (int(response_lengths.max()) - 1)
    bounds = decode_bounds(w, limits)
    p = w.name
    gflop = lambda kind: {k: round(v / 1e9, 2) for k, v in flops[kind].items()}
    emit("iteration", workload=dataclasses.asdict(w), repeats=repeats, **{
        f"{p}.iteration_s": round(iteration, 4),
        f"{p}.iteration_times_s": [round(x, 4) for x in total],
        **{f"{p}.{k}_s": round(v, 4) for k, v in med.items()},
        f"{p}.real_prompt_tokens": int(prompt_lengths.sum()),
        f"{p}.prompt_slots": w.prompts * w.prompt_len,
        f"{p}.packed_rows": run.packed_rows,
        **({f"{p}.tree_rows": run.trees[0], f"{p}.tree_head_width": run.trees[1]}
           if w.pack_responses else {}),
        f"{p}.real_response_tokens": int(response_lengths.sum()),
        f"{p}.generate_tokens_per_s": round(int(response_lengths.sum()) / med["generate"], 1),
        f"{p}.prefill_s": round(prefill, 4),
        **({} if w.engine != "static" else {   # its steps, bounds and executed FLOPs: static's
            f"{p}.decode_step_ms": round(1e3 * decode_step, 3),
            f"{p}.decode_step_bytes_mb": round(bounds["bytes"] / 1e6, 1),
            f"{p}.decode_step_weight_mb": round(bounds["weight_bytes"] / 1e6, 1),
            f"{p}.decode_step_at_bandwidth_ms": round(1e3 * bounds["bandwidth_s"], 3),
            f"{p}.decode_step_at_peak_flops_ms": round(1e3 * bounds["compute_s"], 3),
            f"{p}.executed_gflop": gflop("executed"),
            f"{p}.iteration_hfu": mfu(flops["executed"]["iteration"], iteration)}),
        f"{p}.model_gflop": gflop("model"),
        f"{p}.useful_gflop": gflop("useful"),
        f"{p}.peak_gflops": round(peak / 1e9, 1),
        **{f"{p}.{k}_mfu": mfu(flops["model"][k], med[k]) for k in STAGES},
        **{f"{p}.{k}_useful_mfu": mfu(flops["useful"][k], med[k]) for k in STAGES},
        f"{p}.iteration_mfu": mfu(flops["model"]["iteration"], iteration),
        f"{p}.iteration_useful_mfu": mfu(flops["useful"]["iteration"], iteration)})


# ---------------------------------------------------------------------------------------------
# the two rollout engines

def engine_section(w: Workload, repeats: int, slot_counts: tuple[int, ...] = ()):
    """The static sampler (`sampler.sample_responses`) and the continuous-batching engine
    (`engine.sample_continuous`, at each of `slot_counts`, default `w.slots`) on the same
    weights, prompts, keys and per-response lengths, compiled ahead, then timed alternately
    (medians of `repeats` rounds); one line per slot count, each against the same static
    times. Tokens agree where the logits are bitwise equal; the two batch rows apart
    (`slots` against B n), so XLA's matmuls may round apart, a draw near a CDF boundary can
    flip and the response goes its own way from there: `same_token_fraction`. Slot-steps:
    the decode rows each runs, B n x its steps for the static sampler (every row until the
    longest ends); per real response token. The KV cache: B n rows of
    P + N (static) against `slots` rows of P + N plus the B prefilled prompts' P."""
    from p3o_jax import engine as E

    policy, _, _, prompts, limits = build_models(w)
    packing = PK.pack_prompts(prompts["ids"], prompts["mask"]) if w.pack_prompts else None
    R, P, N = w.prompts * w.responses, w.prompt_len, w.new_tokens
    counts = tuple(E.slot_count(dataclasses.replace(w.sampling, slots=C), R)
                   for C in slot_counts or (w.slots,))
    engines = {"static": (S.sample_responses, w.sampling)} | {
        C: (E.sample_continuous, dataclasses.replace(w.sampling, engine="continuous", slots=C))
        for C in counts}
    run = {k: jax.jit(lambda params, f=f, scfg=scfg: f(
        params, w.model, scfg, prompts["ids"], prompts["mask"], jax.random.key(0),
        n=w.responses, max_lengths=limits, packing=packing)).lower(policy).compile()
        for k, (f, scfg) in engines.items()}
    times, outs = {k: [] for k in run}, {}
    for _ in range(repeats):
        for k, f in run.items():
            t0 = time.perf_counter()
            outs[k] = jax.block_until_ready(f(policy))
            times[k].append(time.perf_counter() - t0)
    static = outs["static"]
    med = {k: statistics.median(v) for k, v in times.items()}
    real = int(np.asarray(static.mask).sum())
    p = dataclasses.replace(w, engine="static").name     # it runs both
    for C in counts:
        continuous, slot_steps = outs[C]
        both = np.asarray(static.mask) & np.asarray(continuous.mask)
        same = (np.asarray(static.tokens) == np.asarray(continuous.tokens)) & both.astype(bool)
        emit("engine", repeats=repeats, slots=C, **{
            f"{p}.static_generation_s": round(med["static"], 4),
            f"{p}.continuous_generation_s": round(med[C], 4),
            f"{p}.static_generation_times_s": [round(x, 4) for x in times["static"]],
            f"{p}.continuous_generation_times_s": [round(x, 4) for x in times[C]],
            f"{p}.engine_speedup": round(med["static"] / med[C], 3),
            f"{p}.real_response_tokens": real,
            f"{p}.static_slot_steps_per_real_token": round(R * int(static.num_steps) / real, 3),
            f"{p}.slot_steps_per_real_token": round(int(slot_steps) / real, 3),
            f"{p}.continuous_iterations": int(continuous.num_steps),
            f"{p}.static_steps": int(static.num_steps),
            f"{p}.static_kv_cache_bytes": kv_cache_bytes(w, R, P + N),
            f"{p}.continuous_kv_cache_bytes": (kv_cache_bytes(w, C, P + N)
                                               + kv_cache_bytes(w, w.prompts, P)),
            f"{p}.same_token_fraction": round(float(same.sum() / max(both.sum(), 1)), 4),
            f"{p}.same_masks": bool(np.array_equal(static.mask, continuous.mask))})


# ---------------------------------------------------------------------------------------------
# the training loop's own iteration

class WorkloadTask:
    """The workload's prompts as the task of `pipeline.stage_rl` (what the RL stage reads):
    every iteration the same prompts, no gold reward, no EOS."""

    def __init__(self, w: Workload, prompts: dict):
        self.vocab_size, self.prompt_len, self.response_len = w.vocab, w.prompt_len, w.new_tokens
        self.tokenizer, self.pad_id, self.stop_sequences = None, 0, ()
        self.eos_ids, self.eos_id = (), None
        self.gold_reward = None
        self.ids, self.mask = (np.asarray(prompts[k]) for k in ("ids", "mask"))

    def prompts(self, n: int, split: str, start: int = 0):
        return self.ids[:n], self.mask[:n]


def loop_section(w: Workload, repeats: int):
    """`pipeline.stage_rl` (the training loop's RL stage: prompts placed on the mesh, the
    iteration, metrics to float, logging to JSONL and TensorBoard, checkpoints, the progress
    bar) for `repeats` + 1 iterations: the wall time between consecutive iterations' log
    lines beside the sum of their three programs, medians after the compiling first."""
    from p3o_jax.logger import MetricsLogger
    from p3o_jax.pipeline import stage_rl
    from p3o_jax.stage import Run

    policy, ref, rm, prompts, _ = build_models(w)
    with tempfile.TemporaryDirectory() as out:
        cfg = w.experiment()
        cfg = dataclasses.replace(cfg, out_dir=out, rl=dataclasses.replace(
            cfg.rl, iterations=repeats + 1))
        mesh = make_mesh()
        run = Run(cfg, mesh, WorkloadTask(w, prompts), MetricsLogger(out))
        with jax.set_mesh(mesh):
            stage_rl(run, ref, rm)
        run.logger.close()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["stage"] == "rl:p3o"]
    rows.sort(key=lambda r: r["step"])
    wall = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    programs = [sum(r[f"time_{k}"] for k in STAGES) for r in rows[1:]]
    loop, inside = statistics.median(wall), statistics.median(programs)
    p = w.name
    emit("loop", repeats=repeats, **{
        f"{p}.loop_iteration_s": round(loop, 4),
        f"{p}.loop_iteration_times_s": [round(x, 4) for x in wall],
        f"{p}.loop_programs_s": round(inside, 4),
        f"{p}.loop_host_s": round(loop - inside, 4),
        f"{p}.loop_host_fraction": round((loop - inside) / loop, 4)})


# ---------------------------------------------------------------------------------------------
# stale rollouts: a slow reward function beside the device's work

SLOW_REWARD = """
import time


def slow_reward(completions, **kwargs):
    time.sleep({sleep})       # a verifier's latency per batch
    return [-len(c) / 100.0 for c in completions]
"""


def staleness_section(sleep_s: float, repeats: int):
    """The training command (`python -m p3o_jax.cli.train exp=toy`, 2 CPU devices by
    XLA_FLAGS, the policy over both) with a reward function that sleeps `sleep_s` per batch,
    at `rl.max_staleness` 0 and 1, for `repeats` + 1 iterations each: the wall time between
    consecutive iterations' log lines (medians after the first) and the speed-up. At 0 the
    sleep comes between sampling and scoring; at 1 it runs beside the device's scoring, update
    and sampling (p3o_jax/pipeline.py's `stage_rl`)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    wall, device = {}, {}
    with tempfile.TemporaryDirectory() as d:
        fn = os.path.join(d, "slow.py")
        with open(fn, "w") as f:
            f.write(SLOW_REWARD.format(sleep=sleep_s))
        for s in (0, 1):
            out = os.path.join(d, f"staleness{s}")
            subprocess.run([sys.executable, "-m", "p3o_jax.cli.train", "exp=toy",
                            "stages=sft,rl", "sft.steps=1", "mesh.fsdp=2", "eval_prompts=64",
                            f"rl.iterations={repeats + 1}", f"reward_fns={fn}:slow_reward",
                            f"rl.max_staleness={s}", f"out_dir={out}"],
                           check=True, capture_output=True, text=True, env=env)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = sorted((r for r in map(json.loads, f) if r["stage"] == "rl:p3o"),
                              key=lambda r: r["step"])
            wall[s] = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
            device[s] = [r["time_score"] + r["time_update"] - r.get("time_wait_rewards", 0)
                         - r["time_reward/slow_reward"] * (s == 0) for r in rows[1:]]
    med = {s: statistics.median(v) for s, v in wall.items()}
    emit("staleness", devices=2, reward_sleep_s=sleep_s, repeats=repeats, **{
        **{f"toy.staleness{s}_iteration_s": round(med[s], 4) for s in med},
        **{f"toy.staleness{s}_iteration_times_s": [round(x, 4) for x in wall[s]] for s in wall},
        **{f"toy.staleness{s}_device_s": round(statistics.median(device[s]), 4)
           for s in device},
        "toy.staleness1_speedup": round(med[0] / med[1], 3)})


# ---------------------------------------------------------------------------------------------
# transformers' PyTorch generate on the same weights and shapes

def torch_section(w: Workload, repeats: int, threads: list[int]):
    """transformers' `generate` at each PyTorch thread count and our `sample_responses`, on the same
    weights, prompts and sampling settings, timed in alternation so that both see the same
    load; medians of `repeats` rounds, and our speed-up over the best thread count. With
    per-response limits (W2-var), which `generate` has no way to take, it generates every
    row to N (as a batch it runs until its longest row ends anyway) and both rates count the
    real tokens."""
    import torch
    import transformers

    from p3o_jax.hf import save_pretrained

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    policy, _, _, prompts, limits = build_models(w)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(policy, w.model, d)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.bfloat16 if w.dtype == "bfloat16" else torch.float32).eval()
    ids = torch.tensor(np.asarray(prompts["ids"]), dtype=torch.long)
    attention_mask = torch.tensor(np.asarray(prompts["mask"]), dtype=torch.long)
    B, n, P, N = w.prompts, w.responses, w.prompt_len, w.new_tokens

    def theirs(n_threads):
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attention_mask, do_sample=True,
                                 num_return_sequences=n, max_new_tokens=N, min_new_tokens=N,
                                 temperature=w.temperature, top_k=w.top_k, top_p=w.top_p,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape == (B * n, P + N)

    packing = (PK.pack_prompts(prompts["ids"], prompts["mask"]) if w.pack_prompts else None)
    ours = lambda: S.sample_responses(policy, w.model, w.sampling, prompts["ids"], prompts["mask"],
                                      jax.random.key(0), n=n, max_lengths=limits, packing=packing)
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
    """Run in a fresh process. First line: the train state's size and XLA's temporaries of
    the compiled update, known before anything big runs; second line:
    the peak resident memory of two iterations beyond the peak after imports."""
    base = peak_rss_mib()
    with jax.set_mesh(make_mesh()):
        run = Iteration(w, algo)
        buffer = run.buffer()
        plan = run.rl.plan(run.state, buffer)
        run.rl.compiled_update = run.rl.compile_update(buffer, plan)
        update = run.rl.compiled_update.lower(run.state, (buffer, plan), None).compile().memory_analysis()
        del buffer
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
        print(json.dumps(dict(state_mib=state_bytes / 2 ** 20,
                              update_temp_mib=update.temp_size_in_bytes / 2 ** 20)), flush=True)
        for i in range(2):
            run.step(i)
    print(json.dumps(dict(peak_mib=peak_rss_mib() - base)), flush=True)


def memory_section(w: Workload):
    """Each algorithm runs twice in a fresh process sharing a persistent compilation cache: the
    first run fills the cache, the second (measured) loads its programs from it, so its peak
    is the iteration's own memory and not the compiler's. A child the kernel kills for memory
    is reported as such (`<algo>_peak_mib`: null, `<algo>_killed`), with XLA's figures."""
    workload = [f"{k}={v}" for k, v in dataclasses.asdict(w).items()]
    out, killed = {}, {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        for algo in ("p3o", "ppo"):
            for _ in range(2):
                res = subprocess.run([sys.executable, "-m", "p3o_jax.cli.bench", *workload,
                                      "workloads=custom", f"memory_child={algo}"],
                                     capture_output=True, text=True, env=env)
                lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
                out[algo] = {"peak_mib": None, **{k: v for l in lines for k, v in l.items()}}
                if res.returncode == -signal.SIGKILL:
                    killed[algo] = ("killed by the kernel (out of memory) at "
                                    f"{total_memory_gib():.1f} GiB of RAM")
                    break
                if res.returncode:
                    raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout,
                                                        res.stderr)
    p = w.name
    fields = {f"{p}.{algo}_{k}": (None if v is None else round(v, 1))
              for algo, r in out.items() for k, v in r.items()}
    fields.update({f"{p}.{algo}_killed": why for algo, why in killed.items()})
    if out["p3o"]["peak_mib"] is not None and out["ppo"]["peak_mib"] is not None:
        fields[f"{p}.p3o_saves_mib"] = round(out["ppo"]["peak_mib"] - out["p3o"]["peak_mib"], 1)
    fields[f"{p}.p3o_saves_xla_mib"] = round(
        sum(out["ppo"][k] - out["p3o"][k] for k in ("state_mib", "update_temp_mib")), 1)
    emit("memory", **fields)


def total_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2 ** 20


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchArgs:
    workloads: Annotated[str, SubsetOf(*WORKLOADS, "custom")] = "w1,w2,w2_var"  # W3 (tens
                                    # of minutes per section on a CPU) when named
    only: Annotated[str, SubsetOf(*SECTIONS)] = ",".join(SECTIONS)   # sections to run
    repeats: Annotated[int, Positive] = 5           # timed iterations (median)
    torch_threads: Annotated[tuple[int, ...], Positive] = tuple(sorted({1, os.cpu_count()}))
    reward_sleep_s: Annotated[float, Positive] = 1.0   # staleness: the reward's latency
    engine_slots: Annotated[tuple[int, ...], Positive] = ()   # engine: the slot counts to time
                                    # (a line each, against one static sampler); (): the
                                    # workload's `slots`
    memory_child: Annotated[str, OneOf("", *ALGORITHMS)] = ""   # internal: memory_section


def parse_args(argv: list[str]) -> tuple[BenchArgs, list[Workload]]:
    """`key=value` for BenchArgs' fields and the workload's (applied to every selected preset;
    `workloads=custom`: W1 with them); any other key is an error."""
    args, rest = tool_args(argv, BenchArgs())
    names = args.workloads.split(",")
    workloads = []
    for name in names:
        w, left = tool_args(rest, WORKLOADS.get(name, Workload()))
        if left:
            raise ConfigError(f"unknown config key {left[0].partition('=')[0]!r} (the "
                              f"benchmark's keys: the fields of Workload and BenchArgs)")
        workloads.append(w)
    return args, workloads


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=BenchArgs(), exp=None) + "\n\n"
              + "\n".join(section_lines(Workload(), "", "workload keys, W1's values")))
        return 0
    try:
        args, workloads = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.memory_child:
        memory_child(workloads[0], args.memory_child)
        return 0
    sections = args.only.split(",")
    limits = (machine_section(workloads) if {"machine", "iteration"} & set(sections) else None)
    for w in workloads:
        if "iteration" in sections:
            iteration_section(w, limits, args.repeats)
        if "loop" in sections and not w.limited:   # the loop's responses end at EOS
            loop_section(w, args.repeats)
        if "torch" in sections:
            torch_section(w, args.repeats, list(args.torch_threads))
        if "memory" in sections:
            memory_section(w)
        if "engine" in sections:
            engine_section(w, args.repeats, args.engine_slots)
    if "staleness" in sections:       # the toy task's, whatever the workloads
        staleness_section(args.reward_sleep_s, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
