"""Tests for the group-baseline algorithms of p3o_jax.algos: RLOO, GRPO (GRPO / Dr. GRPO / DAPO
aggregations) and GSPO; and how they relate to P3O.

Same style as tests/test_algos.py (its tabular "policy" and rollouts are reused): chex variants
with and without jit, float64 inside a local `jax.enable_x64` where exactness matters, expected
values written out by hand from the formulas in each module's docstring.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from p3o_jax import ops
from p3o_jax.algos import ALGORITHMS, dpo, grpo, gspo, p3o, rloo
from p3o_jax.config import ExperimentConfig, RLConfig
from p3o_jax.rollout import Rollout as Buffer
from tests.test_algos import BETA, CLIP_MODES, float64, make_rollout, np_softmax, policy_logps

AGGREGATIONS = grpo.AGGREGATIONS


def baseline_objective(ro, rewards, method, *, aggregation="sequence", normalise_std=True,
                       kl="reward", std_eps=0.0, eps=(0.2, 0.2)):
    """theta -> (loss, metrics) of `method` on the rollout, advantages from `rewards` the way
    its `prepare` makes them (logp_ref = logp_old - 0.1: the KL-in-the-loss term is real)."""
    logp_old = policy_logps(ro.theta_old, ro.tokens)
    logp_ref = logp_old - 0.1
    regularised = rewards - BETA * ro.seq_kl
    logp = lambda theta: policy_logps(theta, ro.tokens)
    if method == "rloo":
        adv = rloo.leave_one_out_advantages(regularised)
        return lambda theta: rloo.rloo_loss(logp(theta), logp_old, ro.mask, adv, eps=eps[0])
    if method == "grpo":
        adv = grpo.group_advantages(regularised if kl == "reward" else rewards, normalise_std,
                                    std_eps)
        return lambda theta: grpo.grpo_loss(
            logp(theta), logp_old, logp_ref, ro.mask, adv, aggregation=aggregation,
            eps_low=eps[0], eps_high=eps[1], kl_coef=BETA if kl == "loss" else 0.0)
    adv = grpo.group_advantages(regularised, normalise_std, std_eps)
    return lambda theta: gspo.gspo_loss(logp(theta), logp_old, ro.mask, adv, eps_low=eps[0],
                                        eps_high=eps[1])


class AdvantagesAndLossesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_advantages_hand_values(self):
        rewards = np.array([[1.0, 2.0, 4.0], [3.0, 3.0, 0.0]])
        # leave-one-out: r_i - mean of the two others
        np.testing.assert_allclose(self.variant(rloo.leave_one_out_advantages)(rewards),
                                   [[1 - 3, 2 - 2.5, 4 - 1.5], [3 - 1.5, 3 - 1.5, 0 - 3]],
                                   rtol=1e-12)
        np.testing.assert_allclose(rloo.leave_one_out_advantages(np.array([[3.0, 1.0]])),
                                   [[2.0, -2.0]])
        centred = [[-4 / 3, -1 / 3, 5 / 3], [1.0, 1.0, -2.0]]
        plain = self.variant(functools.partial(grpo.group_advantages, normalise_std=False))
        np.testing.assert_allclose(plain(rewards), centred, rtol=1e-12)
        # unbiased std: (16/9 + 1/9 + 25/9) / 2 = 7/3 and (1 + 1 + 4) / 2 = 3
        std = np.array([[math.sqrt(7 / 3)], [math.sqrt(3)]])
        normed = self.variant(functools.partial(grpo.group_advantages, std_eps=1e-4))
        np.testing.assert_allclose(normed(rewards), np.array(centred) / (std + 1e-4), rtol=1e-12)

    @chex.variants(with_jit=True)
    @float64
    def test_rloo_loss_hand_example(self):
        mask = np.array([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
        logp_old = np.full(mask.shape, -1.0)
        log_rho = np.log([1.5, 0.9])                      # spread over the real tokens
        logp = logp_old + log_rho[None, :, None] * mask / mask.sum(-1, keepdims=True)
        logp[0, 0, 2] = 5.0                               # a pad: ignored
        advantages = np.array([[2.0, -2.0]])
        loss, metrics = self.variant(rloo.rloo_loss)(logp, logp_old, mask, advantages)
        # max(-2 * 1.5, -2 * 1.2) = -2.4 and max(2 * 0.9, 2 * 0.9) = 1.8
        np.testing.assert_allclose(loss, (-2.4 + 1.8) / 2, rtol=1e-12)
        np.testing.assert_allclose(metrics["clip_frac"], 0.5)
        np.testing.assert_allclose(metrics["ratio_mean"], 1.2, rtol=1e-12)

    # response 1: A = 1, ratios 1.5, 0.7 (and a pad); response 2: A = -0.5, ratios 1.1, 0.7, 1.4
    RATIOS = np.array([[[1.5, 0.7, 5.0], [1.1, 0.7, 1.4]]])
    MASK = np.array([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    ADVANTAGES = np.array([[1.0, -0.5]])
    # eps_low 0.2, eps_high 0.3: clip(rho, 0.8, 1.3); l = max(-A rho, -A clip(rho))
    TOKEN_LOSSES = ([max(-1.5, -1.3), max(-0.7, -0.8)],                      # -1.3, -0.7
                    [max(0.55, 0.55), max(0.35, 0.4), max(0.7, 0.65)])      # 0.55, 0.4, 0.7

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*AGGREGATIONS)
    @float64
    def test_grpo_loss_hand_example(self, aggregation):
        logp_old = np.full(self.MASK.shape, -1.0)
        logp = logp_old + np.log(self.RATIOS)
        logp_ref = logp_old + np.array([[[0.2, -0.1, 9.0], [0.0, 0.3, -0.2]]])
        first, second = map(sum, self.TOKEN_LOSSES)
        expected = {"sequence": (first / 2 + second / 3) / 2,            # GRPO
                    "constant": (first + second) / (2 * 3),                # Dr. GRPO: B K N
                    "token": (first + second) / 5}[aggregation]           # DAPO
        grpo_loss = functools.partial(grpo.grpo_loss, aggregation=aggregation, eps_low=0.2,
                                      eps_high=0.3)
        loss, metrics = self.variant(grpo_loss)(logp, logp_old, logp_ref, self.MASK,
                                                self.ADVANTAGES)
        np.testing.assert_allclose(loss, expected, rtol=1e-12)
        np.testing.assert_allclose(metrics["clip_frac"], 4 / 5)            # all but 1.1
        # the k3 term, aggregated the same way: with A = 0 it is all of the loss
        d = logp_ref - logp                                                # log(pi_ref / pi)
        k3 = (np.exp(d) - 1 - d) * self.MASK
        kl_only = {"sequence": np.mean(k3.sum(-1) / self.MASK.sum(-1)),
                   "constant": k3.sum() / 6, "token": k3.sum() / 5}[aggregation]
        loss, metrics = self.variant(functools.partial(grpo_loss, kl_coef=0.3))(
            logp, logp_old, logp_ref, self.MASK, np.zeros((1, 2)))
        np.testing.assert_allclose(loss, 0.3 * kl_only, rtol=1e-12)
        np.testing.assert_allclose(metrics["kl_k3_loss"], k3.sum() / 5, rtol=1e-12)

    @chex.variants(with_jit=True)
    @float64
    def test_gspo_loss_hand_example(self):
        mask = np.array([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
        logp_old = np.random.default_rng(0).normal(size=mask.shape) - 2
        token_log_ratios = np.array([[[0.3, -0.1, 7.0], [0.6, 0.9, 0.3]]])      # 7.0: a pad
        loss, metrics = self.variant(functools.partial(gspo.gspo_loss, eps_low=0.2, eps_high=0.2))(
            logp_old + token_log_ratios, logp_old, mask, np.array([[1.0, -1.0]]))
        # s = exp(mean log ratio): e^0.1 (inside the range) and e^0.6 (outside, but A < 0 and
        # the unclipped term is the larger one)
        s1, s2 = math.exp(0.1), math.exp(0.6)
        np.testing.assert_allclose(loss, (-s1 + max(s2, 1.2)) / 2, rtol=1e-12)
        np.testing.assert_allclose(metrics["clip_frac"], 0.5)
        np.testing.assert_allclose(metrics["ratio_mean"], (s1 + s2) / 2, rtol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_gspo_ratio_is_exp_of_mean_token_log_ratio(self):
        ro = make_rollout(11, k=3)
        logp_old = np.asarray(policy_logps(ro.theta_old, ro.tokens))
        logp = np.asarray(policy_logps(ro.theta, ro.tokens))
        log_s = self.variant(gspo.sequence_log_ratio)(logp, logp_old, ro.mask)
        expected = ((logp - logp_old) * ro.mask).sum(-1) / ro.mask.sum(-1)
        np.testing.assert_allclose(log_s, expected, rtol=1e-12)
        # and it is the length-normalised sequence ratio (pi / pi_old)^(1 / |y|)
        seq = lambda lp: (lp * ro.mask).sum(-1)
        np.testing.assert_allclose(np.exp(log_s), np.exp(seq(logp) - seq(logp_old)) ** (
            1 / ro.mask.sum(-1)), rtol=1e-12)

    @float64
    def test_prepare_puts_the_kl_where_the_config_says(self):
        ro = make_rollout(12, k=3)
        buffer = Buffer(tokens=None, mask=None, resp_mask=None, logp_ref=None,
                        rewards=jnp.asarray(ro.rewards), seq_kl=jnp.asarray(ro.seq_kl))
        cfg = ExperimentConfig(rl=RLConfig(beta=0.3, n_samples=3))
        regularised = ro.rewards - 0.3 * ro.seq_kl
        adv = lambda algo, c: np.asarray(ALGORITHMS[algo].prepare(buffer, None, c, {}).advantages)
        np.testing.assert_allclose(adv("rloo", cfg), rloo.leave_one_out_advantages(regularised))
        np.testing.assert_allclose(adv("gspo", cfg), grpo.group_advantages(regularised))
        np.testing.assert_allclose(adv("grpo", cfg), grpo.group_advantages(ro.rewards))
        in_reward = dataclasses.replace(cfg, grpo=grpo.GRPOConfig(kl="reward",
                                                                  normalise_std=False))
        np.testing.assert_allclose(adv("grpo", in_reward),
                                   grpo.group_advantages(regularised, normalise_std=False))


class RelationToP3OTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CLIP_MODES)
    @float64
    def test_rloo_k2_gradient_equals_p3o_gradient_at_old_policy(self, clip):
        """K = 2: RLOO's advantages are +-Delta, its loss a mean over the 2B responses, P3O's a
        mean over the B pairs of -Delta (log pi_1 - log pi_2) / 2: the constant is exactly 1."""
        ro = make_rollout(3, k=2)
        logp_old = policy_logps(ro.theta_old, ro.tokens)
        delta = p3o.p3o_delta(ro.rewards, ro.seq_kl, BETA)
        p3o_grad = jax.grad(lambda t: p3o.p3o_loss(policy_logps(t, ro.tokens), logp_old, ro.mask,
                                                   delta, clip=clip)[0])(ro.theta_old)
        rloo_grad = self.variant(jax.grad(baseline_objective(ro, ro.rewards, "rloo"),
                                          has_aux=True))(ro.theta_old)[0]
        self.assertGreater(float(jnp.abs(p3o_grad).max()), 1e-3)
        np.testing.assert_allclose(rloo_grad, 1.0 * p3o_grad, rtol=1e-10, atol=1e-14)

    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_dr_grpo_k2_gradient_is_p3o_gradient_over_2n(self):
        """Dr. GRPO without std normalisation, KL in the reward: A = +-Delta / 2, summed over
        tokens and divided by B K N, so its gradient is P3O's times 1 / (2 N)."""
        ro = make_rollout(3, k=2)
        n = ro.mask.shape[-1]
        logp_old = policy_logps(ro.theta_old, ro.tokens)
        delta = p3o.p3o_delta(ro.rewards, ro.seq_kl, BETA)
        p3o_grad = jax.grad(lambda t: p3o.p3o_loss(policy_logps(t, ro.tokens), logp_old, ro.mask,
                                                   delta, clip="separate")[0])(ro.theta_old)
        objective = baseline_objective(ro, ro.rewards, "grpo", aggregation="constant",
                                       normalise_std=False)
        grad = self.variant(jax.grad(objective, has_aux=True))(ro.theta_old)[0]
        np.testing.assert_allclose(grad, p3o_grad / (2 * n), rtol=1e-10, atol=1e-14)

    @chex.variants(with_jit=True)
    @float64
    def test_gspo_and_grpo_sequence_share_the_gradient_at_old_policy(self):
        ro = make_rollout(5, k=3)
        grads = [self.variant(jax.grad(baseline_objective(ro, ro.rewards, m), has_aux=True))(
            ro.theta_old)[0] for m in ("gspo", "grpo")]
        # by hand: -1/(B K) sum_i A_i grad log pi(y_i) / |y_i|
        vocab = ro.theta_old.shape[-1]
        dlogpi = ro.mask[..., None] * (np.eye(vocab)[ro.tokens] - np_softmax(ro.theta_old))
        adv = np.asarray(grpo.group_advantages(ro.rewards - BETA * ro.seq_kl, std_eps=0.0))
        lengths = ro.mask.sum(-1)
        expected = -(adv / lengths)[..., None, None] * dlogpi / adv.size
        np.testing.assert_allclose(grads[0], expected, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grads[1], expected, rtol=1e-10, atol=1e-14)


METHOD_SETTINGS = (
    dict(method="rloo"),
    dict(method="grpo", aggregation="sequence", normalise_std=True, kl="loss"),      # GRPO
    dict(method="grpo", aggregation="constant", normalise_std=False, kl="reward"),   # Dr. GRPO
    dict(method="grpo", aggregation="token", normalise_std=True, kl="reward",        # DAPO
         eps=(0.2, 0.28)),
    dict(method="gspo", eps=(0.02, 0.03)),                  # wide enough to clip some, not all
    dict(method="gspo", normalise_std=False, eps=(0.02, 0.03)),
)


class InvarianceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*METHOD_SETTINGS)
    @float64
    def test_invariant_to_per_prompt_reward_shift(self, method, **settings):
        ro = make_rollout(3, k=3)
        shift = 100.0 * np.random.default_rng(1).normal(size=(ro.rewards.shape[0], 1))

        @self.variant
        def value_and_grad(rewards):
            return jax.value_and_grad(baseline_objective(ro, rewards, method, **settings),
                                      has_aux=True)(ro.theta)

        (loss, metrics), grad = value_and_grad(ro.rewards)
        (shifted_loss, _), shifted_grad = value_and_grad(ro.rewards + shift)
        self.assertTrue(0.0 < float(metrics["clip_frac"]) < 1.0)  # both sides of the clip
        self.assertGreater(float(jnp.abs(grad).max()), 1e-3)
        np.testing.assert_allclose(shifted_loss, loss, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(shifted_grad, grad, rtol=1e-10, atol=1e-12)
        _, one_sided_grad = value_and_grad(ro.rewards + shift * np.eye(3)[0])
        self.assertFalse(np.allclose(one_sided_grad, grad, rtol=1e-3, atol=1e-6))

    @chex.variants(with_jit=True)
    @parameterized.parameters(*AGGREGATIONS)
    @float64
    def test_grpo_with_std_is_invariant_to_per_prompt_scale(self, aggregation):
        ro = make_rollout(4, k=3)
        scale = np.exp(2.0 * np.random.default_rng(2).normal(size=(ro.rewards.shape[0], 1)))

        @self.variant
        def grads(rewards):      # [with std normalisation, without]
            return [jax.grad(baseline_objective(ro, rewards, "grpo", aggregation=aggregation,
                                                normalise_std=std, kl="loss"),
                             has_aux=True)(ro.theta)[0] for std in (True, False)]

        (normed, plain), (scaled_normed, scaled_plain) = grads(ro.rewards), grads(ro.rewards * scale)
        np.testing.assert_allclose(scaled_normed, normed, rtol=1e-10, atol=1e-12)
        # without the std the scale changes the update
        self.assertFalse(np.allclose(scaled_plain, plain, rtol=1e-3, atol=1e-6))


class OnlineDPOInvarianceTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @float64
    def test_online_dpo_sees_only_the_order_within_a_pair(self):
        """Online DPO orders each pair by the RM's scores: a per-prompt shift (indeed any
        per-prompt increasing map) leaves the loss unchanged; swapping a pair's order does not."""
        ro = make_rollout(6, k=2)
        seq = lambda theta: ops.sequence_logprob(policy_logps(theta, ro.tokens), ro.mask)
        logp_ref = np.asarray(seq(ro.theta_old))

        @self.variant
        def grad(scores):
            def objective(theta):
                pol_c, pol_r = dpo.order_pair_by_score(scores, seq(theta))
                ref_c, ref_r = dpo.order_pair_by_score(scores, logp_ref)
                return dpo.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)[0]
            return jax.grad(objective)(ro.theta)

        shift = 100.0 * np.random.default_rng(1).normal(size=(ro.rewards.shape[0], 1))
        base = grad(ro.rewards)
        np.testing.assert_array_equal(grad(ro.rewards + shift), base)
        np.testing.assert_array_equal(grad(np.exp(ro.rewards) * np.exp(shift)), base)
        self.assertFalse(np.allclose(grad(ro.rewards[:, ::-1]), base))


class ClippingTest(chex.TestCase):
    # (ratio, advantage, gradient is zero) with clip(rho, 1 - 0.1, 1 + 0.3)
    CASES = (
        (1.35, +1.0, True),    # past 1 + eps_high, the way A favours
        (1.25, +1.0, False),   # inside the wider upper side
        (1.35, -1.0, False),   # moved against A: pulled back
        (0.85, -1.0, True),    # past 1 - eps_low, the way A favours
        (0.95, -1.0, False),
        (0.85, +1.0, False),
    )

    def _check(self, grads, cases):
        for case, grad in zip(cases, grads):
            if case[2]:
                np.testing.assert_array_equal(grad, 0.0, err_msg=str(case))
            else:
                self.assertTrue(np.all(np.abs(grad) > 1e-6), msg=str(case))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*AGGREGATIONS)
    @float64
    def test_grpo_token_clip_is_asymmetric(self, aggregation):
        ratios, advantages, _ = map(np.array, zip(*self.CASES))
        n = len(self.CASES)
        mask = np.ones((n, 1, 1))                             # a case per prompt, one token
        logp_old = np.full(mask.shape, -1.0)
        loss = lambda lp: grpo.grpo_loss(lp, logp_old, logp_old, mask, advantages[:, None],
                                         aggregation=aggregation, eps_low=0.1, eps_high=0.3)[0]
        grads = self.variant(jax.grad(loss))(logp_old + np.log(ratios)[:, None, None])
        self._check(grads[:, 0, 0], self.CASES)

    # RLOO's range is symmetric: (sequence ratio, advantage, gradient is zero), clip(rho, 0.8, 1.2)
    RLOO_CASES = ((1.3, +1.0, True), (1.1, +1.0, False), (1.3, -1.0, False),
                  (0.7, -1.0, True), (0.9, -1.0, False), (0.7, +1.0, False))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("rloo", "gspo")
    @float64
    def test_sequence_clip(self, method):
        cases = self.RLOO_CASES if method == "rloo" else self.CASES
        ratios, advantages, _ = map(np.array, zip(*cases))
        mask = np.ones((len(cases), 1, 3))
        mask[:, 0, 2] = 0                                     # a pad: no gradient there
        logp_old = np.random.default_rng(7).normal(size=mask.shape) - 2
        # RLOO's ratio is the whole sequence's (2 real tokens), GSPO's its per-token mean
        per_token = np.log(ratios) / (2 if method == "rloo" else 1)
        logp = logp_old + per_token[:, None, None] * mask
        if method == "rloo":
            loss = lambda lp: rloo.rloo_loss(lp, logp_old, mask, advantages[:, None], eps=0.2)[0]
        else:
            loss = lambda lp: gspo.gspo_loss(lp, logp_old, mask, advantages[:, None],
                                             eps_low=0.1, eps_high=0.3)[0]
        grads = np.asarray(self.variant(jax.grad(loss))(logp))
        np.testing.assert_array_equal(grads[:, 0, 2], 0.0)
        self._check(grads[:, 0, :2], cases)


@pytest.mark.parametrize("call, message", [
    (lambda: rloo.leave_one_out_advantages(jnp.zeros((3, 1))), r"at least 2 responses"),
    (lambda: rloo.rloo_loss(jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 4)), jnp.ones((2, 2, 4)),
                            jnp.zeros((2, 3))), r"advantages must have shape \[B, K\]"),
    (lambda: grpo.group_advantages(jnp.zeros(4)), r"rewards must have shape \[B, K\]"),
    (lambda: grpo.grpo_loss(jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 3)),
                            jnp.ones((2, 2, 4)), jnp.zeros((2, 2))), r"equal shapes"),
    (lambda: grpo.aggregate(jnp.zeros((2, 2, 4)), jnp.ones((2, 2, 4)), "mean"),
     r"aggregation must be one of"),
    (lambda: gspo.gspo_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4)),
                            jnp.zeros((2,))), r"logp must have shape \[B, K, T\]"),
])
def test_bad_shapes_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
