"""Continuous batching: responses decoded in a fixed number of slots, each slot refilled from
the queue of (prompt, sample) requests as soon as its response ends, inside `lax.while_loop`s
(one per decode width: `continuous_decode`).

The static sampler (`sampler._decode`) gives each of the B n responses a row of one KV cache
[B n, P + N] and decodes until the longest ends: memory grows with the batch, and every finished
row rides along to the end. Here the cache has `slots` rows [slots, P + N], so memory is bounded
by the slots, and a decode step runs `slots` rows, whoever is in them. With responses of very
uneven length (a 20-token answer beside a 500-token chain of thought) the executed slot-steps
approach the real tokens instead of B n times the longest.

Each prompt is prefilled once (all B together, packed as for the static sampler); its cache
[K, P, E] and last logits are kept, and a request (b, j) entering a slot copies them in, so its
n samples share one prefill. One loop iteration:

  1. decode: each slot whose last sampled token is not yet in its cache writes it at its own
     cache slot (`model.write_cache`, an index per row) and computes the next logits; a slot
     that has just been refilled keeps its prompt's logits;
  2. sample: every live slot draws its next token (`sampler.emit_token`) with its request's
     key (`sampler.pair_keys`) at its own step, so a response is drawn exactly as the static
     sampler draws it: the same key, the same step, the same logits up to rounding;
  3. retire: slots whose response ended (stop token, stop sequence, length limit) copy their
     outputs [N] to their request's row of the results [B n, N];
  4. admit: free slots take the next requests in order (prompt-major, as `pair_keys` lays
     them out), under a `lax.cond`, so only the iterations where a response ended pay for it.

Nothing leaves the device between tokens. Parity with the static sampler: per row, the two run
the same operations on the same values; what differs is the batch a row sits in (`slots` rows
against B n), which XLA may tile differently, so logits agree to rounding: the tokens are
the static sampler's on the test models (tests/test_engine.py), and on large ones up to a draw
that rounding flips (bench/NOTES.md).

Shapes: B prompts, n samples each, R = B n requests, P prompt length, N = max_new_tokens,
C = slots, V vocab.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from p3o_jax.model import KV_CACHE_AXES, ModelConfig
from p3o_jax.packing import Packing
from p3o_jax import sampler
from p3o_jax.sampler import (DecodeState, SampleOutput, SamplingConfig, StopWindow,
                             decode_step, emit_token, empty_window, pair_keys, per_response,
                             prefill, row_limits, sample_responses, weights_for_decode)
from p3o_jax.sharding import constrain


class Slots(NamedTuple):
    """The decode slots' state [C, ...].

    state:   their KV cache [C, K, P + N, E] per layer, key mask, positions, next cache slot
             (int [C], each its own) and next-token logits.
    request: int32 [C], the request in the slot (b n + j), -1 when free.
    out:     SampleOutput [C, N] of the slot's response so far; `num_steps` int [C], its
             tokens so far.
    window:  the stop-sequence window [C, L].
    done:    bool [C], the response has ended (or the slot is free).
    tokens:  int32 [C], the token sampled last.
    pending: bool [C], that token is not yet in the cache.
    """
    state: DecodeState
    request: jax.Array
    out: SampleOutput
    window: StopWindow
    done: jax.Array
    tokens: jax.Array
    pending: jax.Array


WIDTH_LEVELS = 3      # decode widths C, C/2, C/4: the tail, once the queue is empty, runs
                      # on the narrowest that holds the live slots (`continuous_decode`)


def slot_count(scfg: SamplingConfig, requests: int) -> int:
    """The decode slots for `requests` responses: `scfg.slots`, or when 0 a quarter of the
    requests, at least 8; never more than the requests."""
    return min(scfg.slots or max(8, requests // 4), requests)


def _empty(scfg: SamplingConfig, prompt: DecodeState, C: int) -> Slots:
    """C free slots; `prompt` is the prefilled prompts' state (its cache fixes the dtype and
    P)."""
    N, P = scfg.max_new_tokens, prompt.key_mask.shape[1]
    cache = jax.tree.map(lambda c: constrain(
        jnp.zeros((C, c.shape[1], P + N, c.shape[3]), c.dtype), KV_CACHE_AXES), prompt.cache)
    rows = lambda x: constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    state = DecodeState(cache, rows(jnp.zeros((C, P + N), jnp.int32)),
                        rows(jnp.zeros((C,), jnp.int32)), rows(jnp.full((C,), P, jnp.int32)),
                        rows(jnp.zeros((C, prompt.logits.shape[-1]), prompt.logits.dtype)))
    out = jax.tree.map(rows, _fresh_out(scfg, C))
    return Slots(state, jnp.full((C,), -1, jnp.int32), out, empty_window(scfg, C),
                 jnp.ones((C,), bool), jnp.full((C,), scfg.pad_id, jnp.int32),
                 jnp.zeros((C,), bool))


def _admit(scfg: SamplingConfig, prompt: DecodeState, n: int, limit, slots: Slots, head):
    """Free slots take requests head, head + 1, ... (< R): the prompt's cache, mask, position
    and logits, a fresh output row (a request whose limit [R] is 0 ends at once, empty).
    Returns (slots, the new head)."""
    R = limit.shape[0]
    free = slots.request < 0
    wanted = head + jnp.cumsum(free) - 1
    admit = free & (wanted < R)

    def fill(slots):
        b = jnp.where(admit, wanted, 0) // n
        P = prompt.key_mask.shape[1]
        pick = lambda new, old: jnp.where(admit.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
        cache = jax.tree.map(lambda c, p: c.at[:, :, :P].set(pick(p[b], c[:, :, :P])),
                             slots.state.cache, prompt.cache)
        key_mask = slots.state.key_mask.at[:, :P].set(pick(prompt.key_mask[b],
                                                           slots.state.key_mask[:, :P]))
        key_mask = key_mask.at[:, P:].set(pick(0, key_mask[:, P:]))
        state = DecodeState(cache, key_mask, pick(prompt.positions[b], slots.state.positions),
                            pick(P, slots.state.index), pick(prompt.logits[b], slots.state.logits))
        out = jax.tree.map(pick, _fresh_out(scfg, admit.shape[0]), slots.out)
        window = jax.tree.map(pick, empty_window(scfg, admit.shape[0]), slots.window)
        return Slots(state, jnp.where(admit, wanted, slots.request), out, window,
                     pick(limit[jnp.minimum(wanted, R - 1)] <= 0, slots.done), slots.tokens,
                     slots.pending & ~admit)
    slots = jax.lax.cond(admit.any(), fill, lambda s: s, slots)
    return slots, head + admit.sum(dtype=jnp.int32)


def _fresh_out(scfg: SamplingConfig, C: int) -> SampleOutput:
    """C rows of outputs [C, N] before their first token (`num_steps` int [C])."""
    zeros = lambda dtype=jnp.float32: jnp.zeros((C, scfg.max_new_tokens), dtype)
    return SampleOutput(jnp.full((C, scfg.max_new_tokens), scfg.pad_id, jnp.int32),
                        zeros(jnp.int32), zeros(), zeros(), zeros(), jnp.zeros((C,), jnp.int32))


def _retire(slots: Slots, results: SampleOutput, R: int):
    """Slots whose response has ended copy it to their request's row; they become free."""
    ended = slots.done & (slots.request >= 0)

    def copy(results):
        rows = jnp.where(ended, slots.request, R)           # R: out of bounds, dropped
        put = lambda res, x: res.at[rows].set(x, mode="drop")
        return results._replace(**{f: put(getattr(results, f), getattr(slots.out, f))
                                   for f in SampleOutput._fields if f != "num_steps"})
    results = jax.lax.cond(ended.any(), copy, lambda r: r, results)
    return slots._replace(request=jnp.where(ended, -1, slots.request)), results


def _compacted(slots: Slots, width: int) -> Slots:
    """The live slots moved to the front, and the first `width` rows kept (all the live
    ones, when called): one gather of every slot array, the cache included."""
    order = jnp.argsort(slots.request < 0, stable=True)[:width]   # live first, in slot order
    return jax.tree.map(lambda x: x[order], slots)


def continuous_decode(params, cfg: ModelConfig, scfg: SamplingConfig, prompt: DecodeState,
                      keys, limit, n: int, slots: int):
    """Decode R = B n requests (request b n + j: prompt b, key keys[b n + j], length limit
    limit[b n + j]) from the prefilled prompts `prompt` (cache [B, K, P, E]) through `slots`
    slots. Returns SampleOutput [R, N] (`num_steps`: the loop iterations) and the decode
    slot-steps run (int []).

    The loop runs in up to `WIDTH_LEVELS` phases of decreasing width C, C/2, C/4: once the
    queue is empty and the live slots fit in the next width, they are compacted into it and
    the tail decodes only those rows, each phase its own `while_loop` on arrays of its width.
    """
    R, N = keys.shape[0], scfg.max_new_tokens
    zeros = lambda dtype=jnp.float32: constrain(jnp.zeros((R, N), dtype), ("act_batch", None))
    results = SampleOutput(constrain(jnp.full((R, N), scfg.pad_id, jnp.int32),
                                     ("act_batch", None)), zeros(jnp.int32), zeros(), zeros(),
                           zeros(), jnp.asarray(0, jnp.int32))
    s, head = _admit(scfg, prompt, n, limit, _empty(scfg, prompt, slots), jnp.int32(0))

    def body(carry):
        s, results, head = carry
        state = decode_step(params, cfg, s.state, s.tokens, s.pending)
        state = state._replace(logits=jnp.where(s.pending[:, None], state.logits,
                                                 s.state.logits))
        r = jnp.maximum(s.request, 0)
        out, window, done, tokens, active = emit_token(
            scfg, state.logits, s.out, s.window, s.done, keys=keys[r], limit=limit[r])
        s = Slots(state, s.request, out, window, done, tokens, active & ~done)
        s, results = _retire(s, results, R)
        s, head = _admit(scfg, prompt, n, limit, s, head)
        return s, results._replace(num_steps=results.num_steps + 1), head

    widths = [w for w in (slots >> k for k in range(WIDTH_LEVELS)) if w >= 1]
    slot_steps = jnp.int32(0)
    for k, width in enumerate(widths):
        narrower = widths[k + 1] if k + 1 < len(widths) else 0

        def cond(carry):
            s, _, head = carry
            live = (s.request >= 0).sum()
            return (live > 0) & ((head < R) | (live > narrower))
        if k:
            s = _compacted(s, width)
        steps = results.num_steps
        s, results, head = jax.lax.while_loop(cond, body, (s, results, head))
        slot_steps = slot_steps + width * (results.num_steps - steps)
    return results, slot_steps


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "n"))
def sample_continuous(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, key,
                      n: int = 2, max_lengths=None, packing: Packing | None = None):
    """`sampler.sample_responses` through `slot_count` decode slots: the
    same arguments. Returns (SampleOutput [B, n, N] with `num_steps` the loop's iterations,
    the decode slot-steps run int [])."""
    B = prompts.shape[0]
    limit = row_limits(per_response(max_lengths, n), B * n, scfg.max_new_tokens)
    out, slot_steps = _decode_requests(params, cfg, scfg, prompts, prompt_mask,
                                       pair_keys(key, B, n), limit, n, packing)
    split = lambda x: x.reshape(B, n, *x.shape[1:])
    return out._replace(**{f: split(getattr(out, f)) for f in out._fields if f != "num_steps"}
                        ), slot_steps


def sample(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, key, n: int = 2,
           max_lengths=None, packing: Packing | None = None) -> SampleOutput:
    """n responses per prompt, SampleOutput [B, n, N], by `scfg.engine`: the static sampler
    (`sampler.sample_responses`) or the continuous one (`sample_continuous`). What the RL loop
    and the reward model's pairs sample with."""
    if scfg.engine == "continuous":
        return sample_continuous(params, cfg, scfg, prompts, prompt_mask, key, n, max_lengths,
                                 packing)[0]
    return sample_responses(params, cfg, scfg, prompts, prompt_mask, key, n, max_lengths, packing)


def generate(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, keys,
             max_lengths=None, packing: Packing | None = None) -> SampleOutput:
    """One response per prompt [B, N] with keys [B], as `sampler.generate` takes them, by
    `scfg.engine`: the static sampler or the continuous one (its `slot_count` slots over the B
    requests). What evaluation samples with."""
    if scfg.engine != "continuous":
        return sampler.generate(params, cfg, scfg, prompts, prompt_mask, keys, max_lengths,
                                packing)
    limit = row_limits(max_lengths, prompts.shape[0], scfg.max_new_tokens)
    return _decode_requests(params, cfg, scfg, prompts, prompt_mask, keys, limit, 1, packing)[0]


def _decode_requests(params, cfg: ModelConfig, scfg: SamplingConfig, prompts, prompt_mask, keys,
                     limit, n: int, packing: Packing | None):
    """The prompts prefilled once, then their R = B n requests (keys, limit [R]) through
    `slot_count` slots: `continuous_decode`'s (SampleOutput [R, N], slot-steps)."""
    params = weights_for_decode(params, cfg, scfg)
    prompt = prefill(params, cfg, prompts, prompt_mask, 0, packing)
    return continuous_decode(params, cfg, scfg, prompt, keys, limit, n,
                             slot_count(scfg, keys.shape[0]))
