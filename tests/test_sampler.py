"""Sampler: cache parity, HF greedy parity, sampling distribution, EOS/early exit, pairs, mesh."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from p3o_jax import model as M
from p3o_jax import sampler as S
from p3o_jax.hf import load_pretrained
from p3o_jax.sharding import batch_sharding, logical_shardings, make_mesh, shard_batch
from tests.hf_fixtures import save_torch_model

FAMILIES = {
    "gpt2": M.ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                          max_len=64),
    "gpt_neox": M.ModelConfig(family="gpt_neox", vocab_size=64, d_model=32, n_layers=2,
                              n_heads=4, rotary_pct=0.25),
    "llama": M.ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                           n_kv_heads=2),
}


def random_params(cfg, seed=0, scale=0.3):
    """Random params far from uniform logits: N(0, scale) everywhere, 1 + N(0, scale) for norm
    scales. Drawn with numpy: compiling JAX's RNG for every leaf costs seconds on CPU."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))

    def draw(path, s):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + scale * rng.standard_normal(s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def left_padded_prompts(batch, length, vocab, n_real, seed=0):
    """Random prompts [B, P] with n_real[b] real tokens at the right end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, length))
    mask = (np.arange(length)[None] >= length - np.asarray(n_real)[:, None]).astype(np.int32)
    return jnp.asarray(tokens * mask, jnp.int32), jnp.asarray(mask)


full_logits = jax.jit(M.logits, static_argnums=1)


def log_softmax_full_forward(params, cfg, prompts, prompt_mask, response, response_mask):
    """Full (uncached) forward on the concatenated sequence: log-probs predicting each
    response token [B, N, V]."""
    tokens, mask = S.concat_prompt_response(prompts, prompt_mask, response, response_mask)
    P = prompts.shape[-1]
    return jax.nn.log_softmax(full_logits(params, cfg, tokens, mask)[:, P - 1:-1], -1)


@functools.partial(jax.jit, static_argnums=1)
def teacher_forced_logits(params, cfg, prompts, prompt_mask, response, response_mask):
    """Feed a given response through the sampler's own prefill / decode_step: logits [B, N, V]
    of each response token given the tokens before it."""
    state = S.prefill(params, cfg, prompts, prompt_mask, response.shape[1])

    def step(state, inputs):
        tokens, active = inputs
        state = S.decode_step(params, cfg, state, tokens, active == 1)
        return state, state.logits

    _, logits = jax.lax.scan(step, state, (response.T[:-1], response_mask.T[:-1]))
    return jnp.concatenate([state.logits[:, None], logits.transpose(1, 0, 2)], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_forward(family):
    cfg = FAMILIES[family]
    params = random_params(cfg)
    B, P, N = 3, 7, 6
    prompts, prompt_mask = left_padded_prompts(B, P, cfg.vocab_size, [7, 4, 2])
    rng = np.random.default_rng(1)
    response = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, N)), jnp.int32)
    response_mask = jnp.asarray(np.arange(N)[None] < np.array([[N], [3], [5]]), jnp.int32)

    cached = jax.nn.log_softmax(
        teacher_forced_logits(params, cfg, prompts, prompt_mask, response, response_mask), -1)
    full = log_softmax_full_forward(params, cfg, prompts, prompt_mask, response, response_mask)
    # Step t predicts response token t; it is meaningful where that token is real.
    valid = np.asarray(response_mask, bool)
    np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=2e-5)

    # The compiled while_loop path: sampled log-probs equal the full forward's at every token.
    scfg = S.SamplingConfig(max_new_tokens=N)
    keys = jax.random.split(jax.random.key(2), B)
    out = S.generate(params, cfg, scfg, prompts, prompt_mask, keys)
    full = log_softmax_full_forward(params, cfg, prompts, prompt_mask, out.tokens, out.mask)
    expected = jnp.take_along_axis(full, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, expected, atol=2e-5)
    np.testing.assert_array_equal(out.logprobs, out.raw_logprobs)   # no truncation, T = 1


def test_greedy_matches_transformers_generate(tmp_path):
    torch_model = save_torch_model("gpt2", tmp_path)
    cfg, params = load_pretrained(str(tmp_path))
    B, P, N, pad = 3, 6, 12, 0
    prompts, prompt_mask = left_padded_prompts(B, P, cfg.vocab_size, [6, 3, 1], seed=3)

    def ours(eos):
        scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, pad_id=pad,
                                eos_ids=() if eos is None else (eos,))
        out = S.generate(params, cfg, scfg, prompts, prompt_mask,
                         jax.random.split(jax.random.key(0), B))
        return np.asarray(out.tokens), np.asarray(out.mask)

    def theirs(eos):
        with torch.no_grad():
            seqs = torch_model.generate(
                input_ids=torch.tensor(np.array(prompts), dtype=torch.long),
                attention_mask=torch.tensor(np.array(prompt_mask), dtype=torch.long),
                do_sample=False, max_new_tokens=N, pad_token_id=pad,
                eos_token_id=eos if eos is not None else cfg.vocab_size)  # vocab_size: never hit
        resp = seqs[:, P:].numpy()                 # shorter than N if all rows stopped early
        return np.pad(resp, ((0, 0), (0, N - resp.shape[1])), constant_values=pad)

    tokens, mask = ours(None)
    np.testing.assert_array_equal(tokens, theirs(None))
    assert mask.all()
    # With an EOS the model emits (row 0's third token), both stop at it and pad afterwards.
    eos = int(tokens[0, 2])
    tokens_eos, mask_eos = ours(eos)
    np.testing.assert_array_equal(tokens_eos, theirs(eos))
    assert mask_eos.sum(1)[0] <= 3 and not mask_eos.all()


def truncated_probs(logits, temperature, top_k, top_p):
    """Reference sampling distribution: softmax(logits / T) restricted to the top-k tokens,
    then to the smallest most-likely prefix whose mass reaches top_p, renormalised."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(p.shape, bool)
    kept = order[:top_k] if top_k else order
    q = p[kept] / p[kept].sum()
    keep[kept[(np.cumsum(q) - q) < top_p]] = True
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.8), (1.0, 5, 0.6)])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
    """Draw n first tokens from a tiny model's next-token logits with n keys, exactly as
    `sample_responses` draws its first tokens (`test_keys_determine_samples` checks that link)."""
    cfg = M.ModelConfig(family="gpt2", vocab_size=8, d_model=16, n_layers=1, n_heads=2)
    params = random_params(cfg, seed=4)
    prompts, prompt_mask = left_padded_prompts(1, 4, cfg.vocab_size, [3], seed=5)
    logits = full_logits(params, cfg, prompts, prompt_mask)[0, -1]
    n = 20000
    scfg = S.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    draw = jax.jit(S.sample_token, static_argnums=0)
    tokens, logprobs, raw, entropy = map(np.asarray, draw(scfg, jnp.tile(logits, (n, 1)),
                                                          S.pair_keys(jax.random.key(6), 1, n), 0))

    logits = np.asarray(logits, np.float64)
    expected = truncated_probs(logits, temperature, top_k, top_p)
    support = expected > 0
    assert 2 <= support.sum() and (top_k == 0 and top_p == 1) == support.all()
    counts = np.bincount(tokens, minlength=cfg.vocab_size)
    assert counts[~support].sum() == 0
    # Pearson chi-square goodness of fit over the support (valid: every expected count >= 5).
    # The draws are a fixed function of the key, so the test is deterministic; the threshold
    # is the 1 - 1e-4 quantile, i.e. a correct sampler fails for at most 1 key in 10^4.
    e = n * expected[support]
    chi2 = np.sum((counts[support] - e) ** 2 / e)
    assert e.min() >= 5
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, df=support.sum() - 1), (chi2, counts, e)
    # Log-probs are those of the truncated distribution; raw ones of softmax(logits / T).
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)
    log_z = np.log(np.exp(logits / temperature).sum())
    np.testing.assert_allclose(raw, (logits / temperature - log_z)[tokens], atol=1e-5)
    # Entropy of the untruncated softmax(logits / T), whatever the truncation.
    p = np.exp(logits / temperature - log_z)
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(), rtol=1e-5)


def test_keys_determine_samples():
    cfg = FAMILIES["llama"]
    params = random_params(cfg)
    B, n = 4, 2
    prompts, prompt_mask = left_padded_prompts(B, 5, cfg.vocab_size, [5, 4, 3, 2])
    scfg = S.SamplingConfig(max_new_tokens=8, top_p=0.95)
    draw = lambda seed: S.sample_responses(params, cfg, scfg, prompts, prompt_mask,
                                           jax.random.key(seed)).tokens
    a, b, c = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert (a[:, 0] != a[:, 1]).mean() > 0.5          # the two responses of a pair differ
    # The first tokens are `sample_token` at step 0 on the prompts' next-token logits.
    last = full_logits(params, cfg, prompts, prompt_mask)[:, -1]
    keys = S.pair_keys(jax.random.key(0), B, n)
    first, *_ = S.sample_token(scfg, jnp.repeat(last, n, 0), keys, 0)
    np.testing.assert_array_equal(a[:, :, 0].reshape(-1), first)


def test_sample_pairs_reuses_prefill_equivalently():
    cfg = FAMILIES["gpt_neox"]
    params = random_params(cfg)
    B, n = 3, 3
    prompts, prompt_mask = left_padded_prompts(B, 6, cfg.vocab_size, [6, 2, 4])
    max_lengths = jnp.array([8, 3, 6])
    scfg = S.SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=10, eos_ids=(7,))
    key = jax.random.key(3)
    pairs = S.sample_responses(params, cfg, scfg, prompts, prompt_mask, key, n=n,
                               max_lengths=max_lengths)
    flat = S.generate(params, cfg, scfg, jnp.repeat(prompts, n, 0), jnp.repeat(prompt_mask, n, 0),
                      S.pair_keys(key, B, n), jnp.repeat(max_lengths, n))
    chex.assert_shape([pairs.tokens, pairs.mask, pairs.logprobs, pairs.raw_logprobs], (B, n, 8))
    chex.assert_type([pairs.tokens, pairs.mask, pairs.num_steps], jnp.int32)
    chex.assert_type([pairs.logprobs, pairs.raw_logprobs], jnp.float32)
    np.testing.assert_array_equal(pairs.tokens.reshape(B * n, -1), flat.tokens)
    np.testing.assert_array_equal(pairs.mask.reshape(B * n, -1), flat.mask)
    np.testing.assert_allclose(pairs.logprobs.reshape(B * n, -1), flat.logprobs, atol=1e-5)
    np.testing.assert_allclose(pairs.raw_logprobs.reshape(B * n, -1), flat.raw_logprobs,
                               atol=1e-5)
    assert int(pairs.num_steps) == int(flat.num_steps)


def test_eos_and_length_limits_stop_rows_and_exit_early():
    cfg = FAMILIES["gpt2"]
    params = random_params(cfg)
    B, N = 3, 12
    prompts, prompt_mask = left_padded_prompts(B, 5, cfg.vocab_size, [5, 3, 4], seed=7)
    keys = jax.random.split(jax.random.key(8), B)
    free = S.generate(params, cfg, S.SamplingConfig(max_new_tokens=N), prompts, prompt_mask, keys)
    assert int(free.num_steps) == N and np.asarray(free.mask).all()

    # Row b's draw at step t depends only on (keys[b], t, its prefix), so with an EOS and
    # per-row limits each row is a prefix of its free-running sample.
    eos = int(free.tokens[0, 2])
    max_lengths = jnp.array([N, 4, 6])
    scfg = S.SamplingConfig(max_new_tokens=N, eos_ids=(eos,), pad_id=0)
    out = S.generate(params, cfg, scfg, prompts, prompt_mask, keys, max_lengths)
    chex.assert_shape([out.tokens, out.mask, out.logprobs, out.raw_logprobs], (B, N))
    chex.assert_shape(out.num_steps, ())

    free_tokens = np.asarray(free.tokens)
    first_eos = [list(row).index(eos) + 1 if eos in row else N for row in free_tokens]
    lengths = np.minimum(first_eos, max_lengths)
    live = np.arange(N)[None] < lengths[:, None]
    np.testing.assert_array_equal(out.mask, live.astype(np.int32))
    np.testing.assert_array_equal(out.tokens, np.where(live, free_tokens, 0))
    assert out.tokens[0, lengths[0] - 1] == eos                     # EOS kept, masked 1
    np.testing.assert_allclose(out.logprobs, np.where(live, free.logprobs, 0.0), atol=1e-6)
    assert (np.asarray(out.logprobs)[~live] == 0).all()
    assert (np.asarray(out.raw_logprobs)[~live] == 0).all()
    assert (np.asarray(out.entropy)[~live] == 0).all() and (np.asarray(out.entropy)[live] > 0).all()
    assert (np.asarray(out.logprobs)[live] < 0).all()
    assert int(out.num_steps) == lengths.max() < N                  # the loop exited early


def reference_stop(row, stop_sequences):
    """Unbatched pure Python: the index where the first stop sequence to end in the token list
    `row` starts (the longest, if several end at once), or None."""
    for t in range(len(row)):
        ends = [len(s) for s in stop_sequences if tuple(row[max(t + 1 - len(s), 0):t + 1]) == s]
        if ends:
            return t + 1 - max(ends)
    return None


def test_stop_sequences_cut_rows_at_different_steps_like_the_reference():
    cfg = FAMILIES["gpt_neox"]
    params = random_params(cfg, seed=3)
    B, N = 4, 12
    prompts, prompt_mask = left_padded_prompts(B, 5, cfg.vocab_size, [5, 2, 4, 3], seed=11)
    keys = jax.random.split(jax.random.key(5), B)
    free = S.generate(params, cfg, S.SamplingConfig(max_new_tokens=N), prompts, prompt_mask, keys)
    rows = np.asarray(free.tokens).tolist()
    eos = min(set(range(cfg.vocab_size)) - {t for row in rows for t in row})  # never sampled
    # Several tokens each, taken from rows 0 and 1; and one token, from row 2.
    stops = (tuple(rows[0][6:8]), tuple(rows[1][3:6]), tuple(rows[2][9:10]))
    scfg = S.SamplingConfig(max_new_tokens=N, eos_ids=(eos,), pad_id=0, stop_sequences=stops)
    out = S.generate(params, cfg, scfg, prompts, prompt_mask, keys)
    chex.assert_shape([out.tokens, out.mask, out.logprobs, out.raw_logprobs, out.entropy], (B, N))

    starts = [reference_stop(row, stops) for row in rows]
    assert len({s for s in starts if s is not None}) >= 3, starts    # rows stop at different steps
    logp_eos = np.asarray(log_softmax_full_forward(params, cfg, prompts, prompt_mask, free.tokens,
                                                   free.mask))[..., eos]
    ends = []
    for b, start in enumerate(starts):
        n = N if start is None else start + 1
        expected = rows[b][:n] if start is None else rows[b][:start] + [eos]
        np.testing.assert_array_equal(out.tokens[b], expected + [0] * (N - n))
        np.testing.assert_array_equal(out.mask[b], [1] * n + [0] * (N - n))
        kept = n if start is None else start
        np.testing.assert_allclose(out.raw_logprobs[b, :kept], free.raw_logprobs[b, :kept],
                                   atol=1e-5)
        np.testing.assert_allclose(out.entropy[b, :n], free.entropy[b, :n], atol=1e-5)
        assert (np.asarray(out.raw_logprobs[b, n:]) == 0).all()
        assert (np.asarray(out.entropy[b, n:]) == 0).all()
        if start is not None:
            np.testing.assert_allclose(out.raw_logprobs[b, start], logp_eos[b, start], atol=1e-4)
            np.testing.assert_allclose(out.logprobs[b, start], logp_eos[b, start], atol=1e-4)
            ends.append(start + max(len(s) for s in stops
                                    if tuple(rows[b][start:start + len(s)]) == s))
        else:
            ends.append(N)
    assert int(out.num_steps) == max(ends)          # the loop ran until the last row stopped
    with pytest.raises(ValueError, match="need eos_ids"):
        S.SamplingConfig(max_new_tokens=N, stop_sequences=stops)


def test_concat_prompt_response_broadcasts_over_pairs():
    prompts, prompt_mask = left_padded_prompts(2, 4, 10, [4, 2])
    resp = jnp.arange(2 * 3 * 5).reshape(2, 3, 5)
    resp_mask = (jnp.arange(5) < 3).astype(jnp.int32) * jnp.ones((2, 3, 1), jnp.int32)
    tokens, mask = S.concat_prompt_response(prompts, prompt_mask, resp, resp_mask)
    chex.assert_shape([tokens, mask], (2, 3, 9))
    np.testing.assert_array_equal(tokens[:, 1, :4], prompts)
    np.testing.assert_array_equal(tokens[:, :, 4:], resp)
    np.testing.assert_array_equal(mask[1, 2], [0, 0, 1, 1, 1, 1, 1, 0, 0])


def test_sharded_matches_single_device():
    cfg = M.ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2)
    params = random_params(cfg)
    B, N = 8, 8
    prompts, prompt_mask = left_padded_prompts(B, 6, cfg.vocab_size, [6, 5, 4, 3, 2, 6, 1, 3])
    keys = jax.random.split(jax.random.key(0), B)
    greedy = S.SamplingConfig(max_new_tokens=N, greedy=True)
    sampled = S.SamplingConfig(max_new_tokens=N, top_k=20)
    ref = S.generate(params, cfg, greedy, prompts, prompt_mask, keys)
    ref_pairs = S.sample_responses(params, cfg, sampled, prompts, prompt_mask, jax.random.key(1))

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    # the weights gathered once per call (`weights_for_decode`) or block by block at each step
    for gather_once in (True, False):
        once = lambda scfg: dataclasses.replace(scfg, gather_once=gather_once)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(params, logical_shardings(M.param_axes(cfg), mesh))
            p, m = shard_batch((np.asarray(prompts), np.asarray(prompt_mask)), mesh)
            out = S.generate(sharded, cfg, once(greedy), p, m,
                             jax.device_put(keys, batch_sharding(mesh, 1)))
            pairs = S.sample_responses(sharded, cfg, once(sampled), p, m, jax.random.key(1))
        assert len(out.tokens.sharding.device_set) == 8
        assert out.tokens.sharding.shard_shape(out.tokens.shape) == (B // 4, N)  # batch on fsdp
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.raw_logprobs, ref.raw_logprobs, atol=1e-5)
        np.testing.assert_array_equal(pairs.tokens, ref_pairs.tokens)
        np.testing.assert_allclose(pairs.logprobs, ref_pairs.logprobs, atol=1e-5)
