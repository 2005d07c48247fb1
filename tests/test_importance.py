"""Off-policy corrections (p3o_jax/importance.py, P3O's in algos/p3o.py): the weights' values,
the gradients they give against hand-derived forms, and the exact enumeration that shows the
sequence weights make P3O's expected gradient from stale pairs the on-policy one.

Tabular policies as in tests/test_algos.py: theta [B, K, T, V] holds every position's logits,
so d log pi(y_t) / d theta_t = onehot(y_t) - softmax(theta_t). float64 where exactness matters.
"""
import itertools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from p3o_jax import importance, ops
from p3o_jax.algos import grpo, p3o, rloo
from p3o_jax.train_state import MinibatchPlan, make_update
from tests.test_algos import BETA, CLIP_MODES, float64, make_rollout, np_softmax, policy_logps


def settings(mode, cap=2.0):
    return types.SimpleNamespace(rollout_is=mode, rollout_is_cap=cap)


def off_policy(seed=3, k=3):
    """A rollout whose sampler ran theta_behav, updated from theta_old (= pi_prox): the buffer
    the loss sees, and d log pi / d theta at theta_old [B, K, T, V]."""
    ro = make_rollout(seed, k=k)
    theta_behav = ro.theta_old + 0.4 * np.random.default_rng(seed + 10).normal(
        size=ro.theta_old.shape)
    batch = types.SimpleNamespace(
        logp_old=np.asarray(policy_logps(ro.theta_old, ro.tokens)) * ro.mask,
        logp_behav=np.asarray(policy_logps(theta_behav, ro.tokens)) * ro.mask,
        resp_mask=ro.mask)
    vocab = ro.theta_old.shape[-1]
    dlogpi = ro.mask[..., None] * (np.eye(vocab)[ro.tokens] - np_softmax(ro.theta_old))
    return ro, batch, dlogpi


def np_weights(batch, mode, cap):
    """The module docstring's weights, in numpy: token [B, K, T] and sequence [B, K]."""
    lr = (batch.logp_old - batch.logp_behav) * batch.resp_mask
    return np.minimum(np.exp(lr), cap), np.minimum(np.exp(lr.sum(-1)), cap), np.exp(lr.sum(-1))


class WeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @float64
    def test_weighted_logprobs_keep_the_value_and_scale_the_gradient(self):
        rng = np.random.default_rng(0)
        logp, w, g = (rng.normal(size=(3, 4)) for _ in range(3))
        value, grad = self.variant(jax.value_and_grad(
            lambda x: jnp.sum(g * importance.weighted_logprobs(x, w))))(logp)
        np.testing.assert_allclose(value, np.sum(g * logp), rtol=1e-12)
        np.testing.assert_allclose(grad, g * w, rtol=1e-12)

    @float64
    def test_token_and_sequence_weights(self):
        _, batch, _ = off_policy()
        for cap in (2.0, 1e9):
            token, sequence, raw = np_weights(batch, "token", cap)
            np.testing.assert_allclose(importance.token_weights(
                batch.logp_old, batch.logp_behav, batch.resp_mask, "token", cap),
                np.where(batch.resp_mask > 0, token, 1.0), rtol=1e-12)
            np.testing.assert_allclose(importance.token_weights(
                batch.logp_old, batch.logp_behav, batch.resp_mask, "sequence", cap),
                np.where(batch.resp_mask > 0, sequence[..., None], 1.0), rtol=1e-12)
            metrics = importance.weight_metrics(batch.logp_old, batch.logp_behav,
                                                batch.resp_mask, "sequence", cap)
            np.testing.assert_allclose(metrics["is_weight_mean"], sequence.mean(), rtol=1e-12)
            np.testing.assert_allclose(metrics["is_capped_frac"], np.mean(raw > cap))
        self.assertTrue(0 < np.mean(raw > 2.0) < 1)         # the cap acts on some responses
        np.testing.assert_array_equal(importance.token_weights(
            batch.logp_old, batch.logp_behav, batch.resp_mask, "none", 2.0), 1.0)
        on_policy = importance.weight_metrics(batch.logp_old, batch.logp_old, batch.resp_mask,
                                              "token", 2.0)
        self.assertEqual(tuple(map(float, on_policy.values())), (1.0, 1.0, 0.0))


class GradientTest(chex.TestCase):
    """At theta = theta_old every ratio to pi_prox is 1 and no clip acts: the gradient is the
    weighted policy gradient, written out by hand."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(clip=CLIP_MODES, mode=("token", "sequence"))
    @float64
    def test_p3o_gradient_at_the_proximal_policy(self, clip, mode):
        ro, batch, dlogpi = off_policy()
        delta = p3o.pairwise_delta(ro.rewards, ro.seq_kl, BETA)

        def objective(theta):
            logp, weights = p3o.corrected(policy_logps(theta, ro.tokens), batch, settings(mode))
            return p3o.p3o_loss_k(logp, batch.logp_old, ro.mask, delta, weights, clip=clip)[0]

        grad = self.variant(jax.grad(objective))(ro.theta_old)
        token, _, raw = np_weights(batch, mode, 2.0)
        k = ro.rewards.shape[1]
        pairs = list(itertools.combinations(range(k), 2))
        expected = np.zeros_like(ro.theta_old)
        for b in range(ro.rewards.shape[0]):
            for p, (i, j) in enumerate(pairs):
                if mode == "token":         # each token's gradient times its own weight
                    gi, gj, w = token[b, i, :, None] * dlogpi[b, i], \
                        token[b, j, :, None] * dlogpi[b, j], 1.0
                else:                       # the pair's: min(w~_i w~_j, C)
                    gi, gj, w = dlogpi[b, i], dlogpi[b, j], min(raw[b, i] * raw[b, j], 2.0)
                expected[b, i] += -w * delta[b, p] * gi / 2
                expected[b, j] += +w * delta[b, p] * gj / 2
        expected /= ro.rewards.shape[0] * len(pairs)
        np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-13)
        # teeth: the on-policy gradient (no weights) is another one
        plain = jax.grad(lambda t: p3o.p3o_loss_k(policy_logps(t, ro.tokens), batch.logp_old,
                                                  ro.mask, delta, clip=clip)[0])(ro.theta_old)
        self.assertGreater(float(jnp.abs(plain - grad).max()), 1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("token", "sequence")
    @float64
    def test_grpo_and_rloo_gradients_at_the_proximal_policy(self, mode):
        ro, batch, dlogpi = off_policy(k=2)
        B, K, T = ro.mask.shape
        token, sequence, _ = np_weights(batch, mode, 2.0)
        weights = token if mode == "token" else np.broadcast_to(sequence[..., None], token.shape)
        advantages = rloo.leave_one_out_advantages(ro.rewards)

        def grpo_objective(theta):
            logp = importance.corrected_logprobs(policy_logps(theta, ro.tokens), batch,
                                                 settings(mode))
            return grpo.grpo_loss(logp, batch.logp_old, batch.logp_old, ro.mask, advantages,
                                  aggregation="constant")[0]

        def rloo_objective(theta):
            logp = importance.corrected_logprobs(policy_logps(theta, ro.tokens), batch,
                                                 settings(mode))
            return rloo.rloo_loss(logp, batch.logp_old, ro.mask, advantages)[0]

        # Dr. GRPO: -1/(B K N) sum A_i w_t dlogpi_t; RLOO: -1/(B K) sum_i A_i sum_t w_t dlogpi_t
        hand = -np.asarray(advantages)[..., None, None] * weights[..., None] * dlogpi
        np.testing.assert_allclose(self.variant(jax.grad(grpo_objective))(ro.theta_old),
                                   hand / (B * K * T), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(self.variant(jax.grad(rloo_objective))(ro.theta_old),
                                   hand / (B * K), rtol=1e-10, atol=1e-13)

    @float64
    def test_no_behaviour_policy_means_no_correction(self):
        ro, batch, _ = off_policy()
        logp = policy_logps(ro.theta, ro.tokens)
        on_policy = types.SimpleNamespace(**{**vars(batch), "logp_behav": None})
        for mode in importance.MODES:
            self.assertIs(importance.corrected_logprobs(logp, on_policy, settings(mode)), logp)
            self.assertIs(p3o.corrected(logp, on_policy, settings(mode))[1], None)
        self.assertIs(importance.corrected_logprobs(logp, batch, settings("none")), logp)


class UnbiasedTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.parameters(*CLIP_MODES)
    @float64
    def test_stale_pairs_with_sequence_weights_give_the_policy_gradient(self, clip):
        """A bandit of 4 actions (a response is one action). Pairs drawn from a stale
        pi_behav, the update starting from pi_prox, the policy now at theta: enumerating every
        ordered pair, each with its probability under pi_behav x pi_behav, the P3O loss with
        uncapped pair weights (and its clips out of the way) has minus the gradient of
        E_{y ~ pi_theta}[r(y)], exactly; without the weights it does not."""
        rng = np.random.default_rng(4)
        n = 4
        theta_behav, reward = rng.normal(size=n), rng.normal(size=n)
        theta_prox = theta_behav + rng.normal(size=n)
        theta = theta_prox + 0.5 * rng.normal(size=n)
        pi, pi_behav = np_softmax(theta), np_softmax(theta_behav)
        vanilla = pi * (reward - pi @ reward)        # grad_theta E_{y~pi}[r(y)]

        actions = np.array(list(itertools.product(range(n), repeat=2)))     # [16, 2]
        logp = lambda t: jax.nn.log_softmax(t)[actions][..., None]          # [16, 2, T=1]
        mask = np.ones((len(actions), 2, 1))
        # Delta = r1 - r2 times the pair's probability under the sampler (the loss is a mean)
        delta = (reward[actions[:, 0]] - reward[actions[:, 1]]) * pi_behav[actions].prod(-1)
        delta = delta * len(actions)
        batch = types.SimpleNamespace(logp_old=logp(theta_prox), logp_behav=logp(theta_behav),
                                      resp_mask=mask)

        def neg_grad(mode):
            def loss(t):
                weighted, weights = p3o.corrected(logp(t), batch, settings(mode, cap=1e9))
                return p3o.p3o_loss_k(weighted, batch.logp_old, mask, delta[:, None], weights,
                                      clip=clip, eps=1e6, ratio_bound=1e6)[0]
            return -self.variant(jax.grad(loss))(theta)

        np.testing.assert_allclose(neg_grad("sequence"), vanilla, rtol=1e-10, atol=1e-13)
        self.assertFalse(np.allclose(neg_grad("none"), vanilla, rtol=1e-2))


def test_update_reports_named_metrics_from_its_first_step():
    def step(state, minibatch):
        return state + 1, {"logp_gap_mean": state * 1.0, "loss": state * 1.0}
    update = make_update(step, first_step_metrics=("logp_gap_mean",))
    plan = MinibatchPlan(index=jnp.zeros((4, 1), jnp.int32))
    state, metrics = jax.jit(update)(jnp.asarray(10), (jnp.zeros(1), plan))
    assert int(state) == 14
    assert float(metrics["logp_gap_mean"]) == 10.0 and float(metrics["loss"]) == 11.5
