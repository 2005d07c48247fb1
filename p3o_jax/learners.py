"""One minibatch loss per algorithm, and the epoch/minibatch update that runs any of them
under a single jit (one `lax.scan` over E epochs x M shuffled minibatches).

Every loss is `loss(params, minibatch) -> (scalar, metrics)`:

- `sft_loss`:      next-token cross-entropy on the response tokens of [prompt | response].
- `reward_loss`:   Bradley-Terry on (chosen, rejected) sequences, reward read at the last token.
- `p3o_loss`:      P3O V1/V2 over all pairs of the K responses of each prompt.
- `ppo_loss`:      token-level PPO, clipped policy + clipped value loss of a separate critic.
- `dpo_loss`:      DPO on pairs ordered by reward (online: RM scores; offline: labels).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from p3o_jax import losses
from p3o_jax import model as M
from p3o_jax.config import RLConfig
from p3o_jax.rollout import flat, response_logprobs, response_reward, response_values


def sft_loss(params, batch, cfg: M.ModelConfig):
    """batch: input_ids, attention_mask, loss_mask [B, L] (loss_mask marks target tokens)."""
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    hidden, _ = M.forward(params, cfg, tokens[:, :-1], mask[:, :-1])
    logits = M.lm_logits(params, cfg, hidden)
    return losses.sft_loss(logits, tokens[:, 1:], batch["loss_mask"][:, 1:])


def _prompt_len(batch) -> int:
    """P of a batch of [P | N] sequences: tokens [B, K, P + N] and resp_mask [B, K, N]."""
    return batch["tokens"].shape[-1] - batch["resp_mask"].shape[-1]


def reward_loss(params, batch, cfg: M.ModelConfig):
    """batch: tokens, mask [B, 2, L], resp_mask [B, 2, N]; index 0 chosen, 1 rejected."""
    r = response_reward(params, cfg, batch["tokens"], batch["mask"], _prompt_len(batch))
    return losses.bradley_terry_loss(r[:, 0], r[:, 1])


def _policy_logp(params, cfg, batch, temperature):
    """[B, K, N] log-probs of the batch's responses, each prompt run once."""
    logp = response_logprobs(params, cfg, batch["tokens"], batch["mask"], _prompt_len(batch),
                             temperature)
    return logp * batch["resp_mask"]


def p3o_loss(params, batch, cfg: M.ModelConfig, rl: RLConfig):
    """batch: the rollout buffer (see rollout.py); rewards/seq_kl already carry any Delta scale."""
    logp = _policy_logp(params, cfg, batch, rl.temperature)
    return losses.p3o_loss_k(logp, batch["logp_old"], batch["resp_mask"], batch["rewards"],
                             batch["seq_kl"], rl.beta, clip=rl.clip, eps=rl.eps,
                             ratio_bound=rl.ratio_bound)


def dpo_loss(params, batch, cfg: M.ModelConfig, rl: RLConfig):
    """Pairs [B, 2] ordered by `rewards` (RM scores online, 1/0 labels offline)."""
    seq = lambda x: losses.sequence_logprob(x, batch["resp_mask"])
    logp = seq(_policy_logp(params, cfg, batch, rl.temperature))
    pol_c, pol_r = losses.order_pair_by_score(batch["rewards"], logp)
    ref_c, ref_r = losses.order_pair_by_score(batch["rewards"], seq(batch["logp_ref"]))
    return losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=rl.dpo_beta)


def ppo_advantages(buffer: dict, values_old, kl_coef, rl: RLConfig) -> dict:
    """Token rewards (KL penalty + RM score at the last token), GAE and returns, per response."""
    m = buffer["resp_mask"]
    rewards = jax.vmap(functools.partial(losses.ppo_token_rewards, beta=kl_coef), in_axes=1,
                       out_axes=1)(buffer["logp_old"], buffer["logp_ref"], m, buffer["rewards"])
    adv, ret = jax.vmap(functools.partial(losses.gae, gamma=rl.gamma, lam=rl.lam), in_axes=1,
                        out_axes=1)(rewards, values_old, m)
    return dict(buffer, values_old=values_old, advantages=losses.whiten(adv, m), returns=ret)


def ppo_loss(params, batch, cfg: M.ModelConfig, critic_cfg: M.ModelConfig, rl: RLConfig):
    """params: {"policy", "critic"}; batch: buffer plus values_old, advantages, returns."""
    m = flat(batch["resp_mask"])
    logp = flat(_policy_logp(params["policy"], cfg, batch, rl.temperature))
    pl, pm = losses.ppo_policy_loss(logp, flat(batch["logp_old"]), flat(batch["advantages"]), m,
                                    rl.eps)
    values = flat(response_values(params["critic"], critic_cfg, batch["tokens"], batch["mask"],
                                  _prompt_len(batch)))
    vl, vm = losses.ppo_value_loss(values, flat(batch["values_old"]), flat(batch["returns"]), m,
                                   rl.value_clip)
    metrics = {**{f"policy_{k}": v for k, v in pm.items()}, **{f"value_{k}": v for k, v in vm.items()}}
    return pl + rl.vf_coef * vl, metrics


def gradient_step(minibatch_loss):
    """step(state, batch) -> (state, metrics): one optimizer step on `minibatch_loss`."""
    def step(state, batch):
        (loss, metrics), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(
            state.params, batch)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return state.apply_gradients(grads), metrics
    return step


def make_update(minibatch_loss, epochs: int, minibatches: int, seed: int = 0):
    """update(state, buffer) -> (state, metrics): E epochs x M shuffled minibatches, one scan.

    Shuffles are drawn from `fold_in(seed, state.step)`, so the update is a pure function of
    (state, buffer) and a resumed run repeats it exactly. Metrics are averaged over the steps.
    """
    step = gradient_step(minibatch_loss)

    def update(state, buffer):
        B = jax.tree.leaves(buffer)[0].shape[0]
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        perms = jnp.stack([jax.random.permutation(k, B) for k in jax.random.split(key, epochs)])
        perms = perms.reshape(epochs * minibatches, B // minibatches)
        state, metrics = jax.lax.scan(
            lambda s, idx: step(s, jax.tree.map(lambda x: x[idx], buffer)), state, perms)
        return state, jax.tree.map(jnp.mean, metrics)
    return update
