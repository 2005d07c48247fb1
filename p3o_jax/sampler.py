"""Rollouts: batched KV-cache sampling, one compiled program per (model, sampling) config.

`generate` prefills LEFT-padded prompts [B, P] into a preallocated KV cache of length P + N,
then decodes inside a `lax.while_loop` that writes one token per step into the cache in place
and exits as soon as every row has emitted a stop token (`SamplingConfig.eos_ids`: EOS, a chat
model's end of turn) or reached its length limit. `sample_responses` draws n responses per
prompt, prefilling each prompt once and repeating its cache n times.

Shapes: B batch (prompts), n responses per prompt, P prompt length, N = max_new_tokens,
S = P + N cache length, V vocab.

Conventions (those of `model.py`): `mask = 1` marks a real token; prompts are left-padded and
responses right-padded (`pad_id` after the stop token; the stop token itself is kept with
mask 1). The response continues the positions of the prompt's real tokens, so
`concat_prompt_response` followed by the training forward (`positions_from_mask`) sees exactly
the sampled sequence.

Randomness: row b draws step t with `fold_in(keys[b], t)`, so its samples depend on its own key
and logits only -- not on the batch it sits in, its sharding, or how long other rows run.

Stop sequences (`SamplingConfig.stop_sequences`, e.g. the token ids of "\n\nHuman:" that end
an Assistant's turn): checked inside the loop on each row's last L generated tokens (L the
longest sequence), with no host sync. A row whose tokens end with one stops there: the stop
sequence is cut off and the primary EOS (`eos_ids[0]`) put in its first position (mask 1), so
the response is what came before it plus EOS, as the reward model saw in training. That EOS's
`raw_logprobs` and `logprobs` are log p(EOS) under the untruncated distribution at that
position (what the training forward computes for it); its entropy is that position's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax.model import (KV_CACHE_AXES, ModelConfig, forward, lm_logits, param_axes,
                           weight_compute_dtype)
from p3o_jax.packing import Packing, prompt_forward
from p3o_jax.sharding import constrain, fsdp_gathered_spec


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable; part of the compiled program).

    `top_k = 0` and `top_p = 1` disable truncation. `greedy`
    takes the argmax and ignores temperature/top-k/top-p. `eos_ids`: the token ids that end a
    response, kept as its last token (`stop_tokens.read_eos_ids`; () disables stopping).
    `stop_sequences`: token-id sequences that end a response (replaced by the primary EOS
    `eos_ids[0]`).
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    gather_once: bool = True        # FSDP: gather the weights once per call, not at every
                                    # decode step (`weights_for_decode`)
    engine: str = "static"          # `engine.sample`: "static" (`sample_responses`: a cache row
                                    # per response, decoded until the longest ends) or
                                    # "continuous" (`slots` rows refilled as responses end)
    slots: int = 0                  # continuous: decode slots (0: engine.slot_count's rule)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0 (or greedy=True), got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.eos_ids, tuple)
                and all(isinstance(t, int) for t in self.eos_ids)):
            raise ValueError(f"sampling.eos_ids must be a tuple of token ids, got {self.eos_ids}")
        if self.stop_sequences and not self.eos_ids:
            raise ValueError("sampling.stop_sequences need eos_ids to end the response with")
        if self.engine not in ("static", "continuous"):
            raise ValueError(f"sampling engine must be static or continuous, got {self.engine!r}")
        if self.slots < 0:
            raise ValueError(f"sampling slots must be >= 0, got {self.slots}")
        if not all(seq and all(isinstance(t, int) for t in seq) for seq in self.stop_sequences):
            raise ValueError(f"sampling.stop_sequences must be non-empty tuples of token ids, "
                             f"got {self.stop_sequences}")


class SampleOutput(NamedTuple):
    """Sampled responses; leading dims [B] (`generate`) or [B, n] (`sample_responses`).

    tokens:       int32 [..., N], `pad_id` after the stop token (which is included, mask 1).
    mask:         int32 [..., N], 1 on generated tokens.
    logprobs:     float32 [..., N], log-prob of each token under the distribution it was drawn
                  from (after temperature, top-k, top-p; 0 for greedy); 0 where mask = 0.
    raw_logprobs: float32 [..., N], log_softmax(logits / temperature) at the token, without
                  truncation (temperature 1 for greedy); 0 where mask = 0. These are the
                  policy's log-probs that training needs (`rollout.score` reuses them).
    entropy:      float32 [..., N], entropy of that untruncated distribution; 0 where mask = 0.
    num_steps:    int32 [], sampling steps run (= longest response; < N on early exit).
    """
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    entropy: jax.Array
    num_steps: jax.Array


class DecodeState(NamedTuple):
    """KV cache plus what the next decode step needs.

    cache:     per layer {"k", "v": [B, K, S, E]}.
    key_mask:  int32 [B, S], 1 on cache slots holding real tokens.
    positions: int32 [B], position of the next token (= real tokens so far).
    index:     int32 [], cache slot of the next token.
    logits:    float32 [B, V], next-token logits.
    """
    cache: tuple
    key_mask: jax.Array
    positions: jax.Array
    index: jax.Array
    logits: jax.Array


def weights_for_decode(params, cfg: ModelConfig, scfg: SamplingConfig):
    """The policy as the decode loop reads it under FSDP (`SamplingConfig.gather_once`):
    every param all-gathered over `fsdp` once per call, before the prompt pass, its matrices
    in the compute dtype (the model casts them so anyway: the same values). No decode step
    then gathers anything; the price is one compute-dtype copy of the model per device (split
    over `tensor`). Without it each block's weights are gathered as the block runs
    (`model.fetched_after`): two blocks resident, but the whole model crosses the interconnect
    at every token. LoRA adapters (replicated) pass through; unchanged without `fsdp`."""
    mesh = jax.sharding.get_abstract_mesh()
    if not scfg.gather_once or mesh.empty or mesh.shape["fsdp"] == 1:
        return params

    def gather(p, axes):
        if isinstance(p, dict):
            return {k: gather(v, axes.get(k) if axes else None) for k, v in p.items()}
        if axes is None:
            return p
        spec = fsdp_gathered_spec(axes, p.shape, mesh.shape)
        return jax.lax.with_sharding_constraint(p.astype(weight_compute_dtype(cfg, p)), spec)
    return gather(params, param_axes(cfg))


def prefill(params, cfg: ModelConfig, prompts, prompt_mask, max_new_tokens: int,
            packing: Packing | None = None) -> DecodeState:
    """Run left-padded prompts [B, P] (mask [B, P]; `packing`: the same prompts packed, see
    `packing.py`) into a cache of length P + N."""
    B, P = prompts.shape
    S = P + max_new_tokens
    if cfg.family == "gpt2" and S > cfg.max_len:
        raise ValueError(f"sampler: prompt length {P} + max_new_tokens {max_new_tokens} exceeds "
                         f"the position table (model.max_len={cfg.max_len})")
    prompt_mask = prompt_mask.astype(jnp.int32)
    # Left padding puts every row's last real prompt token at P - 1.
    last, cache = prompt_forward(params, cfg, prompts, prompt_mask, packing)
    cache = jax.tree.map(lambda c: constrain(
        jnp.pad(c, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0))), KV_CACHE_AXES), cache)
    key_mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens)))
    logits = lm_logits(params, cfg, last[:, None])[:, 0]
    return DecodeState(cache, key_mask, prompt_mask.sum(-1), jnp.asarray(P, jnp.int32), logits)


def write_column(buf, col, index):
    """col [B] into buf [B, M] at column `index`: an int, or int [B] (a column per row)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], index, 1)
    return jax.vmap(lambda b, c, i: jax.lax.dynamic_update_slice_in_dim(b, c[None], i, 0))(
        buf, col, index)


def decode_step(params, cfg: ModelConfig, state: DecodeState, tokens, active) -> DecodeState:
    """Write tokens [B] at cache slot `state.index` (visible to later steps where `active` [B]
    is true) and compute the logits of the token after them. `state.index` is an int (every
    row's next slot: all advance) or int [B] (each row's own, continuous batching: the active
    ones advance)."""
    active_ = active.astype(jnp.int32)
    key_mask = write_column(state.key_mask, active_, state.index)
    hidden, cache = forward(params, cfg, tokens[:, None], key_mask, state.cache, state.index,
                            positions=state.positions[:, None])
    logits = lm_logits(params, cfg, hidden)[:, 0]
    index = state.index + (1 if jnp.ndim(state.index) == 0 else active_)
    return DecodeState(cache, key_mask, state.positions + active_, index, logits)


def _take(x, idx):
    """x [B, M], idx [B] -> x[b, idx[b]]: [B]."""
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def nucleus_mask(probs, top_p: float):
    """Top-p support of probs [B, M]: keep token j iff the mass of the tokens strictly more
    likely than j is < top_p (the smallest most-likely set reaching top_p; tokens tied at the
    boundary are all kept).

    No sort (slow on CPU; on a vocab-sharded mesh it would gather the vocabulary): the
    threshold is found by bisection on the float32 bit pattern, which orders non-negative
    floats, in 32 masked sums.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)                    # [B, M]

    def halve(_, bounds):
        # Invariant: mass above `lo` >= top_p > mass above `hi`.
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits > mid[:, None], probs, 0.0), -1) < top_p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.full(probs.shape[:1], -1, jnp.int32)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, bits.max(-1)))
    return bits >= hi[:, None]


def _first(hit, fallback):
    """Index of the first true entry of each row of hit [B, M]; `fallback` [B] where none is."""
    return jnp.where(hit.any(-1), jnp.argmax(hit, -1), fallback)


def _last(hit):
    """Index of the last true entry of each row of hit [B, M] (0 where none is)."""
    return hit.shape[-1] - 1 - jnp.argmax(hit[:, ::-1], -1)


def _inverse_cdf(probs, uniforms):
    """Index drawn from each row of unnormalised probs [B, M] (zeros are never drawn), given
    uniforms [B] in [0, 1): the first entry whose cumulative mass exceeds `uniform * total`.
    Returns (index int32 [B], total [B]).

    Two-level search, about sqrt(M) wide at each level, instead of a cumulative sum over all M
    entries (a multi-pass reduce-window on CPU, as costly as the LM head at decode): the block
    whose cumulative mass exceeds the target, then the entry within that block. Rounding can
    only move the draw to a neighbouring entry of nonzero mass.
    """
    B, M = probs.shape
    block = 1 << max(math.ceil(math.log2(M) / 2), 1)
    blocks = jnp.pad(probs, ((0, 0), (0, -M % block))).reshape(B, -1, block)
    mass = blocks.sum(-1)                                                      # [B, M / block]
    cdf = jnp.cumsum(mass, -1)
    target = uniforms * cdf[:, -1]
    b = _first((cdf > target[:, None]) & (mass > 0), _last(mass > 0))
    within = jnp.take_along_axis(blocks, b[:, None, None], 1)[:, 0]            # [B, block]
    target = target - (_take(cdf, b) - _take(mass, b))
    i = _first((jnp.cumsum(within, -1) > target[:, None]) & (within > 0), _last(within > 0))
    return (b * block + i).astype(jnp.int32), cdf[:, -1]


def sample_token(scfg: SamplingConfig, logits, keys, step):
    """Draw one token per row from logits [B, V] with keys [B] at decode step `step` (int, or
    int [B]: each row's own).

    Returns (tokens int32 [B], logprobs [B] under the truncated distribution, raw_logprobs [B],
    entropy [B] of the untruncated distribution). Sampling is by inverse CDF from one uniform
    per row (far cheaper on CPU than Gumbel noise over the vocabulary); top-k takes a partial
    sort of k candidates, top-p a sort-free mask.
    """
    scaled = logits if scfg.greedy else logits / scfg.temperature
    top = jnp.max(scaled, -1, keepdims=True)
    unnormalised = jnp.exp(scaled - top)
    total = jnp.sum(unnormalised, -1)
    log_z = top[:, 0] + jnp.log(total)
    entropy = log_z - jnp.sum(unnormalised * scaled, -1) / total
    if scfg.greedy:
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape), _take(scaled, tokens) - log_z, entropy
    uniforms = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(
        keys, jnp.broadcast_to(step, keys.shape))
    if not scfg.top_k and scfg.top_p == 1:
        choice, _ = _inverse_cdf(unnormalised, uniforms)
        raw = _take(scaled, choice) - log_z
        return choice, raw, raw, entropy
    candidates, indices = scaled, None
    if scfg.top_k:
        candidates, indices = jax.lax.top_k(scaled, min(scfg.top_k, logits.shape[-1]))
    if scfg.top_p < 1:
        keep = nucleus_mask(jnp.exp(jax.nn.log_softmax(candidates)), scfg.top_p)
        candidates = jnp.where(keep, candidates, -jnp.inf)
    # The draw's pass over the unnormalised probabilities also gives their normaliser.
    choice, kept = _inverse_cdf(jnp.exp(candidates - top), uniforms)
    logp = _take(candidates, choice) - top[:, 0] - jnp.log(kept)
    tokens = choice if indices is None else _take(indices, choice).astype(jnp.int32)
    return tokens, logp, _take(scaled, tokens) - log_z, entropy


class StopWindow(NamedTuple):
    """Each row's last L generated tokens and the log p(EOS) at each of those steps.

    tokens:   int32 [B, L], oldest first; -1 before the first tokens (matches no stop).
    eos_logp: float32 [B, L], log p(EOS) under the untruncated distribution at those steps.
    """
    tokens: jax.Array
    eos_logp: jax.Array


def stop_table(stop_sequences: tuple[tuple[int, ...], ...]):
    """(ids int32 [K, L], lengths int32 [K]): the K sequences right-aligned in L columns
    (-1 to their left), so that a window of the last L tokens ends with sequence k iff it
    equals ids[k] wherever ids[k] >= 0."""
    L = max(map(len, stop_sequences))
    ids = np.full((len(stop_sequences), L), -1, np.int32)
    for k, seq in enumerate(stop_sequences):
        ids[k, L - len(seq):] = seq
    return jnp.asarray(ids), jnp.asarray([len(seq) for seq in stop_sequences], jnp.int32)


def _eos_logprob(scfg: SamplingConfig, logits):
    """log p(EOS) [B] under the untruncated distribution (temperature 1 when greedy), the
    one `raw_logprobs` reports."""
    scaled = logits if scfg.greedy else logits / scfg.temperature
    return scaled[:, scfg.eos_ids[0]] - jax.nn.logsumexp(scaled, -1)


def _cut_at_stop(scfg: SamplingConfig, out: SampleOutput, window: StopWindow, active):
    """Rows (among `active` [B]) whose last tokens, through step t = out.num_steps - 1 (int,
    or int [B]), end with a stop sequence: that sequence becomes [EOS, pad, ...] (mask 1, 0,
    ...). Returns (out, stopped bool [B]). The longest matching sequence is the one cut."""
    ids, lengths = stop_table(scfg.stop_sequences)
    hit = jnp.all((window.tokens[:, None] == ids) | (ids < 0), -1) & active[:, None]   # [B, K]
    length = jnp.max(jnp.where(hit, lengths, 0), -1)                                  # [B]
    stopped = length > 0
    t = out.num_steps - 1
    start = t + 1 - length                                   # the stop's first column
    cols = jnp.arange(out.tokens.shape[1])[None]
    erase = stopped[:, None] & (cols >= start[:, None]) & (cols <= jnp.reshape(t, (-1, 1)))
    at_eos = stopped[:, None] & (cols == start[:, None])
    L = window.tokens.shape[1]
    eos_logp = _take(window.eos_logp, jnp.clip(L - length, 0, L - 1))[:, None]
    cut = lambda x, eos_value: jnp.where(at_eos, eos_value, jnp.where(erase, 0, x))
    return out._replace(
        tokens=jnp.where(at_eos, scfg.eos_ids[0], jnp.where(erase, scfg.pad_id, out.tokens)),
        mask=cut(out.mask, 1), logprobs=cut(out.logprobs, eos_logp),
        raw_logprobs=cut(out.raw_logprobs, eos_logp),
        entropy=jnp.where(erase & ~at_eos, 0.0, out.entropy)), stopped


def empty_window(scfg: SamplingConfig, rows: int) -> StopWindow:
    """The stop window of `rows` rows before their first token."""
    L = max(map(len, scfg.stop_sequences), default=0)
    return StopWindow(jnp.full((rows, L), -1, jnp.int32), jnp.zeros((rows, L), jnp.float32))


def emit_token(scfg: SamplingConfig, logits, out: SampleOutput, window: StopWindow, done, *,
               keys, limit):
    """Sample step `out.num_steps` (int, or int [B] in continuous batching) from logits [B, V]
    for the rows not yet `done` [B] with their keys [B]; write it to the outputs [B, N] and
    decide which rows are done now: a stop token, a stop sequence (cut, `_cut_at_stop`) or
    their length limit [B]. Returns (out, window, done, tokens [B], active [B]: the rows that
    sampled)."""
    t = out.num_steps
    tokens, logprobs, raw, entropy = sample_token(scfg, logits, keys, t)
    active = ~done
    tokens = jnp.where(active, tokens, scfg.pad_id)
    write = lambda buf, col: write_column(buf, col, t)
    live = lambda x: jnp.where(active, x, 0.0)
    out = SampleOutput(write(out.tokens, tokens), write(out.mask, active.astype(jnp.int32)),
                       write(out.logprobs, live(logprobs)), write(out.raw_logprobs, live(raw)),
                       write(out.entropy, live(entropy)), t + 1)
    done = done | (t + 1 >= limit)
    if scfg.eos_ids:
        done = done | jnp.isin(tokens, jnp.asarray(scfg.eos_ids, jnp.int32))
    if scfg.stop_sequences:
        shift = lambda buf, col: jnp.concatenate([buf[:, 1:], col[:, None]], 1)
        window = StopWindow(shift(window.tokens, tokens),
                            shift(window.eos_logp, _eos_logprob(scfg, logits)))
        out, stopped = _cut_at_stop(scfg, out, window, active)
        done = done | stopped
    return out, window, done, tokens, active


def row_limits(max_lengths, rows: int, N: int):
    """Each row's length limit int [rows]: `max_lengths` [rows] clipped to N, or N for all."""
    return jnp.full((rows,), N, jnp.int32) if max_lengths is None else jnp.minimum(max_lengths, N)


def per_response(max_lengths, n: int):
    """Limits per response [B n] from limits per prompt [B] (each repeated n times) or per
    response [B, n]; None stays None."""
    if max_lengths is None:
        return None
    return jnp.repeat(max_lengths, n) if max_lengths.ndim == 1 else max_lengths.reshape(-1)


def _decode(params, cfg: ModelConfig, scfg: SamplingConfig, state: DecodeState, keys,
            max_lengths) -> SampleOutput:
    """Sample up to N tokens per row from a prefilled state, in one `lax.while_loop`."""
    B, N = keys.shape[0], scfg.max_new_tokens
    limit = row_limits(max_lengths, B, N)
    batch = lambda x: constrain(x, ("act_batch", None))
    zeros = lambda dtype=jnp.float32: batch(jnp.zeros((B, N), dtype))
    out = SampleOutput(batch(jnp.full((B, N), scfg.pad_id, jnp.int32)), zeros(jnp.int32),
                       zeros(), zeros(), zeros(), jnp.asarray(0, jnp.int32))
    window = empty_window(scfg, B)
    emit = functools.partial(emit_token, scfg, keys=keys, limit=limit)

    def cond(carry):
        _, out, _, done, _, _ = carry
        return (out.num_steps < N) & ~jnp.all(done)

    def body(carry):
        state, out, window, done, tokens, active = carry
        state = decode_step(params, cfg, state, tokens, active)
        return (state, *emit(state.logits, out, window, done))

    carry = (state, *emit(state.logits, out, window, limit <= 0))
    return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "scfg"))
def generate(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, keys,
             max_lengths=None, packing: Packing | None = None) -> SampleOutput:
    """Sample one response per row.

    prompts, prompt_mask: int [B, P], left-padded, at least one real token per row.
    keys: typed PRNG keys [B]. max_lengths: optional int [B] per-row limits (clipped to N).
    Returns a SampleOutput with [B, N].

    The cache is allocated inside the compiled program and updated in place by the loop, so
    no input buffer needs donating.
    """
    params = weights_for_decode(params, cfg, scfg)
    state = prefill(params, cfg, prompts, prompt_mask, scfg.max_new_tokens, packing)
    return _decode(params, cfg, scfg, state, keys, max_lengths)


def pair_keys(key, batch: int, n: int):
    """The per-response keys `sample_responses` uses: [B * n], response j of prompt b at b * n + j."""
    return jax.random.split(key, batch * n)


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "n"))
def sample_responses(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, key,
                     n: int = 2, max_lengths=None, packing: Packing | None = None) -> SampleOutput:
    """Sample n >= 2 independent responses per prompt; outputs are laid out [B, n, N].

    Each prompt is prefilled once and its cache repeated n times along the batch, which gives
    the same samples as `generate` on `jnp.repeat(prompts, n, 0)` with keys `pair_keys(key, B, n)`.
    This is the static engine; `engine.sample` picks it or the continuous one by `scfg.engine`.
    key: one typed PRNG key. max_lengths: optional int [B] (per prompt) or [B, n] (per
    response). packing: the prompts packed (`packing.pack_prompts`) for the prefill.
    """
    if n < 2:
        raise ValueError(f"sample_responses: n must be >= 2, got {n}")
    B = prompts.shape[0]
    params = weights_for_decode(params, cfg, scfg)
    state = prefill(params, cfg, prompts, prompt_mask, scfg.max_new_tokens, packing)
    repeat = lambda x: jnp.repeat(x, n, axis=0)
    state = state._replace(
        cache=jax.tree.map(lambda c: constrain(repeat(c), KV_CACHE_AXES), state.cache),
        key_mask=repeat(state.key_mask), positions=repeat(state.positions),
        logits=repeat(state.logits))
    if max_lengths is not None:
        max_lengths = per_response(max_lengths, n)
    out = _decode(params, cfg, scfg, state, pair_keys(key, B, n), max_lengths)
    split = lambda x: x.reshape(B, n, *x.shape[1:])
    return out._replace(**{f: split(getattr(out, f)) for f in out._fields if f != "num_steps"})


def concat_prompt_response(prompt, prompt_mask, response, response_mask):
    """Full sequences for scoring: left-padded prompt [..., P] then right-padded response
    [..., N] -> (tokens [..., P + N], mask [..., P + N]).

    A prompt with fewer leading dims than the response (e.g. [B, P] with responses [B, n, N])
    is broadcast over the extra response dims.
    """
    lead = response.shape[:-1]
    extra = len(lead) - (prompt.ndim - 1)
    expand = lambda x: jnp.broadcast_to(
        x.reshape(x.shape[:-1] + (1,) * extra + x.shape[-1:]), lead + x.shape[-1:])
    tokens = jnp.concatenate([expand(prompt), response.astype(prompt.dtype)], -1)
    mask = jnp.concatenate([expand(prompt_mask).astype(jnp.int32),
                            response_mask.astype(jnp.int32)], -1)
    return tokens, mask
