"""One RL iteration, the same for every online algorithm: sample -> score -> prepare -> update.

    samples = sample_pairs(policy, prompts)             K responses per prompt, KV-cache decode
    buffer  = score(policy, ref, reward model, ...)     rollout.Rollout: log-probs, KL, rewards
    buffer  = algo.prepare(buffer, params, cfg, carry)  P3O's Delta, PPO's GAE, ...
    state   = update(state, buffer)                     E epochs x M minibatches of algo.loss

Three compiled programs (sampling; scoring and preparing; the update under `jit_step` with the
state donated). The training loop (p3o_jax/pipeline.py) and the benchmark (p3o_jax/cli/bench.py)
both run `RLIteration`; evaluation samples and scores with the same two functions.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from p3o_jax import rollout
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checkpoint import skip_nonfinite
from p3o_jax.sampler import SamplingConfig, sample_pairs
from p3o_jax.train_state import (TrainState, create_state, jit_step, make_optimizer,
                                 make_update, state_shardings)


def prompt_offset(prompts, prompt_mask):
    """delta(x): a fixed N(0, 1) draw per prompt [B, P] -> [B], keyed by a hash of its tokens
    (weights per position counted from the right, so left padding does not change it)."""
    weights = jax.random.bits(jax.random.key(0), prompts.shape[-1:], jnp.uint32)
    h = jnp.sum(prompts.astype(jnp.uint32) * prompt_mask.astype(jnp.uint32) * weights, -1)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.key(1), k)))(h)


def trained_models(cfg) -> dict:
    """The model configs of what RL trains: `{"policy"}`, plus `{"critic"}` for PPO."""
    models = {"policy": cfg.policy}
    if ALGORITHMS[cfg.algo].critic:
        models["critic"] = cfg.rm_model
    return models


def initial_params(cfg, sft_params, rm_params) -> dict:
    """Copies (the update donates them) of the SFT policy and, for a critic, the reward model
    with its reward head as the value head."""
    params = {"policy": sft_params}
    if ALGORITHMS[cfg.algo].critic:
        params["critic"] = dict(rm_params, value_head=rm_params["reward_head"])
    return jax.tree.map(jnp.copy, params)


def rl_optimizer(cfg, total_updates: int | None = None):
    """RL's optimizer over `total_updates` steps (default: every update of the online loop)."""
    rl = cfg.rl
    return make_optimizer(rl.optim, total_updates or rl.iterations * rl.epochs * rl.minibatches)


class RLIteration:
    """The programs of one iteration of `cfg.algo` (cfg: a resolved ExperimentConfig) on
    `mesh`; `init_state` builds the sharded train state they update."""

    def __init__(self, cfg, mesh, sampling: SamplingConfig, tx=None, reward_fn=None):
        """`reward_fn(prompts, samples) -> [B, K]` scores on the host's side (a reward model
        with another tokenizer); None: the reward model scores inside `score`."""
        self.cfg, self.mesh, self.sampling, self.reward_fn = cfg, mesh, sampling, reward_fn
        self.algo = ALGORITHMS[cfg.algo]
        self.tx = tx or rl_optimizer(cfg)
        self.shardings = state_shardings(trained_models(cfg), self.tx, mesh)
        loss = functools.partial(self.algo.loss, cfg=cfg)
        self._update = skip_nonfinite(make_update(loss, cfg.rl.epochs, cfg.rl.minibatches,
                                                  cfg.seed))
        self.update = None        # the compiled update (`apply`)

    def init_state(self, params) -> TrainState:
        return create_state(params, self.tx, self.shardings)

    def sample(self, params, prompts: dict, key):
        """K responses per prompt from the policy: `SampleOutput` [B, K, N]."""
        return sample_pairs(params["policy"], self.cfg.policy, self.sampling, prompts["ids"],
                            prompts["mask"], key, n=self.cfg.rl.n_samples)

    @functools.partial(jax.jit, static_argnums=0)
    def score(self, params, ref, reward_model, prompts: dict, samples, carry: dict,
              rewards=None):
        """The prepared buffer and the rollout's metrics (every model is an argument: a jit
        may not close over arrays of other processes)."""
        cfg = self.cfg
        buffer = rollout.score(params["policy"], ref, reward_model, cfg.policy, cfg.rm_model,
                               prompts["ids"], prompts["mask"], samples, cfg.rl.temperature,
                               cfg.recompute_old, rewards)
        if cfg.rl.reward_offset:      # the same delta(x) for every response of a prompt
            offset = cfg.rl.reward_offset * prompt_offset(prompts["ids"], prompts["mask"])
            buffer = buffer.replace(rewards=buffer.rewards + offset[:, None])
        buffer = self.algo.prepare(buffer, params, cfg, carry)
        return buffer, rollout.rollout_metrics(buffer)

    def apply(self, state: TrainState, buffer):
        """The update (E epochs x M minibatches of the algorithm's loss) on a prepared buffer,
        compiled by `jit_step` on first use, when the buffer gives the shapes."""
        if self.update is None:
            self.update = jit_step(self._update, self.shardings, buffer, self.mesh)
        return self.update(state, buffer)

    def __call__(self, state: TrainState, carry: dict, ref, reward_model, prompts: dict, key):
        """One iteration: (state, samples, metrics); metrics include the wall time of each
        program (`time_generate`, `time_score`, `time_update`), each synchronised."""
        t0 = time.perf_counter()
        samples = jax.block_until_ready(self.sample(state.params, prompts, key))
        t1 = time.perf_counter()
        rewards = self.reward_fn(prompts, samples) if self.reward_fn else None
        t_rewards = time.perf_counter() - t1      # retokenising for another tokenizer's RM
        buffer, metrics = self.score(state.params, ref, reward_model, prompts, samples, carry,
                                     rewards)
        buffer = jax.block_until_ready(buffer.replace(entropy=None))
        t2 = time.perf_counter()
        if self.reward_fn:
            metrics = dict(metrics, time_retokenized_reward=t_rewards)
        state, update_metrics = jax.block_until_ready(self.apply(state, buffer))
        t3 = time.perf_counter()
        return state, samples, {**metrics, **update_metrics, **carry, "time_generate": t1 - t0,
                                "time_score": t2 - t1, "time_update": t3 - t2}
