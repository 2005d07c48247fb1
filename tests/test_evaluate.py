"""Evaluation maths on small hand-checked inputs, what the evaluation samples and scores, and
the reward-offset hook of the invariance experiment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import ops
from p3o_jax import sampler as S
from p3o_jax.algos import p3o
from p3o_jax.evaluate import (compare, evaluate_policy, judge_win_rate, mean_se,
                              mean_se_over_runs, summarize, win_rate)
from p3o_jax.rl import prompt_offset
from tests.test_sampler import FAMILIES, left_padded_prompts, random_params


def test_mean_se():
    assert mean_se([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, np.sqrt(14 / 3) / 2))
    assert mean_se([5.0]) == (5.0, 0.0)
    # over runs: the SE across them, or a lone run's own SE over prompts
    assert mean_se_over_runs([1.0, 2.0, 3.0, 6.0], [9.0] * 4) == mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean_se_over_runs([0.5], [0.1]) == (0.5, 0.1)


def test_kl_estimates_k1_k3():
    # one response, two real tokens and a pad: log ratios logp - logp_ref = 0.5, -0.2
    logp = jnp.array([[-1.0, -2.0, -9.0]])
    ref = jnp.array([[-1.5, -1.8, -1.0]])
    mask = jnp.array([[1, 1, 0]])
    k1 = ops.kl_per_sequence(logp, ref, mask, "k1")
    k3 = ops.kl_per_sequence(logp, ref, mask, "k3")
    assert float(k1[0]) == pytest.approx(0.3, abs=1e-6)
    # k3 = (r - 1) - log r with r = pi_ref / pi = exp(-log ratio): never negative per token
    expected = sum(np.expm1(-d) + d for d in (0.5, -0.2))
    assert float(k3[0]) == pytest.approx(expected, abs=1e-6)


def test_summarize_and_compare_with_ties():
    policy = {"rm": np.array([1.0, 2.0, 3.0, 4.0]), "gold": np.array([1.0, 1.0, 0.0, 2.0]),
              "kl_k1": np.array([0.1, 0.3, 0.2, 0.2]), "kl_k3": np.array([0.1, 0.2, 0.2, 0.1]),
              "length": np.array([3, 4, 5, 4])}
    sft = {"rm": np.array([0.0, 2.0, 4.0, 1.0]), "gold": np.array([0.0, 1.0, 1.0, 1.0])}
    row = compare(policy, sft)
    assert row["kl_k1"] == pytest.approx(0.2)
    assert row["kl_k1_se"] == pytest.approx(np.std([0.1, 0.3, 0.2, 0.2], ddof=1) / 2)
    assert row["length"] == pytest.approx(4.0)
    # rm: win, tie, loss, win -> outcomes 1, 0.5, 0, 1
    assert row["win_rm"] == pytest.approx(0.625)
    assert row["win_rm_se"] == pytest.approx(np.std([1, 0.5, 0, 1], ddof=1) / 2)
    # gold: win, tie, loss, win as well
    assert (row["win_gold"], row["win_gold_se"]) == pytest.approx((row["win_rm"], row["win_rm_se"]))
    assert set(summarize(policy)) < set(row)
    assert "win_gold" not in compare({k: v for k, v in policy.items() if k != "gold"}, sft)


def test_reward_components_skip_no_opinion_and_report_accuracy():
    nan = np.nan
    policy = {"reward": np.array([1.0, 0.0, 1.5, 2.0]), "reward/correct": np.array([1, 0, 1, nan]),
              "reward/brevity": np.array([-0.5, -0.1, -0.2, -0.3])}
    row = compare(policy, {"reward": np.array([0.0, 0.0, 2.0, 1.0])})
    assert row["correct"] == pytest.approx(2 / 3)          # over the 3 rows with an opinion
    assert row["correct_se"] == pytest.approx(np.std([1, 0, 1], ddof=1) / np.sqrt(3))
    assert row["correct_acc"] == pytest.approx(2 / 3)
    assert row["brevity"] == pytest.approx(-0.275) and "brevity_acc" not in row
    assert row["win_reward"] == pytest.approx(0.625)       # win, tie, loss, win
    assert "win_rm" not in row and "rm" not in row


def test_win_rate_all_ties_and_antisymmetry():
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == (0.5, 0.0)
    a, b = np.array([3.0, 1.0, 2.0]), np.array([1.0, 1.0, 5.0])
    assert win_rate(a, b)[0] + win_rate(b, a)[0] == pytest.approx(1.0)


def test_judge_win_rate():
    longer = lambda a, b: 1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
    assert judge_win_rate(longer, ["aaa", "b", "cc"], ["a", "bbb", "dd"]) == pytest.approx(
        (0.5, np.std([1, 0, 0.5], ddof=1) / np.sqrt(3)))
    # a judge that always prefers the first text: asked both ways, every pair is a tie
    first = lambda a, b: 1.0
    assert judge_win_rate(first, ["x", "y"], ["z", "w"]) == (0.5, 0.0)
    assert judge_win_rate(first, ["x", "y"], ["z", "w"], both_orders=False) == (1.0, 0.0)
    with pytest.raises(ValueError):
        judge_win_rate(first, ["x"], ["y", "z"])
    with pytest.raises(ValueError):
        judge_win_rate(lambda a, b: 2.0, ["x"], ["y"])


def test_prompt_offset_is_per_prompt_and_ignores_padding():
    ids = jnp.array([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 5, 6]])
    mask = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    d = prompt_offset(ids, mask)
    assert d.shape == (3,) and float(d[0]) == float(d[2]) and float(d[0]) != float(d[1])
    # the pad's id does not matter, only the real tokens
    assert float(prompt_offset(ids.at[0, 0].set(3), mask)[0]) == float(d[0])
    many = prompt_offset(jnp.arange(4000).reshape(1000, 4) % 97, jnp.ones((1000, 4), jnp.int32))
    assert abs(float(many.mean())) < 0.15 and 0.85 < float(many.std()) < 1.15


def test_reward_offset_leaves_p3o_delta_unchanged():
    ids = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    mask = jnp.ones_like(ids)
    rewards = jnp.array([[0.3, -0.1], [1.2, 1.0], [-0.5, 0.25]])
    seq_kl = jnp.array([[0.2, 0.1], [0.0, 0.4], [0.3, 0.3]])
    shifted = rewards + 10.0 * prompt_offset(ids, mask)[:, None]
    assert not np.allclose(shifted, rewards)
    np.testing.assert_allclose(p3o.p3o_delta(shifted, seq_kl, 0.1),
                               p3o.p3o_delta(rewards, seq_kl, 0.1), atol=1e-5)


def test_the_evaluation_scores_only_the_responses_it_keeps():
    """One response per prompt is sampled and scored: the reward functions and a reward model
    scored outside the program see [B, 1] responses, once. It is the first of the pair
    `sample_responses` draws with the same key (what the evaluation kept when it sampled and
    scored two)."""
    cfg = FAMILIES["gpt_neox"]
    params = random_params(cfg, seed=1)
    B, N = 4, 6
    ids, mask = left_padded_prompts(B, 8, cfg.vocab_size, [8, 3, 5, 1], seed=2)
    scfg = S.SamplingConfig(max_new_tokens=N, temperature=0.9, eos_ids=(7,))
    key = jax.random.key(3)
    seen = []

    def rm_fn(prompts, samples):
        seen.append(("rm", samples.tokens.shape))
        return jnp.full(samples.tokens.shape[:2], 0.5)

    class Functions:                        # a `reward_calls.FunctionRewards` stand-in
        weights = {"ones": 2.0}

        def __call__(self, prompts, samples):
            seen.append(("functions", samples.tokens.shape))
            return {"ones": jnp.ones(samples.tokens.shape[:2])}

    out = evaluate_policy(params, params, None, cfg, cfg, ids, mask, key, scfg, rm_fn=rm_fn,
                          fn_scorer=Functions())
    assert seen == [("rm", (B, 1, N)), ("functions", (B, 1, N))]
    pair = S.sample_responses(params, cfg, scfg, ids, mask, key, n=2)
    np.testing.assert_array_equal(out["tokens"], pair.tokens[:, 0])
    np.testing.assert_array_equal(out["length"], np.asarray(pair.mask[:, 0]).sum(-1))
    assert out["reward"].tolist() == [0.5 + 2.0] * B and out["reward/ones"].tolist() == [1.0] * B
    assert out["kl_k1"].tolist() == [0.0] * B           # the policy is its own reference
