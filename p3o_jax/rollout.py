"""Rollout buffers: the K sampled responses of each prompt, scored.

Every forward here runs each prompt through the trunk once (`prompt_once_hidden`): its keys and
values are repeated over its K responses, which then attend to them as a decode step attends
to the KV cache. On [P | N] sequences that saves (K - 1) P of every K (P + N) token positions,
in scoring and in the update's forward and backward alike (gradients through the shared
prompt sum over its responses). The results equal the full forward on each row up to float
rounding (tests/test_rollout.py).

`logp_old` is the sampler's own log-prob of each token at the sampling temperature, without
top-k/top-p truncation (`SampleOutput.raw_logprobs`): the same numbers the training forward
gives at theta_old, up to the rounding of the cached decode, so recomputing them is optional
(`recompute_old=True`; worth it with bfloat16 compute, where the two paths round apart).

Buffer layout (`Rollout`; B prompts, K responses each, P prompt length, N response length,
L = P + N):

    tokens, mask        int32   [B, K, L]   left-padded prompt | right-padded response
    resp_mask           int32   [B, K, N]   1 on generated tokens (EOS included)
    logp_old, logp_ref  float32 [B, K, N]   per-token log-probs under pi_old / pi_ref (0 on pads)
    logp_behav          float32 [B, K, N]   the sampler's, when logp_old was recomputed (or None)
    entropy             float32 [B, K, N]   policy entropy at each response position
    rewards             float32 [B, K]      the reward: w_rm x the reward model's score at the
                                            last real token + the reward functions' sum
    rm_scores           float32 [B, K]      the reward model's score alone (None without one)
    seq_kl              float32 [B, K]      sum_t mask * (logp_old - logp_ref)   (k1)
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from p3o_jax import ops
from p3o_jax import model as M
from p3o_jax.packing import (Packing, SequencePacking, packed_logits, prompt_forward,
                             sequence_hidden)
from p3o_jax.sampler import concat_prompt_response


def flat(x):
    """[B, K, ...] -> [B*K, ...]."""
    return x.reshape(-1, *x.shape[2:])


def prompt_once_hidden(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int,
                       packing: Packing | SequencePacking | None = None):
    """Trunk states from each prompt's last token on: [B, K, L] -> [B, K, N + 1, D].

    tokens, mask: [B, K, L] whose K rows share the first `prompt_len` entries (one prompt,
    K responses). Index 0 is the prompt's last token (it predicts response token 0), index
    j + 1 is response token j. `packing`: the prompts packed (`packing.pack_prompts`), so that
    their pass runs on real tokens only; or prompts and responses packed
    (`packing.pack_sequences`), so that the whole pass does.
    """
    if isinstance(packing, SequencePacking):
        return sequence_hidden(params, cfg, tokens, packing)
    B, K, L = tokens.shape
    P, N = prompt_len, L - prompt_len
    prompt, prompt_mask = tokens[:, 0, :P], mask[:, 0, :P]
    h_prompt, cache = prompt_forward(params, cfg, prompt, prompt_mask, packing)
    repeat = lambda x: jnp.repeat(x, K, axis=0)
    # each response's keys and values go to slots P .. L - 1 of its copy of the prompt's cache
    cache = jax.tree.map(lambda c: repeat(jnp.pad(c, ((0, 0), (0, 0), (0, N), (0, 0)))), cache)
    resp_mask = flat(mask[:, :, P:])
    positions = repeat(prompt_mask.sum(-1))[:, None] + M.positions_from_mask(resp_mask)
    h_resp, _ = M.forward(params, cfg, flat(tokens[:, :, P:]), flat(mask), cache, P,
                          positions=positions)
    hidden = jnp.concatenate([repeat(h_prompt[:, None]), h_resp], 1)
    return hidden.reshape(B, K, N + 1, hidden.shape[-1])


def response_logprobs(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int,
                      temperature: float = 1.0, with_entropy: bool = False,
                      packing: Packing | SequencePacking | None = None):
    """Per-token log-probs of the responses of [B, K, L] sequences: [B, K, N] (and entropy).

    The LM head runs on the N response positions only (with packed trees, on the real ones
    only; pads then hold another position's values, which every caller masks); log-probs are
    gathered logits minus logsumexp, never a full log-softmax.
    """
    if isinstance(packing, SequencePacking):
        logits, targets = packed_logits(params, cfg, tokens, packing)          # [R, Hc, ...]
        at = lambda x: x.reshape(-1)[packing.head_of]                          # -> [B, K, N]
        logp = at(ops.token_logprobs(logits, targets, temperature))
        if with_entropy:
            return logp, at(ops.entropy_from_logits(logits, temperature))
        return logp
    hidden = prompt_once_hidden(params, cfg, tokens, mask, prompt_len, packing)[:, :, :-1]
    logits = M.lm_logits(params, cfg, flat(hidden)).reshape(*hidden.shape[:3], -1)
    logp = ops.token_logprobs(logits, tokens[..., prompt_len:], temperature)
    if with_entropy:
        return logp, ops.entropy_from_logits(logits, temperature)
    return logp


def response_reward(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int,
                    packing: Packing | SequencePacking | None = None):
    """Reward-model score of each [B, K, L] sequence at its last real token: [B, K]."""
    hidden = prompt_once_hidden(params, cfg, tokens, mask, prompt_len, packing)
    B, K = tokens.shape[:2]
    last = jnp.concatenate([jnp.ones((B, K, 1), mask.dtype), mask[..., prompt_len:]], -1)
    scores = M.reward_scores(params, cfg, hidden)                               # [B, K, N + 1]
    return M.reward_at_last_token(flat(scores), flat(last)).reshape(B, K)


def response_values(params, cfg: M.ModelConfig, tokens, mask, prompt_len: int,
                    packing: Packing | SequencePacking | None = None):
    """Value of the state before each response token: [B, K, L] -> [B, K, N]."""
    return M.value_scores(params, cfg, prompt_once_hidden(params, cfg, tokens, mask,
                                                          prompt_len, packing)[:, :, :-1])


def policy_logprobs(params, cfg: M.ModelConfig, batch: "Rollout", temperature: float):
    """[B, K, N] log-probs of the batch's responses under `params` (0 on pads), each prompt run
    once: what every RL loss differentiates."""
    logp = response_logprobs(params, cfg, batch.tokens, batch.mask, batch.prompt_len,
                             temperature, packing=batch.packing)
    return logp * batch.resp_mask


@flax.struct.dataclass
class Rollout:
    """The rollout buffer (module docstring): what sampling and scoring produce and an
    algorithm's `prepare` completes. Fields an algorithm does not use stay None."""
    tokens: jax.Array                       # int32 [B, K, L]
    mask: jax.Array                         # int32 [B, K, L]
    resp_mask: jax.Array                    # int32 [B, K, N]
    logp_ref: jax.Array                     # float32 [B, K, N]
    rewards: jax.Array                      # float32 [B, K]
    logp_old: jax.Array | None = None       # float32 [B, K, N]   (None: offline data)
    seq_kl: jax.Array | None = None         # float32 [B, K]
    entropy: jax.Array | None = None        # float32 [B, K, N]   (dropped before the update)
    advantages: jax.Array | None = None     # the algorithm's: P3O's Delta [B, pairs], PPO's
                                            # GAE [B, K, N]
    values_old: jax.Array | None = None     # PPO: the critic's values at rollout [B, K, N]
    returns: jax.Array | None = None        # PPO: GAE returns [B, K, N]
    packing: Packing | SequencePacking | None = None  # the prompts (or the sequences) packed
                                            # (set per minibatch by the update:
                                            # `train_state.MinibatchPlan`)
    rm_scores: jax.Array | None = None      # float32 [B, K] (dropped before the update)
    logp_behav: jax.Array | None = None     # float32 [B, K, N]: the sampler's log-probs, when
                                            # logp_old (pi_prox) was recomputed; None: they
                                            # are logp_old (p3o_jax/importance.py)

    @property
    def prompt_len(self) -> int:
        """P of the [P | N] sequences (static: shapes are known at trace time)."""
        return self.tokens.shape[-1] - self.resp_mask.shape[-1]


def after_previous_model(params, previous):
    """`params`, readable once `previous` (the previous model's results) exists, in TPU and GPU
    programs (`model.fetched_after`): scoring runs up to three models, and each one's prompt
    pass keeps every layer's keys and values until its response pass. Untied, XLA ran all the
    prompt passes first and held their caches at once (Pythia-1B scoring on 8 x H100:
    temporaries 3.13 -> 0.93 GiB; bench/NOTES.md). CPU programs keep their schedule."""
    return params if M.on_cpu() else M.fetched_after(params, previous)


def score(policy, ref, reward_model, policy_cfg: M.ModelConfig, rm_cfg: M.ModelConfig,
          prompts, prompt_mask, samples, temperature: float,
          recompute_old: bool = False, rm_scores=None,
          packing: Packing | SequencePacking | None = None, rewards=None,
          rm_weight: float = 1.0) -> Rollout:
    """The buffer from prompts [B, P] and `sample_responses` output [B, K, N]: reference log-probs
    (and the policy's, if `recompute_old`: pi_prox's, the sampler's kept as `logp_behav`),
    sequence KL (k1) and the reward, `rm_weight` times
    the reward model's scores plus `rewards` [B, K] (the reward functions', computed on the
    host). The reward model scores here unless `reward_model` is None or its scores
    `rm_scores` [B, K] were computed elsewhere (a reward model with another tokenizer,
    `retokenize.RetokenizedReward`). `packing`: the prompts packed."""
    P = prompts.shape[-1]
    tokens, mask = concat_prompt_response(prompts, prompt_mask, samples.tokens, samples.mask)
    resp_mask = samples.mask.astype(jnp.int32)
    logp_behav = None
    if recompute_old:
        logp_old, entropy = response_logprobs(policy, policy_cfg, tokens, mask, P, temperature,
                                              True, packing)
        logp_behav = samples.raw_logprobs * resp_mask
    else:
        logp_old, entropy = samples.raw_logprobs, samples.entropy
    logp_ref = response_logprobs(after_previous_model(ref, logp_old), policy_cfg, tokens, mask,
                                 P, temperature, packing=packing)
    if rm_scores is None and reward_model is not None:
        rm_scores = response_reward(after_previous_model(reward_model, logp_ref), rm_cfg, tokens,
                                    mask, P, packing)
    if rm_scores is None and rewards is None:
        raise ValueError("no reward: give a reward model, its scores or the functions' rewards")
    total = (0.0 if rm_scores is None else rm_weight * rm_scores) + (
        0.0 if rewards is None else rewards)
    logp_old, logp_ref, entropy = (x * resp_mask for x in (logp_old, logp_ref, entropy))
    return Rollout(tokens=tokens, mask=mask, resp_mask=resp_mask, logp_old=logp_old,
                   logp_ref=logp_ref, entropy=entropy,
                   seq_kl=ops.kl_per_sequence(logp_old, logp_ref, resp_mask, "k1"),
                   rewards=jnp.asarray(total, jnp.float32), rm_scores=rm_scores,
                   logp_behav=logp_behav)


def weighed(fn_rewards: dict, weights: dict):
    """sum_f w_f r_f of the reward functions' [B, K] rewards (`weights`: {name: w_f}; other
    entries of `fn_rewards`, a function's extra metrics, are not rewards), NaN (no opinion)
    counting 0."""
    return sum(w * jnp.nan_to_num(fn_rewards[name]) for name, w in weights.items())


def truncated(tokens, mask, eos_ids: tuple[int, ...]):
    """Whether each response [..., N] was cut at N tokens: its last position is real and holds
    none of the tokens that end a response (`eos_ids`, `Task.eos_ids`). bool [...], numpy or
    jax as given."""
    last = tokens[..., -1]
    stopped = last != last      # all False, of last's kind
    for s in eos_ids:
        stopped = stopped | (last == s)
    return (mask[..., -1] > 0) & ~stopped


def drop_truncated(buffer: Rollout, cut) -> Rollout:
    """The buffer with the responses `cut` [B, K] (`truncated`) out of the loss
    (`rl.mask_truncated`, TRL's mask_truncated_completions): their response mask zeroed, after
    the rewards, baselines and advantages that they took part in. Every loss averages over the
    responses (P3O: the pairs) that have tokens, so the update is that of the batch without
    them; Dr. GRPO's constant normaliser stays constant."""
    return buffer.replace(resp_mask=buffer.resp_mask * ~cut[..., None])


def rollout_metrics(buffer: Rollout) -> dict:
    """Scalars every RL algorithm logs per iteration: the reward (and the reward model's score
    alone, `rm_reward`), KL, entropy, length."""
    m = buffer.resp_mask
    kl3 = ops.kl_per_sequence(buffer.logp_old, buffer.logp_ref, m, "k3")
    metrics = {} if buffer.rm_scores is None else {"rm_reward": jnp.mean(buffer.rm_scores)}
    return metrics | {
        "reward": jnp.mean(buffer.rewards),
        "kl_k1": jnp.mean(buffer.seq_kl),
        "kl_k3": jnp.mean(kl3),
        "entropy": ops.masked_mean(buffer.entropy, m),
        "response_length": jnp.mean(jnp.sum(m, -1)),
    }
