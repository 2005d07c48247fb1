"""Packing (`p3o_jax/packing.py`): the layouts of prompts and of prompt-and-responses trees, and
every computation that packs (the prompt pass, sampling, scoring, one RL update of every online
algorithm) equals the padded one up to float rounding."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p3o_jax import model as M
from p3o_jax import packing as PK
from p3o_jax import rollout as R
from p3o_jax import sampler as S
from p3o_jax.algos import ALGORITHMS
from p3o_jax.config import ExperimentConfig, RLConfig
from p3o_jax.rl import RLIteration, initial_params
from p3o_jax.sharding import make_mesh
from p3o_jax.train_state import minibatch_index
from tests.test_sampler import FAMILIES, left_padded_prompts, random_params

P, N = 12, 5
LENGTHS = [12, 3, 7, 1, 9, 5, 2, 8]          # 47 real tokens in 8 x 12 slots: 4 packed rows


def prompts(vocab, lengths=LENGTHS, seed=0):
    return left_padded_prompts(len(lengths), P, vocab, lengths, seed)


def test_layout_holds_every_real_token_once_in_fewer_rows():
    ids, mask = prompts(64)
    pk = PK.pack_prompts(ids, mask)
    R_ = pk.tokens.shape[0]
    assert R_ == 4 < len(LENGTHS)                                 # ceil(47 / 12) rows suffice
    ids, mask = np.asarray(ids), np.asarray(mask, bool)
    flat = pk.tokens.reshape(-1)
    for b, n in enumerate(LENGTHS):
        src = pk.source[b][mask[b]]
        np.testing.assert_array_equal(flat[src], ids[b][mask[b]])           # the same tokens
        np.testing.assert_array_equal(pk.positions.reshape(-1)[src], np.arange(n))
        assert (pk.segments.reshape(-1)[src] == b + 1).all()
        assert np.all(np.diff(src) == 1)                           # contiguous, in order
    assert (pk.segments > 0).sum() == sum(LENGTHS)                 # nothing else in the rows
    assert PK.pack_prompts(ids, mask, multiple=3).tokens.shape[0] == 6
    with pytest.raises(ValueError, match="need 4 rows"):
        PK.pack_prompts(ids, mask, rows=3)


def test_minibatch_packings_share_a_row_count():
    ids, mask = prompts(64)
    index = np.asarray(minibatch_index(0, 3, 2, 2, 8))
    chex.assert_shape(index, (4, 4))
    pk = PK.pack_minibatches(ids, mask, index)
    S_, R_ = pk.tokens.shape[:2]
    assert S_ == 4 and R_ == max(PK.rows_needed(np.asarray(mask)[i].sum(-1), P)[2] for i in index)
    chex.assert_shape(pk.source, (4, 4, P))


K_ = 3
RESPONSE_LENGTHS = np.array([[5, 0, 2], [1, 5, 3], [4, 4, 4], [0, 0, 1],
                             [5, 5, 5], [2, 3, 1], [5, 1, 0], [3, 2, 5]])


def sequences(vocab, seed=0):
    """tokens, mask [B, K_, P + N] of `prompts` with K_ responses each of RESPONSE_LENGTHS."""
    ids, mask = prompts(vocab, seed=seed)
    rng = np.random.default_rng(seed + 1)
    resp_mask = (np.arange(N) < RESPONSE_LENGTHS[..., None]).astype(np.int32)
    resp = rng.integers(1, vocab, resp_mask.shape) * resp_mask
    rows = lambda x: jnp.repeat(jnp.asarray(x)[:, None], K_, 1)
    return (jnp.concatenate([rows(ids), jnp.asarray(resp, jnp.int32)], -1),
            jnp.concatenate([rows(mask), jnp.asarray(resp_mask)], -1))


def test_sequence_layout_holds_each_tree_once_in_fewer_rows():
    """Each tree: the prompt's real tokens once, then its responses' back to back; `source`
    finds index 0 (the prompt's last token) and each response token; a prompt whose responses
    do not fit one row of P + N repeats."""
    tokens, mask = sequences(64)
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    pk = PK.pack_sequences(mask[:, 0, :P], mask[:, :, P:])
    R_, W = pk.take.shape
    real = int(mask[:, 0, :P].sum() + mask[:, :, P:].sum())
    # trees (prompt + responses, <= 17 slots): 12+5+0 | 12+2, 3+9, 7+8 | 7+4, 1+1, 9+5 (x 3),
    # 5+6, 2+6, 8+8 | 8+2: 13 trees, first-fit decreasing into 12 rows (15 + 2 share one)
    assert W == P + N and R_ == 12 < len(LENGTHS) * K_
    flat = lambda x: np.asarray(x).reshape(-1)
    packed = flat(tokens)[flat(pk.take)]
    for b, p in enumerate(LENGTHS):
        for k, n in enumerate(RESPONSE_LENGTHS[b]):
            src = pk.source[b, k, :n + 1]
            assert np.all(np.diff(src[1:]) == 1) and (flat(pk.parts)[src[1:]] == k + 1).all()
            np.testing.assert_array_equal(packed[src[1:]], tokens[b, k, P:P + n])
            np.testing.assert_array_equal(flat(pk.positions)[src], np.arange(p - 1, p + n))
            prompt = np.arange(src[0] - p + 1, src[0] + 1)           # its tree's prompt
            np.testing.assert_array_equal(packed[prompt], tokens[b, 0, P - p:P])
            assert (flat(pk.parts)[prompt] == 0).all()
            assert len(set(flat(pk.groups)[np.r_[prompt, src]])) == 1
    trees = {g: set(flat(pk.parts)[flat(pk.groups) == g]) for g in set(flat(pk.groups)) - {0}}
    assert len(trees) == 13
    assert (pk.groups > 0).sum() == real + 12 + 7 + 2 * 9 + 8      # the repeated prompts
    assert all(0 in parts for parts in trees.values())
    assert PK.pack_sequences(mask[:, 0, :P], mask[:, :, P:], multiple=5).take.shape[0] == 15
    with pytest.raises(ValueError, match=f"need {R_} rows"):
        PK.pack_sequences(mask[:, 0, :P], mask[:, :, P:], rows=R_ - 1)


GEMMA = M.ModelConfig(family="gemma", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, qk_norm=True, sliding_window=4, sliding_layers=(0,),
                      rope_local_theta=1e4, attn_softcap=5.0, final_softcap=30.0)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma"])
def test_sequence_hidden_matches_padded(family):
    """The trunk over packed trees gives each real position's hidden (and index 0's) as the
    prompt-once pass over padded rows does; Gemma's sliding window counts positions, not the
    slots of a packed row (the window matters here: without it the hiddens differ)."""
    cfg = FAMILIES.get(family, GEMMA)
    params = random_params(cfg, seed=1)
    tokens, mask = sequences(cfg.vocab_size, seed=2)
    pk = PK.pack_sequences(mask[:, 0, :P], mask[:, :, P:])
    hidden = jax.jit(R.prompt_once_hidden, static_argnums=(1, 4))
    want, got = hidden(params, cfg, tokens, mask, P), hidden(params, cfg, tokens, mask, P, pk)
    chex.assert_shape(got, (len(LENGTHS), K_, N + 1, cfg.d_model))
    seen = np.concatenate([np.ones((len(LENGTHS), K_, 1), bool),
                           np.asarray(mask[:, :, P:], bool)], -1)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=3e-5)
    if family == "gemma":
        unwindowed = dataclasses.replace(cfg, sliding_window=None, sliding_layers=None)
        other = hidden(params, unwindowed, tokens, mask, P, pk)
        assert np.abs(np.asarray(other) - np.asarray(got))[seen].max() > 1e-2


def test_packed_log_probs_match_padded():
    """Log-probs and entropies with the LM head on the trees' predicting positions only (Hc
    per row, not N per response) equal the padded pass's at every real response token; each
    row's heads are its real response tokens, in steps of W / 32."""
    cfg = FAMILIES["llama"]
    params = random_params(cfg, seed=3)
    tokens, mask = sequences(cfg.vocab_size, seed=4)
    pk = PK.pack_sequences(mask[:, 0, :P], mask[:, :, P:])
    resp = np.asarray(mask[:, :, P:], bool)
    per_row = [int(((pk.parts[r] > 0)).sum()) for r in range(pk.heads.shape[0])]
    assert pk.heads.shape[1] == max(per_row) and sum(per_row) == resp.sum()
    logprobs = jax.jit(R.response_logprobs, static_argnums=(1, 4, 5, 6))
    want = logprobs(params, cfg, tokens, mask, P, 0.7, True)
    got = logprobs(params, cfg, tokens, mask, P, 0.7, True, pk)
    for g, w in zip(got, want):
        chex.assert_shape(g, resp.shape)
        np.testing.assert_allclose(np.asarray(g)[resp], np.asarray(w)[resp], atol=3e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_forward_matches_padded(family):
    cfg = FAMILIES[family]
    params = random_params(cfg, seed=1)
    ids, mask = prompts(cfg.vocab_size)
    fwd = jax.jit(PK.prompt_forward, static_argnums=1)
    last, cache = fwd(params, cfg, ids, mask)
    last_p, cache_p = fwd(params, cfg, ids, mask, PK.pack_prompts(ids, mask))
    np.testing.assert_allclose(last_p, last, atol=2e-5)
    real = np.asarray(mask, bool)                                 # the slots queries see
    for c, cp in zip(cache, cache_p):
        for k in ("k", "v"):
            np.testing.assert_allclose(np.asarray(cp[k]).transpose(0, 2, 1, 3)[real],
                                       np.asarray(c[k]).transpose(0, 2, 1, 3)[real], atol=2e-5)


def test_sampling_and_scoring_match_padded():
    cfg = FAMILIES["llama"]
    policy, ref, rm = (random_params(cfg, seed=s) for s in (2, 3, 4))
    ids, mask = prompts(cfg.vocab_size, seed=5)
    pk = PK.pack_prompts(ids, mask)
    scfg = S.SamplingConfig(max_new_tokens=N, temperature=0.9, eos_ids=(3,))
    key = jax.random.key(6)
    padded = S.sample_responses(policy, cfg, scfg, ids, mask, key)
    packed = S.sample_responses(policy, cfg, scfg, ids, mask, key, packing=pk)
    np.testing.assert_array_equal(packed.tokens, padded.tokens)
    chex.assert_trees_all_close(packed, padded, atol=2e-5)
    score = jax.jit(R.score, static_argnums=(3, 4, 8, 9))
    want = score(policy, ref, rm, cfg, cfg, ids, mask, padded, 0.9, True)
    got = score(policy, ref, rm, cfg, cfg, ids, mask, padded, 0.9, True, packing=pk)
    chex.assert_trees_all_close(got, want, atol=3e-5)
    assert float(jnp.abs(want.seq_kl).max()) > 0.1                # not vacuous


def experiment(algo, pack, responses=False):
    cfg = dataclasses.replace(FAMILIES["gpt_neox"], max_len=P + N)
    return ExperimentConfig(algo=algo, policy=cfg, rl=RLConfig(
        prompts_per_iter=8, epochs=2, minibatches=2, pack_prompts=pack,
        pack_responses=responses))


# The update is compared under plain SGD, where it is -LR x the sum of its steps' gradients, so
# that the params after it differ between the runs by LR x their gradients' rounding, plus the
# rounding of the params themselves (a few ulps). Under AdamW each step is about LR in size
# whatever the gradient's: an attention key bias, whose gradient is exactly 0 (softmax is
# shift-invariant), takes full steps in the direction of its rounding noise, which differs
# between the runs and between CPUs (1.1e-4 apart on an AVX-512 machine).
# Packed trees attend over rows of P + N slots in another order than the padded rows: their
# gradients round apart by up to ~1e-5 of gradients of order 1 (2e-6 for packed prompts alone).
LR, GRAD_ATOL, TREE_GRAD_ATOL = 0.1, 2e-6, 1e-5
STEPS = 4                                      # 2 epochs x 2 minibatches
PARAMS_ATOL = STEPS * LR * GRAD_ATOL           # each step's gradient within GRAD_ATOL
PARAMS_RTOL = 2 * STEPS * np.finfo(np.float32).eps   # each step's rounding of the params


@pytest.mark.parametrize("algo,responses", [("p3o", False), ("ppo", False), ("grpo", False),
                                             ("dpo", False), ("p3o", True), ("ppo", True)])
def test_rl_iteration_matches_padded(algo, responses):
    """One iteration (sample, score, an update of 2 epochs x 2 minibatches) with and without
    packing (the prompts, or with `responses` prompts and responses as trees): the same
    samples, the same buffer, the same loss gradient on each minibatch, and the same update of
    the params (SGD, see `LR`). Responses end at any of 8 ids, so their lengths differ."""
    cfg = experiment(algo, False).policy
    policy, rm = random_params(cfg, seed=7, scale=0.1), random_params(cfg, seed=8, scale=0.1)
    ids, mask = prompts(cfg.vocab_size, seed=9)
    prompt = {"ids": ids, "mask": mask}
    mesh = make_mesh(devices=jax.devices()[:2])          # 2-way batch: packed rows sharded
    results = []
    for pack in (False, True):
        exp = experiment(algo, pack, responses and pack)
        with jax.set_mesh(mesh):
            it = RLIteration(exp, mesh, S.SamplingConfig(max_new_tokens=N,
                                                         eos_ids=tuple(range(3, 11))),
                             tx=optax.sgd(LR))
            assert it.pack == pack and it.pack_responses == (responses and pack)
            state = it.init_state(initial_params(exp, policy, rm))
            carry = ALGORITHMS[algo].init_carry(exp)
            samples = it.sample(state.params, prompt, jax.random.key(10), it.packing(ids, mask))
            packing = it.score_packing(ids, mask, samples.mask)
            assert isinstance(packing, PK.SequencePacking) == (responses and pack)
            buffer, _ = it.score(state.params, policy, rm, prompt, samples, carry, None, packing)
            buffer = buffer.replace(entropy=None)
            plan = it.plan(state, buffer)
            grad = jax.jit(jax.grad(lambda p, b: ALGORITHMS[algo].loss(p, b, exp)[0]))
            grads = [grad(state.params, jax.tree.map(lambda x: x[i], buffer).replace(
                packing=None if plan.packing is None else jax.tree.map(lambda x: x[s], plan.packing)))
                for s, i in enumerate(plan.index[:2])]
            before = jax.tree.map(np.asarray, state.params)
            state, metrics = it.update(state, buffer)
        assert int(state.step) == STEPS
        results.append((samples, buffer, grads, before, jax.tree.map(np.asarray, state.params),
                        metrics))
    (s0, b0, g0, before, p0, m0), (s1, b1, g1, _, p1, m1) = results
    np.testing.assert_array_equal(s1.tokens, s0.tokens)
    lengths = np.asarray(s0.mask).sum(-1)
    assert lengths.min() < N == lengths.max()                       # uneven responses
    chex.assert_trees_all_close(b1, b0, atol=3e-5)
    grad_atol = TREE_GRAD_ATOL if responses else GRAD_ATOL
    chex.assert_trees_all_close(g1, g0, atol=grad_atol, rtol=0)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-3    # not vacuous
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(m1[k], m0[k], atol=1e-6, rtol=1e-4)
    chex.assert_trees_all_close(p1, p0, atol=PARAMS_ATOL * grad_atol / GRAD_ATOL,
                                rtol=PARAMS_RTOL)
    assert max(float(np.abs(a - b).max()) for a, b in                 # it did train, far more
               zip(jax.tree.leaves(p0), jax.tree.leaves(before))) > 100 * PARAMS_ATOL
