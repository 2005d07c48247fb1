"""Continuous batching (p3o_jax/engine.py): the static sampler's responses, the scheduler's
slot-steps against a reference simulation, and a KV cache bounded by the slots."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import engine as E
from p3o_jax import sampler as S
from tests.test_sampler import FAMILIES, left_padded_prompts, random_params

B, n, P, N = 5, 3, 12, 16
R = B * n


@functools.cache
def setup(family):
    cfg = FAMILIES[family]
    params = random_params(cfg, seed=1)
    prompts, mask = left_padded_prompts(B, P, cfg.vocab_size, [12, 3, 7, 9, 1], seed=2)
    limits = np.random.default_rng(0).integers(1, N + 1, (B, n))
    limits[1, 2] = 0                                  # a request that ends before its first token
    return cfg, params, prompts, mask, jnp.asarray(limits, jnp.int32)


def both(family, slots, **sampling):
    """(static, continuous outputs [B, n, N], continuous slot-steps) on the same keys."""
    cfg, params, prompts, mask, limits = setup(family)
    scfg = S.SamplingConfig(max_new_tokens=N, **sampling)
    static = S.sample_responses(params, cfg, scfg, prompts, mask, jax.random.key(4), n=n,
                                max_lengths=limits)
    cont, slot_steps = E.sample_continuous(
        params, cfg, dataclasses.replace(scfg, engine="continuous", slots=slots), prompts,
        mask, jax.random.key(4), n=n, max_lengths=limits)
    return static, cont, int(slot_steps)


def assert_same_responses(static, cont):
    chex.assert_trees_all_equal_shapes_and_dtypes(static, cont)
    np.testing.assert_array_equal(cont.tokens, static.tokens)
    np.testing.assert_array_equal(cont.mask, static.mask)
    for f in ("logprobs", "raw_logprobs", "entropy"):
        np.testing.assert_allclose(getattr(cont, f), getattr(static, f), atol=2e-5, err_msg=f)


@pytest.mark.parametrize("family, slots", [("gpt2", 4), ("gpt_neox", 4), ("llama", 1),
                                           ("llama", 4), ("llama", R)])
def test_each_request_gets_the_static_samplers_response(family, slots):
    """Greedy and sampled: every (prompt, sample) gets the tokens the static sampler gives it
    with the same key, through 1, 4 or R slots; per-response limits, one of them 0."""
    for sampling in (dict(greedy=True), dict(temperature=0.8, top_k=10, top_p=0.9)):
        static, cont, _ = both(family, slots, **sampling)
        assert_same_responses(static, cont)
        assert int(cont.mask[1, 2].sum()) == 0


def test_stop_tokens_and_sequences_end_responses_as_in_the_static_sampler():
    """Stop ids and stop sequences taken from the unstopped responses, so that rows end at
    different steps (and slots refill at different times); the responses are the static
    sampler's, cut where it cuts them."""
    free, _, _ = both("llama", 4)
    rows = np.asarray(free.tokens).reshape(R, N)
    eos = (int(rows[0, 5]), int(rows[3, 2]))
    stop = (int(rows[6, 3]), int(rows[6, 4]))
    for sampling in (dict(eos_ids=eos), dict(eos_ids=(eos[0],), stop_sequences=(stop,))):
        static, cont, _ = both("llama", 4, **sampling)
        lengths = np.asarray(static.mask).sum(-1).ravel()
        assert len(set(lengths.tolist())) >= 4 and (lengths < free.mask.sum(-1).ravel()).any()
        assert_same_responses(static, cont)


def reference_schedule(lengths, slots: int, levels: int = E.WIDTH_LEVELS):
    """(loop iterations, slot-steps) of the engine's schedule, simulated request by request:
    requests enter the lowest free slots in order; a slot emits one token per iteration and
    frees at the end of the iteration of its last (a 0-length request: of the first); once
    the queue is empty and the live slots fit in the next width (C >> k), the tail runs at it."""
    queue, live, iterations, slot_steps = list(lengths), {}, 0, 0
    widths = [w for w in (slots >> k for k in range(levels)) if w >= 1]

    def admit():
        for s in range(slots):
            if s not in live and queue:
                live[s] = queue.pop(0)
    admit()
    for k, width in enumerate(widths):
        narrower = widths[k + 1] if k + 1 < len(widths) else 0
        while live and (queue or len(live) > narrower):
            live = {s: left - 1 for s, left in live.items() if left > 1}
            iterations, slot_steps = iterations + 1, slot_steps + width
            admit()
    return iterations, slot_steps


@pytest.mark.parametrize("slots", [1, 3, 4, 8, R])
def test_slot_steps_follow_the_schedule(slots):
    """The engine's iterations and slot-steps equal a request-by-request simulation of its
    schedule, from the response lengths it produced; with uneven lengths, far fewer
    slot-steps than the static sampler's R x the longest."""
    static, cont, slot_steps = both("gpt2", slots, temperature=1.0)
    lengths = np.asarray(cont.mask).sum(-1).ravel()
    assert (int(cont.num_steps), slot_steps) == reference_schedule(lengths.tolist(), slots)
    assert slot_steps >= lengths.sum()
    if slots == 4:
        assert slot_steps < 0.7 * R * int(static.num_steps), (slot_steps, lengths)


def test_the_kv_cache_is_bounded_by_the_slots():
    """XLA's temporaries of the compiled sampler: the continuous engine's grow with `slots`,
    not with the requests, and stay well below the static sampler's cache of R rows."""
    cfg = FAMILIES["llama"]
    params = random_params(cfg)
    long = 256
    prompts, mask = left_padded_prompts(8, 8, cfg.vocab_size, [8] * 8)

    def temp(engine, slots=0):
        scfg = S.SamplingConfig(max_new_tokens=long, engine=engine, slots=slots)
        fn = jax.jit(lambda p: E.sample(p, cfg, scfg, prompts, mask, jax.random.key(0), n=4))
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes
    row = 2 * cfg.n_layers * cfg.n_kv_heads * (8 + long) * cfg.head_dim * 4   # bytes per row
    static, four, eight = temp("static"), temp("continuous", 4), temp("continuous", 8)
    assert static >= 32 * row
    assert eight - four >= 4 * row * 0.9 and eight < 16 * row, (static, four, eight, row)


def test_evaluation_samples_one_response_per_prompt_on_either_engine():
    """`evaluate.sample_one` (one response per prompt, `engine.generate`) with the continuous
    engine: the static sampler's responses, from a queue of B requests through 2 slots."""
    from p3o_jax.evaluate import sample_one
    cfg, params, prompts, mask, _ = setup("llama")
    scfg = S.SamplingConfig(max_new_tokens=N, temperature=0.8, eos_ids=(5, 9, 17))
    static = sample_one(params, cfg, scfg, prompts, mask, jax.random.key(7))
    cont = sample_one(params, cfg, dataclasses.replace(scfg, engine="continuous", slots=2),
                      prompts, mask, jax.random.key(7))
    chex.assert_shape(cont.tokens, (B, 1, N))
    assert len(set(np.asarray(static.mask).sum(-1).ravel().tolist())) >= 3   # uneven lengths
    same_steps = dict(num_steps=np.int32(0))            # loop iterations: not comparable
    assert_same_responses(static._replace(**same_steps), cont._replace(**same_steps))


def test_engine_settings_are_checked():
    with pytest.raises(ValueError, match="static or continuous"):
        S.SamplingConfig(max_new_tokens=4, engine="paged")
    with pytest.raises(ValueError, match="slots must be >= 0"):
        S.SamplingConfig(max_new_tokens=4, engine="continuous", slots=-1)


class DecodeVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_continuous_decode_with_and_without_jit(self):
        """`continuous_decode` traced as is and under jit: the static sampler's responses."""
        cfg, params, prompts, mask, limits = setup("gpt_neox")
        scfg = S.SamplingConfig(max_new_tokens=N, temperature=1.0)
        static = S.sample_responses(params, cfg, scfg, prompts, mask, jax.random.key(4), n=n,
                                    max_lengths=limits)

        def decode(params, prompts, mask, limits):
            prompt = S.prefill(params, cfg, prompts, mask, 0)
            return E.continuous_decode(params, cfg, scfg, prompt, S.pair_keys(
                jax.random.key(4), B, n), limits.reshape(-1), n, 4)
        out, _ = self.variant(decode)(params, prompts, mask, limits)
        split = lambda x: x.reshape(B, n, N)
        cont = out._replace(**{f: split(getattr(out, f)) for f in out._fields
                               if f != "num_steps"})
        assert_same_responses(static, cont)
