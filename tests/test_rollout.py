"""Rollout scoring: the prompt-once forward equals the full forward on every row (values and
gradients, all families, left-padded prompts, right-padded responses), and the sampler's
log-probs equal the training forward's, so `logp_old` need not be recomputed."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import ops
from p3o_jax import model as M
from p3o_jax import rollout as R
from p3o_jax import sampler as S
from tests.test_sampler import FAMILIES, left_padded_prompts, random_params

B, K, P, N = 3, 2, 6, 5


def batch(vocab, seed=0):
    """[B, K, P + N] sequences: B left-padded prompts, K right-padded responses each (one of
    them empty, one EOS-short)."""
    prompts, prompt_mask = left_padded_prompts(B, P, vocab, [6, 3, 1], seed)
    rng = np.random.default_rng(seed + 1)
    lengths = np.array([[5, 2], [0, 5], [4, 1]])
    resp_mask = (np.arange(N)[None, None] < lengths[..., None]).astype(np.int32)
    resp = rng.integers(1, vocab, (B, K, N)) * resp_mask
    tokens, mask = S.concat_prompt_response(prompts, prompt_mask, jnp.asarray(resp, jnp.int32),
                                            jnp.asarray(resp_mask))
    return tokens, mask, jnp.asarray(resp_mask)


def full_hidden(params, cfg, tokens, mask):
    """Reference: the trunk on each [P + N] row on its own, states from position P - 1 on."""
    hidden, _ = M.forward(params, cfg, R.flat(tokens), R.flat(mask))
    return hidden[:, P - 1:].reshape(B, K, N + 1, -1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_once_forward_matches_full_rows(family):
    cfg = FAMILIES[family]
    params = random_params(cfg, seed=1)
    tokens, mask, resp_mask = batch(cfg.vocab_size)
    once = jax.jit(R.prompt_once_hidden, static_argnums=(1, 4))(params, cfg, tokens, mask, P)
    full = full_hidden(params, cfg, tokens, mask)
    chex.assert_shape(once, (B, K, N + 1, cfg.d_model))
    # Compared where the state is used: the prompt's last token and each real response token.
    used = np.concatenate([np.ones((B, K, 1), bool), np.asarray(resp_mask, bool)], -1)
    np.testing.assert_allclose(np.asarray(once)[used], np.asarray(full)[used], atol=2e-5)

    # The reward at the last real token (the prompt's own when the response is empty).
    head = dict(params, reward_head={"w": jnp.linspace(-1, 1, cfg.d_model), "b": jnp.array(0.3)})
    want = M.sequence_reward(head, cfg, R.flat(tokens), R.flat(mask)).reshape(B, K)
    np.testing.assert_allclose(R.response_reward(head, cfg, tokens, mask, P), want, atol=2e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_once_gradient_matches_full_rows(family):
    """d/dparams of a weighted sum of response log-probs: the shared prompt's gradient is the
    sum over its responses."""
    cfg = FAMILIES[family]
    params = random_params(cfg, seed=2)
    tokens, mask, resp_mask = batch(cfg.vocab_size, seed=3)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((B, K, N)), jnp.float32)

    def once(p):
        return jnp.sum(weights * resp_mask * R.response_logprobs(p, cfg, tokens, mask, P, 0.7))

    def full(p):
        hidden = full_hidden(p, cfg, tokens, mask)[:, :, :-1].reshape(B * K, N, -1)
        logits = M.lm_logits(p, cfg, hidden).reshape(B, K, N, -1)
        logp = ops.token_logprobs(logits, tokens[..., P:], 0.7)
        return jnp.sum(weights * resp_mask * logp)

    (v1, g1), (v2, g2) = jax.value_and_grad(once)(params), jax.value_and_grad(full)(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    chex.assert_trees_all_close(g1, g2, atol=5e-5, rtol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-3   # not vacuous


def test_sampler_logprobs_are_the_training_forwards():
    """`score` takes logp_old and entropy from the sampler: they match the recomputed ones
    (top-k/top-p truncation and temperature do not change what is reused)."""
    cfg = FAMILIES["gpt_neox"]
    policy, ref, rm = (random_params(cfg, seed=s) for s in (5, 6, 7))
    prompts, prompt_mask = left_padded_prompts(4, P, cfg.vocab_size, [6, 4, 2, 5], seed=8)
    scfg = S.SamplingConfig(max_new_tokens=N, temperature=0.8, top_k=20, top_p=0.9,
                            eos_ids=(3,))
    samples = S.sample_responses(policy, cfg, scfg, prompts, prompt_mask, jax.random.key(9))
    score = jax.jit(R.score, static_argnums=(3, 4, 8, 9))
    reused = score(policy, ref, rm, cfg, cfg, prompts, prompt_mask, samples, 0.8, False)
    recomputed = score(policy, ref, rm, cfg, cfg, prompts, prompt_mask, samples, 0.8, True)
    # recomputed, the sampler's log-probs are kept as the behaviour policy's (importance.py)
    assert reused.logp_behav is None
    np.testing.assert_array_equal(recomputed.logp_behav, reused.logp_old)
    chex.assert_trees_all_close(reused, recomputed.replace(logp_behav=None), atol=2e-5)
    chex.assert_shape(recomputed.rewards, (4, 2))
    assert float(jnp.abs(recomputed.seq_kl).max()) > 0.1    # policy and reference differ


def test_recomputed_kl_of_a_policy_to_itself_is_exactly_zero():
    """Evaluation recomputes pi_old's log-probs with the reference's forward: KL(pi || pi) is 0
    to the bit, in float32 and bfloat16 (the sampler's own log-probs round differently)."""
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(FAMILIES["llama"], dtype=dtype)
        policy = random_params(cfg, seed=10)
        prompts, prompt_mask = left_padded_prompts(2, P, cfg.vocab_size, [6, 3], seed=11)
        scfg = S.SamplingConfig(max_new_tokens=N)
        samples = S.sample_responses(policy, cfg, scfg, prompts, prompt_mask, jax.random.key(12))
        buf = R.score(policy, policy, policy, cfg, cfg, prompts, prompt_mask, samples, 1.0,
                      recompute_old=True)
        np.testing.assert_array_equal(buf.seq_kl, 0.0)
