"""Train state, optimizer, the update scan, and the one way every step is compiled: `jax.jit`
with explicit in/out shardings and the state donated.

A train step is a pure function `(state, batch) -> (state, metrics)`; `state` is a
`TrainState` whose params are one model or a dict of them (RL: `{"policy"}`, PPO adds
`{"critic"}`), `batch` a pytree of arrays whose first axis is the (global) batch (RL's update:
the buffer and its `MinibatchPlan`).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from p3o_jax import model as M
from p3o_jax.checks import NonNegative, OneOf, Positive, Range
from p3o_jax.sharding import batch_sharding, logical_shardings, replicated


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: Annotated[float, Positive] = 1e-3
    warmup_steps: Annotated[int, NonNegative] = 10
    decay: Annotated[str, OneOf("constant", "cosine", "linear")] = "constant"
    weight_decay: Annotated[float, NonNegative] = 0.0
    b1: Annotated[float, Range(0, 1, hi_open=True)] = 0.9
    b2: Annotated[float, Range(0, 1, hi_open=True)] = 0.95
    grad_clip: Annotated[float, NonNegative] = 1.0    # global norm; 0: off
    grad_accum: Annotated[int, Positive] = 1           # micro-steps per update (optax.MultiSteps)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx):
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

    def apply_gradients(self, grads):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup, then constant / cosine / linear decay; global-norm clipping;
    gradient accumulation over `grad_accum` micro-steps (optax.MultiSteps)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "constant": optax.constant_schedule(cfg.lr),
        "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=0.1),
        "linear": optax.linear_schedule(cfg.lr, 0.1 * cfg.lr, decay_steps),
    }[cfg.decay]
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def gradient_step(minibatch_loss):
    """step(state, batch, *frozen) -> (state, metrics): one optimizer step on
    `minibatch_loss(params, batch, *frozen) -> (loss, metrics)`, differentiated in `params`
    only (`frozen`: arrays the loss reads but nothing trains, e.g. the base under LoRA)."""
    def step(state, batch, *frozen):
        (loss, metrics), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(
            state.params, batch, *frozen)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return state.apply_gradients(grads), metrics
    return step


@flax.struct.dataclass
class MinibatchPlan:
    """The E x M optimizer steps of one update: which buffer rows each step takes and, when
    the prompts are packed (`packing.py`), each step's prompts packed."""
    index: jax.Array                # int32 [E * M, B / M]
    packing: Any = None             # packing.Packing with leaves [E * M, ...], or None


def minibatch_index(seed: int, step: int, epochs: int, minibatches: int, rows: int):
    """[E * M, B / M]: each epoch a permutation of the B buffer rows drawn from
    `fold_in(seed, step)` (`step`: the optimizer's step count before the update), cut into M
    minibatches. A function of (seed, step), so a resumed run repeats it exactly."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    perms = jnp.stack([jax.random.permutation(k, rows) for k in jax.random.split(key, epochs)])
    return perms.reshape(epochs * minibatches, rows // minibatches)


def make_update(step, first_step_metrics=()):
    """update(state, (buffer, plan), *frozen) -> (state, metrics): the optimizer steps
    `step(state, minibatch, *frozen) -> (state, metrics)` (e.g. `gradient_step`) of a
    `MinibatchPlan` over a buffer (a flax struct, batch first), one scan; metrics averaged
    over the steps, but those named in `first_step_metrics`: the first step's (taken where
    the params are still those the update started from)."""
    def update(state, batch, *frozen):
        buffer, plan = batch

        def one(state, xs):
            idx, packing = xs
            minibatch = jax.tree.map(lambda x: x[idx], buffer)
            if packing is not None:
                minibatch = minibatch.replace(packing=packing)
            return step(state, minibatch, *frozen)
        state, metrics = jax.lax.scan(one, state, (plan.index, plan.packing))
        return state, {k: v[0] if k in first_step_metrics else jnp.mean(v)
                       for k, v in metrics.items()}
    return update


def _boxed_params(model_cfgs):
    """Abstract params with their logical-axis boxes, for one ModelConfig or a dict of them."""
    if isinstance(model_cfgs, M.ModelConfig):
        tokens = jnp.zeros((1, 2), jnp.int32)
        return jax.eval_shape(lambda: M.Transformer(model_cfgs).init(
            jax.random.key(0), tokens, tokens, jnp.ones_like(tokens))["params"])
    return {k: _boxed_params(v) for k, v in model_cfgs.items()}


def state_shardings(model_cfgs, tx, mesh, trained=lambda params: params):
    """NamedShardings of a TrainState whose params are one model (a ModelConfig) or several (a
    dict of them, e.g. PPO's policy and critic), or `trained(params)` of them (the part RL
    trains: a subtree keeps its logical axes, new leaves such as LoRA adapters are
    replicated); optimizer moments follow their params."""
    abstract = jax.eval_shape(lambda p: TrainState.create(trained(p), tx),
                              _boxed_params(model_cfgs))
    return logical_shardings(nn.get_partition_spec(abstract), mesh, nn.unbox(abstract))


def param_shardings(model_cfg: M.ModelConfig, mesh):
    shapes = jax.eval_shape(lambda: M.init_params(model_cfg, jax.random.key(0)))
    return logical_shardings(M.param_axes(model_cfg), mesh, shapes)


def create_state(params, tx, shardings) -> TrainState:
    """Build the optimizer state directly in its sharded layout."""
    return jax.jit(lambda p: TrainState.create(p, tx), out_shardings=shardings)(params)


def jit_step(step_fn, state_sharding, batch_example, mesh, *frozen_shardings,
             batch_shardings=None):
    """Compile `step_fn(state, batch, *frozen) -> (state, metrics)` with explicit shardings
    (the batch's: `batch_shardings`, by default each leaf's first axis over the batch devices);
    the state is donated so parameters and optimizer moments are updated in place. `frozen`
    (params nothing trains, with `frozen_shardings`) are read, not donated."""
    batch_sh = batch_shardings or jax.tree.map(lambda x: batch_sharding(mesh, jnp.ndim(x)),
                                               batch_example)
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sh, *frozen_shardings),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))
