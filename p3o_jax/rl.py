"""One RL iteration, the same for every online algorithm: sample -> score -> prepare -> update.

    samples = sample(policy, prompts)                       K responses per prompt, KV-cache decode
    buffer  = score(policy, ref, reward model, ...)     rollout.Rollout: log-probs, KL, rewards
    buffer  = algo.prepare(buffer, params, cfg, carry)  P3O's Delta, PPO's GAE, ...
    state   = update(state, buffer, frozen)             E epochs x M minibatches of algo.loss

Three compiled programs (sampling; scoring and preparing; the update under `jit_step` with the
state donated). With `rl.pack_prompts` every prompt pass in them runs on the prompts packed
back to back (p3o_jax/packing.py): the host packs each iteration's prompts, and each
minibatch's, which it draws itself (`train_state.minibatch_index`). The state trains the whole
policy, or LoRA adapters (`rl.lora`), or its top layers (`rl.train_top_layers`):
`split_policy`; the frozen rest (the SFT policy's arrays, also the reference's) is a separate
argument, joined to the state's params inside each program. The training loop
(p3o_jax/pipeline.py) and the benchmark (p3o_jax/cli/bench.py)
both run `RLIteration`; evaluation samples and scores with the same two functions.

Two sides: the rollout side (`generate`: sampling, on the sampler's own devices with
`rl.rollout_devices`) and the learner side (`learn`: the host's rewards, score, prepare,
update). With `rl.max_staleness` = s the training loop runs the rollout side up to s updates
ahead; the learner then takes the proximal policy's log-probs as pi_old and weighs the
gradient by pi_prox / pi_behav (p3o_jax/importance.py). `LoopState` is what the loop carries
and checkpoints: the train state and the batches in flight.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import importance, lora, rollout, top_layers
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checkpoint import skip_nonfinite
from p3o_jax.packing import (pack_minibatches, pack_prompts, pack_sequence_minibatches,
                             pack_sequences, packed_rows)
from p3o_jax.engine import sample
from p3o_jax.sampler import SampleOutput, SamplingConfig
from p3o_jax.sharding import batch_sharding, moved_to, replicated
from p3o_jax.train_state import (MinibatchPlan, TrainState, create_state, gradient_step,
                                 jit_step, make_optimizer, make_update, minibatch_index,
                                 param_shardings, state_shardings)


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


def split_policy(cfg, policy) -> tuple[dict, dict | None]:
    """(trained, frozen) parts of the policy params RL starts from (or of their abstract or
    boxed shapes), by what `cfg.rl` trains: the whole policy and None; fresh LoRA adapters
    (`rl.lora.rank`, p3o_jax/lora.py) and the policy as their base; or the top blocks
    (`rl.train_top_layers`, p3o_jax/top_layers.py) and the trunk below. The frozen part shares
    the arrays of `policy`; adapters are drawn from `cfg.seed`."""
    rl = cfg.rl
    if rl.lora.rank:
        trained = lora.init(rl.lora, nn.unbox(policy), jax.random.key(cfg.seed))
    elif rl.train_top_layers:
        trained = top_layers.split(policy, rl.train_top_layers)[0]
    else:
        trained = policy
    return trained, frozen_policy(cfg, policy)


def frozen_policy(cfg, policy):
    """`split_policy`'s frozen part of `policy` (params, or any tree of their structure, such as
    their shardings); None when RL trains all of it."""
    if cfg.rl.lora.rank:
        return policy
    if cfg.rl.train_top_layers:
        return top_layers.split(policy, cfg.rl.train_top_layers)[1]
    return None


def join_policy(cfg, trained, frozen) -> dict:
    """The policy the model runs (sampling, scoring, the loss): `split_policy`'s inverse, with
    LoRA the base plus its (scaled) adapters."""
    if cfg.rl.lora.rank:
        return lora.join(cfg.rl.lora, trained, frozen)
    if cfg.rl.train_top_layers:
        return top_layers.join(trained, frozen)
    return trained


def final_policy(cfg, trained, frozen) -> dict:
    """Plain policy params (adapters merged into their weights) to save, export and evaluate."""
    return lora.merge(join_policy(cfg, trained, frozen))


def initial_params(cfg, sft_params, rm_params) -> dict:
    """What the RL state trains, copied (the update donates it): the SFT policy's trained part
    (`split_policy`) and, for a critic, the reward model with its reward head as the value
    head, or without a reward model (`rm_params` None: reward functions only) the SFT policy
    with a zero value head. The frozen part is `frozen_policy(cfg, sft_params)`, not copied."""
    params = {"policy": split_policy(cfg, sft_params)[0]}
    if ALGORITHMS[cfg.algo].critic:
        params["critic"] = (dict(rm_params, value_head=rm_params["reward_head"])
                            if rm_params is not None else
                            dict(sft_params, value_head=jax.tree.map(jnp.zeros_like,
                                                                     sft_params["value_head"])))
    return jax.tree.map(jnp.copy, params)


def rl_optimizer(cfg, total_updates: int | None = None):
    """RL's optimizer over `total_updates` steps (default: every update of the online loop);
    with LoRA adapters at `rl.lora.lr` (when set) instead of `rl.optim.lr`."""
    rl = cfg.rl
    optim = rl.optim
    if rl.lora.rank and rl.lora.lr is not None:
        optim = dataclasses.replace(optim, lr=rl.lora.lr)
    return make_optimizer(optim, total_updates or rl.iterations * rl.epochs * rl.minibatches)


class RLIteration:
    """The programs of one iteration of `cfg.algo` (cfg: a resolved ExperimentConfig) on
    `mesh`; `init_state` builds the sharded train state they update."""

    def __init__(self, cfg, mesh, sampling: SamplingConfig, tx=None, rm_fn=None,
                 fn_scorer=None, rm_weight: float = 1.0, rollout_mesh=None):
        """`rm_fn(prompts, samples) -> [B, K]`: the reward model's scores computed on the
        host's side (a reward model with another tokenizer); None: it scores inside `score`.
        `fn_scorer(prompts, samples) -> {name: [B, K]}` (`reward_calls.FunctionRewards`): the
        reward functions, weighed by its `weights` and added to `rm_weight` x the reward
        model's score (p3o_jax/reward_calls.py). A response that does not end with one of
        `sampling.eos_ids` was cut at its length (`rollout.truncated`, `rl.mask_truncated`).
        `rollout_mesh`: the sampler's own devices (`rl.rollout_devices`); None: `mesh`'s."""
        self.cfg, self.mesh, self.sampling = cfg, mesh, sampling
        self.rollout_mesh = rollout_mesh
        self.rm_fn, self.fn_scorer, self.rm_weight = rm_fn, fn_scorer, rm_weight
        self.algo = ALGORITHMS[cfg.algo]
        self.tx = tx or rl_optimizer(cfg)
        self.shardings = state_shardings(
            trained_models(cfg), self.tx, mesh,
            lambda p: dict(p, policy=split_policy(cfg, p["policy"])[0]))
        self.frozen_shardings = frozen_policy(cfg, param_shardings(cfg.policy, mesh))

        def loss(params, batch, frozen):
            return self.algo.loss(self.params(params, frozen), batch, cfg=cfg)
        # each minibatch step is skipped on its own: a guard around the whole scan would keep
        # the state it started from alive throughout, a second copy of params and moments
        self.update_steps = make_update(skip_nonfinite(gradient_step(loss)),
                                        importance.FIRST_STEP_METRICS)
        self.compiled_update = None     # `compile_update`'s program, made by `update`
        # packing needs every prompt on this host (one process); R rounds to `packed_rows`
        self.pack = cfg.rl.pack_prompts and jax.process_count() == 1
        self.pack_responses = cfg.rl.pack_responses and jax.process_count() == 1
        self.batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def init_state(self, params) -> TrainState:
        """The sharded train state of `params`, what RL trains (`initial_params`)."""
        return create_state(params, self.tx, self.shardings)

    def params(self, trained: dict, frozen) -> dict:
        """The models the programs run: the state's params with the policy joined to its
        frozen part (`join_policy`; `frozen` None: the state holds the whole policy)."""
        return dict(trained, policy=join_policy(self.cfg, trained["policy"], frozen))

    def packing(self, ids, mask, index=None):
        """The prompts ids, mask [B, P] packed (`packing.pack_prompts`), or with index
        [S, b] each minibatch's (`pack_minibatches`); None when packing is off."""
        if not self.pack:
            return None
        ids, mask = np.asarray(ids), np.asarray(mask)
        multiple = packed_rows(mask.shape[0] if index is None else index.shape[1],
                               self.batch_ways)
        if index is None:
            return pack_prompts(ids, mask, multiple)
        return pack_minibatches(ids, mask, np.asarray(index), multiple)

    def score_packing(self, prompt_ids, prompt_mask, resp_mask, index=None):
        """What scoring and the update run on: prompts ids, mask [B, P] and their responses
        (resp_mask [B, K, N]) packed as trees (`packing.pack_sequences`; with index [S, b],
        each minibatch's) under `rl.pack_responses`, else the prompts alone (`packing`)."""
        if not self.pack_responses:
            return self.packing(prompt_ids, prompt_mask, index)
        prompt_mask, resp_mask = np.asarray(prompt_mask), np.asarray(resp_mask)
        K = resp_mask.shape[1]
        # trees need between B and B K rows, and round up less coarsely than prompts: a step
        # of B K / 32 (W3: 37 rows -> 40, not 48)
        multiple = packed_rows(K * (prompt_mask.shape[0] if index is None else index.shape[1]),
                               self.batch_ways, steps=32)
        if index is None:
            return pack_sequences(prompt_mask, resp_mask, multiple)
        return pack_sequence_minibatches(prompt_mask, resp_mask, np.asarray(index), multiple)

    def sample(self, params, prompts: dict, key, packing=None, max_lengths=None):
        """K responses per prompt from the policy: `SampleOutput` [B, K, N] (`max_lengths`
        [B, K]: per-response limits, the benchmark's stand-in for EOS)."""
        return sample(params["policy"], self.cfg.policy, self.sampling, prompts["ids"],
                      prompts["mask"], key, n=self.cfg.rl.n_samples, max_lengths=max_lengths,
                      packing=packing)

    @functools.partial(jax.jit, static_argnums=0)
    def score(self, params, ref, reward_model, prompts: dict, samples, carry: dict,
              rm_scores=None, packing=None, fn_rewards=None):
        """The prepared buffer and the rollout's metrics (every model is an argument: a jit
        may not close over arrays of other processes). `rm_scores` [B, K]: the reward model's,
        computed on the host; `fn_rewards` {name: [B, K]}: the reward functions' (NaN: no
        opinion) and their extras, each logged as `reward/<name>`. With `rl.mask_truncated`
        the responses cut at `response_len` leave the loss (`rollout.drop_truncated`)."""
        cfg = self.cfg
        host = rollout.weighed(fn_rewards, self.fn_scorer.weights) if fn_rewards else None
        buffer = rollout.score(params["policy"], ref, reward_model, cfg.policy, cfg.rm_model,
                               prompts["ids"], prompts["mask"], samples, cfg.rl.temperature,
                               cfg.recompute_old, rm_scores, packing, host, self.rm_weight)
        if cfg.rl.reward_offset:      # the same delta(x) for every response of a prompt
            offset = cfg.rl.reward_offset * prompt_offset(prompts["ids"], prompts["mask"])
            buffer = buffer.replace(rewards=buffer.rewards + offset[:, None])
        buffer = self.algo.prepare(buffer, params, cfg, carry)
        metrics = rollout.rollout_metrics(buffer) | importance.weight_metrics(
            buffer.logp_old, buffer.logp_old if buffer.logp_behav is None else buffer.logp_behav,
            buffer.resp_mask, cfg.rl.rollout_is, cfg.rl.rollout_is_cap)
        for name, r in (fn_rewards or {}).items():
            metrics[f"reward/{name}"] = jnp.nanmean(r)
        cut = rollout.truncated(samples.tokens, samples.mask, self.sampling.eos_ids)
        metrics["truncated_frac"] = jnp.mean(cut)
        if cfg.rl.mask_truncated:
            buffer = rollout.drop_truncated(buffer, cut)
        return buffer, metrics

    def plan(self, state: TrainState, buffer) -> MinibatchPlan:
        """The update's minibatches of `buffer` (and their prompts packed), drawn from the
        seed and the optimizer's step."""
        rl = self.cfg.rl
        index = minibatch_index(self.cfg.seed, int(state.step), rl.epochs, rl.minibatches,
                                buffer.tokens.shape[0])
        P = buffer.prompt_len
        return MinibatchPlan(index, self.score_packing(buffer.tokens[:, 0, :P],
                                                       buffer.mask[:, 0, :P],
                                                       buffer.mask[:, :, P:], index))

    def update(self, state: TrainState, buffer, frozen=None):
        """The update (E epochs x M minibatches of the algorithm's loss) on a prepared buffer,
        compiled by `jit_step` on first use, when the buffer gives the shapes (again for
        another number of packed rows); `frozen`: the policy's frozen part (`split_policy`),
        an argument that is read, not donated."""
        plan = self.plan(state, buffer)
        if self.compiled_update is None:
            self.compiled_update = self.compile_update(buffer, plan)
        return self.compiled_update(state, (buffer, plan), frozen)

    def compile_update(self, buffer, plan: MinibatchPlan):
        """The jitted update `(state, (buffer, plan), frozen) -> (state, metrics)` (`jit_step`,
        state donated) for a buffer and plan of these shapes (arrays or ShapeDtypeStructs):
        buffer rows over the batch devices, the plan's index [E * M, B / M] replicated, its
        packed prompts [E * M, R, ...] split along R."""
        packed = lambda x: batch_sharding(self.mesh, x.ndim, axis=1)
        shardings = (jax.tree.map(lambda x: batch_sharding(self.mesh, x.ndim), buffer),
                     MinibatchPlan(replicated(self.mesh), jax.tree.map(packed, plan.packing)))
        return jit_step(self.update_steps, self.shardings, None, self.mesh, self.frozen_shardings,
                        batch_shardings=shardings)

    def generate(self, state: TrainState, prompts: dict, key, frozen=None, max_lengths=None):
        """The rollout side: K responses per prompt sampled with the state's weights
        (`sample`), dispatched and not waited for: the host goes on (with reward functions,
        under `rl.max_staleness`) while the device samples."""
        params = self.params(state.params, frozen)
        packing = self.packing(prompts["ids"], prompts["mask"])
        if self.rollout_mesh is None:
            return self.sample(params, prompts, key, packing, max_lengths)
        # on the sampler's own devices: the policy and prompts copied there device to device,
        # the samples back onto the training devices as a batch is placed (`no_samples`)
        with jax.set_mesh(self.rollout_mesh):
            samples = self.sample(moved_to({"policy": params["policy"]}, self.rollout_mesh),
                                  moved_to(prompts, self.rollout_mesh),
                                  moved_to(key, self.rollout_mesh), packing, max_lengths)
        return jax.device_put(samples, self.sample_shardings)

    def host_rewards(self, prompts: dict, samples, trainer_state=None) -> tuple[dict, dict]:
        """The rewards computed on the host, once `samples` exist: ({"rm_scores": [B, K] of a
        reward model with another tokenizer, "fn_rewards": the reward functions'}, either None
        without one) and their metrics: `time_generate` (the wait for the samples),
        `time_retokenized_reward`, `time_reward/<name>`. `trainer_state`: what the reward
        functions get (`reward_calls.TrainerState`). Thread-safe: under `rl.max_staleness` it
        runs beside the learner (p3o_jax/pipeline.py)."""
        t0 = time.perf_counter()
        samples = jax.block_until_ready(samples)
        t1 = time.perf_counter()
        metrics = {"time_generate": t1 - t0}
        rm_scores = self.rm_fn(prompts, samples) if self.rm_fn else None
        if self.rm_fn:              # retokenising for another tokenizer's reward model
            metrics["time_retokenized_reward"] = time.perf_counter() - t1
        scorer = self.fn_scorer and (self.fn_scorer.at(trainer_state) if trainer_state
                                     else self.fn_scorer)
        fn_rewards = scorer(prompts, samples) if scorer else None
        if scorer:
            metrics |= {f"time_reward/{k}": t for k, t in scorer.time.items()}
        return {"rm_scores": rm_scores, "fn_rewards": fn_rewards}, metrics

    def learn(self, state: TrainState, carry: dict, ref, reward_model, prompts: dict, samples,
              frozen=None, trainer_state=None, rewards=None):
        """The learner side on `samples` of `prompts`, drawn by the current weights or, stale,
        by older ones: the host's rewards (`host_rewards`, or `rewards`, a future of its
        result computed beside), `score` with the state's weights (pi_prox), `update`.
        (state, metrics); metrics include the wall time of each part, each synchronised:
        `time_generate` (waiting for the samples), `time_score` (the host's rewards and the
        scoring program), `time_update`; with `rewards`, `time_wait_rewards` (of
        `time_score`)."""
        t0 = time.perf_counter()
        if rewards is None:
            host, host_metrics = self.host_rewards(prompts, samples, trainer_state)
        else:
            host, host_metrics = rewards.result()
            host_metrics = dict(host_metrics, time_generate=0.0,
                                time_wait_rewards=time.perf_counter() - t0)
        t1 = t0 + host_metrics["time_generate"]
        params = self.params(state.params, frozen)
        packing = self.score_packing(prompts["ids"], prompts["mask"], samples.mask)
        buffer, metrics = self.score(params, ref, None if self.rm_fn else reward_model,
                                     prompts, samples, carry, host["rm_scores"], packing,
                                     host["fn_rewards"])
        buffer = jax.block_until_ready(buffer.replace(entropy=None, rm_scores=None))
        t2 = time.perf_counter()
        state, update_metrics = jax.block_until_ready(self.update(state, buffer, frozen))
        t3 = time.perf_counter()
        return state, {**metrics, **update_metrics, **carry, **host_metrics,
                       "time_score": t2 - t1, "time_update": t3 - t2}

    def __call__(self, state: TrainState, carry: dict, ref, reward_model, prompts: dict, key,
                 frozen=None, max_lengths=None, trainer_state=None):
        """One on-policy iteration, `generate` then `learn`: (state, samples, metrics).
        `frozen`: the policy's frozen part (`split_policy`; None when the state trains all of
        it)."""
        t0 = time.perf_counter()
        samples = self.generate(state, prompts, key, frozen, max_lengths)
        dispatch = time.perf_counter() - t0
        state, metrics = self.learn(state, carry, ref, reward_model, prompts, samples, frozen,
                                    trainer_state)
        return state, samples, dict(metrics, time_generate=dispatch + metrics["time_generate"])

    @functools.cached_property
    def sample_shapes(self) -> SampleOutput:
        """The shape of each field of an iteration's samples [B, K, N] (num_steps: [])."""
        rl = self.cfg.rl
        return SampleOutput(*[(rl.prompts_per_iter, rl.n_samples,
                               self.sampling.max_new_tokens)] * 5, ())

    @functools.cached_property
    def sample_shardings(self) -> SampleOutput:
        """Where an iteration's samples are placed on `mesh`: rows over the batch devices."""
        return jax.tree.map(lambda s: batch_sharding(self.mesh, len(s)) if s
                            else replicated(self.mesh), self.sample_shapes, is_leaf=_is_shape)

    def no_samples(self) -> SampleOutput:
        """Zeros of a batch of samples' shapes, placed as batches are: what the loop's
        `LoopState.in_flight` holds where nothing is in flight (before the first iteration,
        past the last)."""
        dtypes = SampleOutput(jnp.int32, jnp.int32, jnp.float32, jnp.float32, jnp.float32,
                              jnp.int32)
        return jax.jit(lambda: jax.tree.map(jnp.zeros, self.sample_shapes, dtypes,
                                            is_leaf=_is_shape),
                       out_shardings=self.sample_shardings)()


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@flax.struct.dataclass
class LoopState:
    """What the RL loop carries from one iteration to the next and checkpoints: the train
    state and, under `rl.max_staleness` = s, the samples of the next s iterations' prompts,
    drawn ahead with older weights (`RLIteration.no_samples` where there are none yet)."""
    train: TrainState
    in_flight: tuple = ()
