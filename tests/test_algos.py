"""Tests for the objectives of p3o_jax.algos (P3O, PPO, DPO, reward model, SFT) and the shared
primitives of p3o_jax.ops.

The P3O invariance, gradient and clipping tests and GAE run with and without jit (chex
variants); the rest runs under jit.
Where exactness matters tests run in float64 inside a local ``jax.enable_x64`` scope; the rest
of the test session stays float32.
Expected values come from the formulas in docs/P3O.md, written out with numpy / math.
"""

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from p3o_jax import ops
from p3o_jax.algos import dpo, p3o, ppo, reward_model, sft

CLIP_MODES = ("separate", "joint")
BETA = 0.05


def float64(test):
    """Run a test body with 64-bit JAX types enabled (locally, not for the whole session)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return test(*args, **kwargs)

    return wrapper


def np_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_log_sigmoid(x):
    return -math.log1p(math.exp(-x))


class Rollout(NamedTuple):
    """A tabular "policy": theta [B, K, T, V] holds the logits of every token position."""

    theta_old: np.ndarray
    theta: np.ndarray  # current parameters, != theta_old
    tokens: np.ndarray  # [B, K, T]
    mask: np.ndarray  # [B, K, T], with left, right and two-sided padding
    rewards: np.ndarray  # [B, K]
    seq_kl: np.ndarray  # [B, K]


def make_rollout(seed, batch=4, k=2, length=5, vocab=4):
    rng = np.random.default_rng(seed)
    theta_old = rng.normal(size=(batch, k, length, vocab))
    mask = np.ones((batch, k, length))
    mask[0, 0, :2] = 0  # left padding
    mask[1, k - 1, -2:] = 0  # right padding
    mask[2, 0, [0, -1]] = 0  # both
    return Rollout(
        theta_old=theta_old,
        theta=theta_old + 0.15 * rng.normal(size=theta_old.shape),
        tokens=rng.integers(0, vocab, size=(batch, k, length)),
        mask=mask,
        rewards=rng.normal(size=(batch, k)),
        seq_kl=rng.normal(size=(batch, k)),
    )


def policy_logps(theta, tokens):
    return ops.token_logprobs(theta, tokens)


def p3o_objective(ro, rewards, clip, k_form):
    """theta -> (loss, metrics) on the rollout, via p3o_loss_k (k_form) or p3o_delta + p3o_loss (K = 2)."""
    logp_old = policy_logps(ro.theta_old, ro.tokens)
    if k_form:
        delta = p3o.pairwise_delta(rewards, ro.seq_kl, BETA)
        return lambda theta: p3o.p3o_loss_k(
            policy_logps(theta, ro.tokens), logp_old, ro.mask, delta, clip=clip
        )
    delta = p3o.p3o_delta(rewards, ro.seq_kl, BETA)
    return lambda theta: p3o.p3o_loss(policy_logps(theta, ro.tokens), logp_old, ro.mask, delta, clip=clip)


class P3OPropertiesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(clip=CLIP_MODES, k=(2, 3))
    @float64
    def test_invariant_to_per_prompt_reward_shift(self, clip, k):
        ro = make_rollout(3, k=k)
        shift = 100.0 * np.random.default_rng(1).normal(size=(ro.rewards.shape[0], 1))

        @self.variant
        def value_and_grad(rewards):
            return jax.value_and_grad(p3o_objective(ro, rewards, clip, k_form=k > 2), has_aux=True)(ro.theta)

        (loss, metrics), grad = value_and_grad(ro.rewards)
        (shifted_loss, _), shifted_grad = value_and_grad(ro.rewards + shift)
        self.assertTrue(0.0 < float(metrics["clip_frac"]) < 1.0)  # both sides of the clip are exercised
        self.assertEqual(grad.dtype, jnp.float64)
        self.assertGreater(float(jnp.abs(grad).max()), 1e-3)  # real gradients
        np.testing.assert_allclose(shifted_loss, loss, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(shifted_grad, grad, rtol=1e-10, atol=1e-12)
        # The check has teeth: shifting only one response of each prompt does change it.
        _, one_sided_grad = value_and_grad(ro.rewards + shift * np.eye(k)[0])
        self.assertFalse(np.allclose(one_sided_grad, grad, rtol=1e-3, atol=1e-6))

    @chex.variants(with_jit=True)
    @float64
    def test_token_ppo_with_fixed_critic_is_not_invariant(self):
        ro = make_rollout(0)
        batch, k, length, vocab = ro.theta.shape
        rows = batch * k  # every response is one PPO episode
        tokens, mask = ro.tokens.reshape(rows, length), ro.mask.reshape(rows, length)
        logp_old = policy_logps(ro.theta_old.reshape(rows, length, vocab), tokens)
        logp_ref = logp_old - 0.1
        values = np.random.default_rng(2).normal(size=mask.shape)  # a fixed critic
        shift = 100.0 * np.random.default_rng(1).normal(size=(batch, 1))  # a per-prompt delta(x)

        @self.variant
        def grad(scores):
            rewards = ppo.token_rewards(logp_old, logp_ref, mask, scores, BETA)
            advantages, _ = ppo.gae(rewards, values, mask)
            loss = lambda theta: ppo.policy_loss(
                policy_logps(theta.reshape(rows, length, vocab), tokens), logp_old, advantages, mask
            )[0]
            return jax.grad(loss)(ro.theta)

        base = grad(ro.rewards.reshape(-1))
        shifted = grad((ro.rewards + shift).reshape(-1))
        self.assertGreater(float(jnp.abs(shifted - base).max()), 1e-2 * float(jnp.abs(base).max()))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(clip=CLIP_MODES, k=(2, 3))
    @float64
    def test_gradient_at_old_policy_is_pairwise_policy_gradient(self, clip, k):
        ro = make_rollout(3, k=k)
        objective = p3o_objective(ro, ro.rewards, clip, k_form=k > 2)
        grad, _ = self.variant(jax.grad(objective, has_aux=True))(ro.theta_old)

        # Hand form: d log softmax(theta_t)[y_t] / d theta_t = onehot(y_t) - softmax(theta_t), so
        # the pair (i, j) contributes -Delta_ij * (dlogpi_i - dlogpi_j) / 2, averaged over pairs.
        vocab = ro.theta_old.shape[-1]
        dlogpi = ro.mask[..., None] * (np.eye(vocab)[ro.tokens] - np_softmax(ro.theta_old))
        expected = np.zeros_like(ro.theta_old)
        pairs = list(itertools.combinations(range(k), 2))
        for b in range(ro.rewards.shape[0]):
            for i, j in pairs:
                r, l = ro.rewards[b], ro.seq_kl[b]
                delta = (r[i] - r[j]) - BETA * (l[i] - l[j])
                expected[b, i] += -delta * dlogpi[b, i] / 2
                expected[b, j] += +delta * dlogpi[b, j] / 2
        expected /= ro.rewards.shape[0] * len(pairs)
        np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-13)

    @chex.variants(with_jit=True)
    @parameterized.parameters(*CLIP_MODES)
    @float64
    def test_weighted_pairwise_gradient_equals_vanilla_policy_gradient(self, clip):
        # Single-step bandit with 4 actions; a response y is one action.
        rng = np.random.default_rng(4)
        n = 4
        theta_old, reward = rng.normal(size=n), rng.normal(size=n)
        theta = theta_old + rng.normal(size=n)
        pi, pi_old = np_softmax(theta), np_softmax(theta_old)
        vanilla = pi * (reward - pi @ reward)  # grad_theta E_{y~pi}[r(y)] for a softmax policy
        np.testing.assert_allclose(
            jax.grad(lambda t: jnp.sum(jax.nn.softmax(t) * reward))(theta), vanilla, rtol=1e-12
        )

        # Exact expectation over ordered pairs (y1, y2) ~ pi_old x pi_old.
        dlogpi = np.eye(n) - pi  # row y: grad log pi(y)
        pairwise = np.zeros(n)
        for y1, y2 in itertools.product(range(n), repeat=2):
            rho1, rho2 = pi[y1] / pi_old[y1], pi[y2] / pi_old[y2]
            weight = pi_old[y1] * pi_old[y2] * rho1 * rho2
            pairwise += weight * (reward[y1] - reward[y2]) * (dlogpi[y1] - dlogpi[y2]) / 2
        np.testing.assert_allclose(pairwise, vanilla, rtol=1e-12, atol=1e-14)

        # The library's loss (clipping disabled) is that estimator: put all 16 ordered pairs in a
        # batch, with Delta = r1 - r2 times the pair's probability (the loss mean is over pairs).
        actions = np.array(list(itertools.product(range(n), repeat=2)))  # [16, 2]
        delta = (reward[actions[:, 0]] - reward[actions[:, 1]]) * pi_old[actions].prod(-1) * len(actions)
        logp = lambda t: jax.nn.log_softmax(t)[actions][..., None]  # [16, 2, T=1]
        mask = np.ones((len(actions), 2, 1))

        @self.variant
        def neg_grad(t):
            loss = lambda t: p3o.p3o_loss(
                logp(t), logp(theta_old), mask, delta, clip=clip, eps=1e6, ratio_bound=1e6
            )[0]
            return -jax.grad(loss)(t)

        np.testing.assert_allclose(neg_grad(theta), vanilla, rtol=1e-10, atol=1e-13)

    # Each clipping case is one pair of a batch: the loss is a mean over pairs, so a pair's
    # gradient depends only on that pair (up to the 1/B factor).
    SEPARATE_CASES = (
        # (response whose ratio moves, its ratio, Delta, that response's gradient is zero)
        (0, 1.5, +1.0, True),  # y1 favoured and already pushed past 1 + eps
        (0, 1.1, +1.0, False),
        (0, 1.5, -1.0, False),  # moved against Delta: the gradient pulls it back
        (0, 0.5, -1.0, True),  # y1 disfavoured and already below 1 - eps
        (0, 0.9, -1.0, False),
        (0, 0.5, +1.0, False),
        (1, 0.5, +1.0, True),  # y2 disfavoured when Delta > 0
        (1, 0.9, +1.0, False),
        (1, 1.5, -1.0, True),
        (1, 1.5, +1.0, False),
    )
    JOINT_CASES = (
        # (u - u_old, Delta, gradient is zero)
        (0.3, +1.0, True),  # u pushed up past u_old + eps, the way Delta > 0 favours
        (0.1, +1.0, False),
        (0.3, -1.0, False),
        (-0.3, -1.0, True),
        (-0.1, -1.0, False),
        (-0.3, +1.0, False),
    )

    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_separate_clipping(self):
        responses, rhos, deltas, expect_zero = map(np.array, zip(*self.SEPARATE_CASES))
        cases = np.arange(len(responses))
        mask = np.ones((len(cases), 2, 4))
        mask[cases, responses, 0] = 0  # a pad: its gradient is zero in every case
        logp_old = np.random.default_rng(5).normal(size=mask.shape) - 2.0
        log_rhos = np.full((len(cases), 2), math.log(1.05))  # the other response stays inside the band
        log_rhos[cases, responses] = np.log(rhos)
        logp = logp_old + (log_rhos[..., None] / mask.sum(-1, keepdims=True)) * mask

        loss = lambda lp: p3o.p3o_loss(lp, logp_old, mask, deltas, clip="separate")[0]
        grads = self.variant(jax.grad(loss))(logp)[cases, responses]
        real = mask[cases, responses] > 0
        np.testing.assert_array_equal(grads[~real], 0.0)
        for case, grad, is_real, zero in zip(self.SEPARATE_CASES, grads, real, expect_zero):
            if zero:
                np.testing.assert_array_equal(grad, 0.0, err_msg=str(case))
            else:
                self.assertTrue(np.all(np.abs(grad[is_real]) > 1e-3), msg=str(case))

    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_joint_clipping(self):
        dus, deltas, expect_zero = map(np.array, zip(*self.JOINT_CASES))
        mask = np.ones((len(dus), 2, 3))
        logp_old = np.random.default_rng(6).normal(size=mask.shape) - 2.0
        logp = logp_old.copy()
        logp[:, 0] += dus[:, None] / 3  # log rho1 = u - u_old, log rho2 = 0

        loss = lambda lp: p3o.p3o_loss(lp, logp_old, mask, deltas, clip="joint")[0]
        grads = self.variant(jax.grad(loss))(logp)
        for case, grad, zero in zip(self.JOINT_CASES, grads, expect_zero):
            if zero:
                np.testing.assert_array_equal(grad, 0.0, err_msg=str(case))
            else:
                self.assertTrue(np.all(np.abs(grad) > 1e-3), msg=str(case))

    @chex.variants(with_jit=True)
    @parameterized.parameters(*CLIP_MODES)
    @float64
    def test_k_sample_loss_matches_pair_losses(self, clip):
        ro = make_rollout(7, k=3)
        logp_old = policy_logps(ro.theta_old, ro.tokens)
        logp = policy_logps(ro.theta, ro.tokens)

        def pair_loss(i, j):
            delta = p3o.p3o_delta(ro.rewards[:, [i, j]], ro.seq_kl[:, [i, j]], BETA)
            pick = lambda x: x[:, [i, j]]
            return p3o.p3o_loss(pick(logp), pick(logp_old), pick(ro.mask), delta, clip=clip)[0]

        loss_k = self.variant(
            lambda lp, lpo, m, r, kl: p3o.p3o_loss_k(lp, lpo, m, p3o.pairwise_delta(r, kl, BETA),
                                                     clip=clip)[0]
        )
        expected = np.mean([pair_loss(0, 1), pair_loss(0, 2), pair_loss(1, 2)])
        np.testing.assert_allclose(loss_k(logp, logp_old, ro.mask, ro.rewards, ro.seq_kl), expected, rtol=1e-12)

        # K = 2: p3o_loss_k is p3o_loss, in value and gradient.
        ro2 = Rollout(*(x[:, :2] for x in ro))
        pair_objective = p3o_objective(ro2, ro2.rewards, clip, k_form=False)
        k_objective = p3o_objective(ro2, ro2.rewards, clip, k_form=True)
        (pair_value, _), pair_grad = jax.value_and_grad(pair_objective, has_aux=True)(ro2.theta)
        (k_value, _), k_grad = self.variant(jax.value_and_grad(k_objective, has_aux=True))(ro2.theta)
        np.testing.assert_allclose(k_value, pair_value, rtol=1e-12)
        np.testing.assert_allclose(k_grad, pair_grad, rtol=1e-12, atol=1e-15)

    @parameterized.parameters(*CLIP_MODES)
    def test_p3o_outputs_and_metrics(self, clip):
        ro = make_rollout(8)
        logp_old = policy_logps(jnp.asarray(ro.theta_old, jnp.float32), ro.tokens)
        logp = policy_logps(jnp.asarray(ro.theta, jnp.float32), ro.tokens)
        rewards, seq_kl = jnp.asarray(ro.rewards, jnp.float32), jnp.asarray(ro.seq_kl, jnp.float32)
        delta = p3o.p3o_delta(rewards, seq_kl, BETA)
        chex.assert_shape(delta, (4,))
        np.testing.assert_allclose(p3o.pairwise_delta(rewards, seq_kl, BETA)[:, 0], delta, rtol=1e-6)
        loss, metrics = jax.jit(functools.partial(p3o.p3o_loss, clip=clip))(logp, logp_old, ro.mask, delta)
        chex.assert_shape(loss, ())
        chex.assert_type(loss, jnp.float32)
        chex.assert_tree_all_finite((loss, metrics))
        log_rho = np.asarray(
            ops.sequence_logprob(logp, ro.mask) - ops.sequence_logprob(logp_old, ro.mask)
        )
        np.testing.assert_allclose(metrics["rho_max"], np.exp(log_rho).max(), rtol=1e-5)
        np.testing.assert_allclose(metrics["log_rho_mean"], log_rho.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["delta_abs_mean"], np.abs(delta).mean(), rtol=1e-6)
        self.assertGreaterEqual(float(metrics["approx_kl"]), 0.0)


class TokenPPOTest(chex.TestCase):
    REWARDS, VALUES = [0.5, -0.2, 1.0], [0.3, 0.1, -0.4]

    @staticmethod
    def hand_gae(rewards, values, gamma, lam):
        """A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0."""
        n = len(rewards)
        next_values = list(values[1:]) + [0.0]
        deltas = [rewards[t] + gamma * next_values[t] - values[t] for t in range(n)]
        return [sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, n)) for t in range(n)]

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ([1, 1, 1, 0, 0],),  # right padding
        ([0, 0, 1, 1, 1],),  # left padding
        ([0, 1, 1, 1, 0],),  # both
    )
    @float64
    def test_gae_hand_example(self, layout):
        gamma, lam = 0.9, 0.8
        mask = np.array([layout], np.float64)
        real = mask[0] > 0
        rewards = np.full(mask.shape, 7.0)  # garbage at the pads must not leak in
        values = np.full(mask.shape, -3.0)
        rewards[0, real], values[0, real] = self.REWARDS, self.VALUES

        advantages, returns = self.variant(functools.partial(ppo.gae, gamma=gamma, lam=lam))(rewards, values, mask)
        chex.assert_shape((advantages, returns), mask.shape)
        expected = self.hand_gae(self.REWARDS, self.VALUES, gamma, lam)
        np.testing.assert_allclose(advantages[0, real], expected, rtol=1e-12)
        np.testing.assert_allclose(returns[0, real], np.add(expected, self.VALUES), rtol=1e-12)
        np.testing.assert_array_equal(advantages[0, ~real], 0.0)
        np.testing.assert_array_equal(returns[0, ~real], 0.0)

    @chex.variants(with_jit=True)
    def test_last_token_index(self):
        mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
        index = self.variant(ops.last_token_index)(mask)
        np.testing.assert_array_equal(index, [2, 4, 3, -1])

    @chex.variants(with_jit=True)
    def test_token_rewards_put_score_on_last_real_token(self):
        mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
        logp_old = np.array([[-1.0, -2.0, -0.5, 9.0], [9.0, -1.0, -1.5, -2.0]], np.float32)
        logp_ref = np.array([[-1.5, -1.0, -0.5, 0.0], [0.0, -2.0, -1.0, -2.5]], np.float32)
        scores = np.array([2.0, -3.0], np.float32)
        rewards = self.variant(functools.partial(ppo.token_rewards, beta=0.1))(logp_old, logp_ref, mask, scores)
        expected = [
            [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0],
            [0.0, -0.1 * 1.0, -0.1 * -0.5, -0.1 * 0.5 - 3.0],
        ]
        np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True)
    def test_policy_loss_hand_example(self):
        log_ratio = np.log([[1.5, 1.1, 0.5, 2.0]])  # last token is padding
        logp_old = np.full((1, 4), -1.0)
        advantages = np.array([[1.0, 1.0, 1.0, 5.0]])
        mask = np.array([[1.0, 1.0, 1.0, 0.0]])
        loss, metrics = self.variant(ppo.policy_loss)(logp_old + log_ratio, logp_old, advantages, mask)
        # max(-A rho, -A clip(rho, 0.8, 1.2)) per real token: -1.2, -1.1, -0.5
        np.testing.assert_allclose(loss, (-1.2 - 1.1 - 0.5) / 3, rtol=1e-5)
        np.testing.assert_allclose(metrics["clip_frac"], 2 / 3, rtol=1e-6)
        expected_kl = np.mean([r - 1 - math.log(r) for r in (1.5, 1.1, 0.5)])  # k3 of KL(old || new)
        np.testing.assert_allclose(metrics["approx_kl"], expected_kl, rtol=1e-5)

    @chex.variants(with_jit=True)
    def test_value_loss_hand_example(self):
        values = np.array([[1.0, 0.0, 2.0]])
        values_old = np.array([[0.5, 0.0, 0.0]])
        returns = np.array([[0.0, 1.0, 2.0]])
        mask = np.array([[1.0, 1.0, 0.0]])
        loss, metrics = self.variant(ppo.value_loss)(values, values_old, returns, mask)
        # token 0: clipped value 0.7 -> max(1.0, 0.49) = 1.0; token 1: max(1, 1) = 1
        np.testing.assert_allclose(loss, 0.5 * (1.0 + 1.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(metrics["value_clip_frac"], 0.0)
        returns_far = np.array([[3.0, 1.0, 2.0]])  # token 0: the clipped 0.7 is further from 3 than 1.0
        loss, metrics = self.variant(ppo.value_loss)(values, values_old, returns_far, mask)
        np.testing.assert_allclose(loss, 0.5 * (2.3**2 + 1.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(metrics["value_clip_frac"], 0.5)
        unclipped = self.variant(functools.partial(ppo.value_loss, value_clip=None))
        loss, _ = unclipped(values, values_old, returns_far, mask)
        np.testing.assert_allclose(loss, 0.5 * (2.0**2 + 1.0) / 2, rtol=1e-6)

    @chex.variants(with_jit=True)
    def test_whiten(self):
        x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 5.0, 6.0]], np.float32)
        mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)
        white = self.variant(ops.whiten)(x, mask)
        real = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        expected = (real - real.mean()) / real.std()
        np.testing.assert_allclose(white[mask > 0], expected, rtol=1e-5)
        np.testing.assert_array_equal(white[mask == 0], 0.0)

    def test_kl_controllers(self):
        up = ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 1000.0, 100)  # error clipped to +0.2
        np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 100 / 1000), rtol=1e-6)
        down = ppo.adaptive_kl_coef(0.1, 5.7, 6.0, 1000.0, 100)  # error 5.7 / 6 - 1 = -0.05
        np.testing.assert_allclose(down, 0.1 * (1 - 0.05 * 100 / 1000), rtol=1e-12)
        # the loop's carry: fixed while ppo.target_kl is 0, adapted otherwise
        from p3o_jax.algos.ppo import PPOConfig
        from p3o_jax.config import ExperimentConfig, RLConfig
        cfg = ExperimentConfig(rl=RLConfig(prompts_per_iter=25, n_samples=4))
        self.assertEqual(ppo.next_carry({"kl_coef": 0.1}, {"kl_k1": 12.0}, cfg), {"kl_coef": 0.1})
        cfg = dataclasses.replace(cfg, ppo=PPOConfig(target_kl=6.0, kl_horizon=1000.0))
        np.testing.assert_allclose(ppo.next_carry({"kl_coef": 0.1}, {"kl_k1": 12.0}, cfg)["kl_coef"],
                                   0.1 * (1 + 0.2 * 100 / 1000), rtol=1e-12)


class PreferenceAndSFTLossTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.parameters(0.0, 0.2)
    def test_dpo_hand_example(self, label_smoothing):
        beta = 0.1
        policy_chosen, policy_rejected = np.array([-3.0, -6.0]), np.array([-5.0, -4.0])
        ref_chosen, ref_rejected = np.array([-4.0, -5.0]), np.array([-4.5, -5.0])
        loss, metrics = self.variant(functools.partial(dpo.dpo_loss, beta=beta, label_smoothing=label_smoothing))(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected
        )
        # h = (pc - pr) - (rc - rr): (2 - 0.5) = 1.5 and (-2 - 0) = -2
        expected = np.mean(
            [
                -(1 - label_smoothing) * np_log_sigmoid(beta * h) - label_smoothing * np_log_sigmoid(-beta * h)
                for h in (1.5, -2.0)
            ]
        )
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(metrics["reward_accuracy"], 0.5)  # first pair right, second wrong
        np.testing.assert_allclose(metrics["reward_margin"], beta * (1.5 - 2.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(metrics["chosen_reward"], beta * (1.0 - 1.0) / 2, atol=1e-7)

    def test_order_pair_by_score(self):
        scores = np.array([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
        seq_logps = np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
        chosen, rejected = jax.jit(dpo.order_pair_by_score)(scores, seq_logps)
        np.testing.assert_array_equal(chosen, [-2.0, -3.0, -5.0])
        np.testing.assert_array_equal(rejected, [-1.0, -4.0, -6.0])
        token_logps = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
        chosen, _ = dpo.order_pair_by_score(scores, token_logps)
        np.testing.assert_array_equal(chosen, token_logps[[0, 1, 2], [1, 0, 0]])

    @chex.variants(with_jit=True)
    def test_bradley_terry_hand_example(self):
        r_chosen, r_rejected = np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])
        loss, metrics = self.variant(reward_model.bradley_terry_loss)(r_chosen, r_rejected)
        expected = np.mean([-np_log_sigmoid(m) for m in (1.0, 0.0, -1.0)])
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(metrics["accuracy"], (1 + 0.5 + 0) / 3, rtol=1e-6)  # a tie counts 0.5
        np.testing.assert_allclose(metrics["margin"], 0.0, atol=1e-7)

    @chex.variants(with_jit=True)
    @float64
    def test_token_logprobs_entropy_and_sft(self):
        rng = np.random.default_rng(9)
        logits = rng.normal(size=(2, 3, 5)) * 3
        targets = rng.integers(0, 5, size=(2, 3))
        mask = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
        temperature = 0.7

        logps = self.variant(functools.partial(ops.token_logprobs, temperature=temperature))(logits, targets)
        log_softmax = np.log(np_softmax(logits / temperature))
        np.testing.assert_allclose(logps, np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0], rtol=1e-12)

        entropy = self.variant(ops.entropy_from_logits)(logits)
        probs = np_softmax(logits)
        np.testing.assert_allclose(entropy, -(probs * np.log(probs)).sum(-1), rtol=1e-12)

        loss, metrics = self.variant(sft.sft_loss)(logits, targets, mask)
        nll = -np.take_along_axis(np.log(probs), targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(loss, nll[mask > 0].mean(), rtol=1e-12)  # per real token, not per row
        self.assertEqual(int(metrics["num_tokens"]), 4)
        hits = (logits.argmax(-1) == targets)[mask > 0]
        np.testing.assert_allclose(metrics["accuracy"], hits.mean())

    def test_token_logprobs_upcasts_bfloat16(self):
        logits = jnp.asarray(np.random.default_rng(10).normal(size=(2, 4, 7)), jnp.bfloat16)
        logps = ops.token_logprobs(logits, jnp.zeros((2, 4), jnp.int32))
        chex.assert_type(logps, jnp.float32)
        chex.assert_shape(logps, (2, 4))
        chex.assert_tree_all_finite(logps)


class KLEstimatorTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @float64
    def test_estimators_hand_values(self):
        logp = np.array([[-1.0, -2.0, -0.5]])
        logp_ref = np.array([[-1.5, -1.0, -0.5]])
        mask = np.array([[1.0, 1.0, 0.0]])
        d = logp - logp_ref
        expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}
        for kind, want in expected.items():
            per_token = self.variant(functools.partial(ops.kl_per_token, kind=kind))(logp, logp_ref)
            np.testing.assert_allclose(per_token, want, rtol=1e-12)
            per_seq = self.variant(functools.partial(ops.kl_per_sequence, kind=kind))(logp, logp_ref, mask)
            np.testing.assert_allclose(per_seq, (want * mask).sum(-1), rtol=1e-12)

    def test_k3_is_finite_and_nonnegative_for_extreme_ratios(self):
        logp = jnp.array([0.0, -200.0, -1e-3, -80.0])
        logp_ref = jnp.array([-200.0, 0.0, 0.0, -80.0])
        k3 = ops.kl_per_token(logp, logp_ref, "k3")
        chex.assert_tree_all_finite(k3)
        self.assertTrue(bool(jnp.all(k3 >= 0)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: p3o.p3o_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4)), jnp.zeros(2),
                              clip="joint"),
         r"logp must have shape \[B, 2, T\]"),
        (lambda: p3o.p3o_loss(jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 5)), jnp.ones((2, 2, 4)), jnp.zeros(2),
                              clip="joint"),
         r"equal shapes.*logp_old\(2, 2, 5\)"),
        (lambda: p3o.p3o_loss(jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 4)), jnp.ones((2, 2, 4)), jnp.zeros(3),
                              clip="joint"),
         r"delta must have shape \[B\]"),
        (lambda: p3o.p3o_loss(jnp.zeros((2, 2, 4)), jnp.zeros((2, 2, 4)), jnp.ones((2, 2, 4)), jnp.zeros(2),
                                 clip="both"),
         r"clip must be one of"),
        (lambda: p3o.p3o_loss_k(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4)),
                                jnp.zeros((2, 2)), clip="joint"),
         r"delta must have shape \[B, pairs\]"),
        (lambda: p3o.p3o_delta(jnp.zeros((4,)), jnp.zeros((4,)), BETA), r"rewards must have shape \[B, 2\]"),
        (lambda: ops.kl_per_token(jnp.zeros(3), jnp.zeros(3), "k4"), r"kind must be one of"),
        (lambda: ppo.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3))), r"equal shapes"),
        (lambda: ppo.gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3)), r"rewards must have shape \[B, T\]"),
        (lambda: ppo.token_rewards(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros(3), 0.1),
         r"scores must have shape \[B\]"),
        (lambda: dpo.dpo_loss(jnp.zeros(2), jnp.zeros(3), jnp.zeros(2), jnp.zeros(2)), r"equal shapes"),
        (lambda: reward_model.bradley_terry_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1))), r"r_chosen must have shape \[B\]"),
        (lambda: ops.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32)), r"logits must have shape"),
        (lambda: ops.sequence_logprob(jnp.zeros((2, 3)), jnp.ones((2, 4))), r"equal shapes"),
        (lambda: jax.jit(ops.whiten)(jnp.zeros((2, 3)), jnp.ones((3, 2))), r"equal shapes"),  # under jit too
    ],
)
def test_bad_shapes_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
