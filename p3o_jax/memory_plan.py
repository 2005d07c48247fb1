"""Memory plans: bytes per device of each stage of a run, before anything is compiled
(the command: p3o_jax/cli/memory_plan.py).

`make_plan(cfg, n_devices)` lays the run's mesh (`cfg.mesh`, -1 resolved) out as a
`jax.sharding.AbstractMesh`, so no device is needed, and for each stage adds up what one
device holds:

- `params`, `grads`, `opt_state`: the trained model(s) (RL with PPO: policy and critic; with
  `rl.lora.rank` or `rl.train_top_layers`, only that part of the policy, and the backward pass
  of a top-layer update reaches its blocks only).
  Exact: `jax.eval_shape` of the params and of the TrainState under the stage's optimizer
  (AdamW: two moments in the param dtype, float32 by default; gradient accumulation adds a
  third copy), each leaf's shard shape from the rule table (`train_state.state_shardings`).
- `frozen`: models held but not trained, exact likewise: the SFT policy during RM; the
  reference (the SFT policy) and the reward model during RL; all three at the evaluation.
- `gathered`: with FSDP (`fsdp` > 1), the weights of the block running and of the next one,
  gathered in the compute dtype (split over `tensor` only), of the stage's largest model.
  Exact shapes; two blocks because `model.fetched_after` lets a block's gather start no
  earlier than the previous block.
- `decode_weights`: sampling with FSDP (`rl.sampler_gather_once`, the default): the policy's
  weights all-gathered once per sampling call in the compute dtype (split over `tensor`
  only), what `sampler.weights_for_decode` hands the decode loop. Exact shapes.
- `kv_cache`: sampling. Exact shard shapes of `model.init_cache`'s [rows, P + N, kv heads,
  head dim] per layer (k and v, compute dtype; `model.KV_CACHE_AXES`), rows over `data` x
  `fsdp`, kv heads over
  `tensor`: the prompts' cache plus the one repeated per response (`sampler.sample_responses`).
- `scoring`: forward passes without gradients (rollout scoring, RM validation, evaluation):
  one layer's activations plus the logits, see below.
- `activations`: what one training step saves for its backward pass, an estimate.

Activations, per sequence of L = P + N tokens on one device (s = bytes of the compute dtype,
D model width, H / Hkv heads / kv heads of width E, F MLP width, V vocabulary, t = `tensor`,
a term divided by t only when t divides its heads / F / V)::

    layer = L * (6 D s                      block input, norms, attention/MLP outputs, sum
                 + (2 H + 2 Hkv) E s / t    q, k, v (after rotary) and the attention context
                 + H L (4 + s) / t          float32 scores and the probabilities
                 + c F s / t)               MLP hidden: c = 2 (GELU), 3 (SwiGLU)
    head  = T * 8 V / t                     float32 logits and log-softmax over T positions
                                            (SFT: all L; RL: the N response tokens; RM: none)
    step, no remat        = n * (n_layers * layer + head)
    step, per-block remat = n * (n_layers * L D s + layer + head)   (block inputs kept, one
                                                                     block recomputed)
    scoring               = n * (layer + head)

with n the sequences per device (the step's batch / (data x fsdp)). `check` uses the remat
numbers when the policy rematerialises its blocks (`policy.remat=block|save_matmuls`; the
save_matmuls policy is counted as block, a lower bound), the no-remat ones otherwise. A
training step's temporaries = step_factor x (grads + activations): 1 for SFT and RM (XLA's
compiled steps agree to within 10%), RL_UPDATE_FACTOR = 1.7 for the RL update, whose compiled
programs hold 1.2-2.0x (see RL_UPDATE_FACTOR). Peak of a stage = params + opt_state + frozen +
gathered + max(kv_cache + decode_weights, scoring, step): sampling, scoring and the update
take turns. XLA's own buffers, fragmentation and the runtime's reserve come on top: leave ~10%.

Compiling instead of estimating: p3o_jax/compile_check.py (`python -m p3o_jax.cli.compile_check`)
compiles the loop's programs for a named TPU slice or GPU box on any host and puts XLA's memory
analysis beside these numbers (README, "Real compiles", where each row's ratio is given).
XLA's resident bytes over this plan, RL update, Pythia-6.9B and Llama-3-8B: full fine-tuning
0.96-0.99, with `policy.remat=block` 1.02-1.13 (v4-32, v5e-16, 8 x H100); top-2 layers
1.03-1.06 on v4-32 and 8 x H100 but 1.35-1.49 on v5e-16 (libtpu's v5e schedule); LoRA
1.00-1.18 (v5e-16, 8 x H100), 0.47 on v4-32. Smaller models are over-estimated (Pythia-1B /
2.8B full fine-tuning 0.5-0.87x): the factor is set where fitting matters.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from p3o_jax import model as M
from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import ConfigError
from p3o_jax.config import DistConfig, ExperimentConfig
from p3o_jax.config_resolve import mesh_sizes
from p3o_jax.rl import split_policy
from p3o_jax.sharding import MESH_AXES, fsdp_gathered_spec, logical_shardings
from p3o_jax.train_state import OptimConfig, TrainState, make_optimizer

GIB = 2 ** 30

# Named TPU slices and GPU boxes: (devices, memory GiB per device, hosts). TPU names count
# TensorCores for v4/v5p (2 per chip, one megacore device) and chips for v5e/v6e.
SLICES = {
    "v4-8": (4, 32, 1), "v4-16": (8, 32, 2), "v4-32": (16, 32, 4), "v4-64": (32, 32, 8),
    "v5e-4": (4, 16, 1), "v5e-8": (8, 16, 1), "v5e-16": (16, 16, 4), "v5e-32": (32, 16, 8),
    "v5p-8": (4, 95, 1), "v5p-16": (8, 95, 2), "v6e-8": (8, 32, 1),
    "a100-80gb-x1": (1, 80, 1), "a100-80gb-x8": (8, 80, 1),
    "h100-x1": (1, 80, 1), "h100-x8": (8, 80, 1), "h100-x16": (16, 80, 2),
}

# XLA's compiled RL update holds 1.2-2.0x the gradients + activations counted below (full
# fine-tuning, TPU v4/v5e and 8 x H100, Pythia-1B to Llama-3-8B, 1.6-1.75x from 6.9B up;
# README "Real compiles"): AdamW's update of each minibatch step, the scan's carry and the
# weights FSDP gathers for the backward pass. The RL stage scales that term by 1.7, set where
# fitting matters (6.9B, 8B); smaller models come out over-estimated.
RL_UPDATE_FACTOR = 1.7


class MemoryPlanError(ConfigError):
    """A configuration whose estimated memory exceeds the per-device budget."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Bytes per device of one stage (see the module docstring for each component)."""
    stage: str
    params: int = 0
    grads: int = 0
    opt_state: int = 0
    frozen: int = 0
    gathered: int = 0
    kv_cache: int = 0
    decode_weights: int = 0
    scoring: int = 0
    activations: int = 0
    activations_remat: int = 0
    step_factor: float = 1.0        # the step's measured temporaries / (grads + activations)

    def step(self, remat: bool = False) -> int:
        """Bytes of a training step's temporaries: gradients and activations, calibrated."""
        act = self.activations_remat if remat else self.activations
        return int(self.step_factor * (self.grads + act))

    def peak(self, remat: bool = False) -> int:
        return (self.params + self.opt_state + self.frozen + self.gathered
                + max(self.sampling, self.scoring, self.step(remat)))

    @property
    def sampling(self) -> int:
        """Bytes of the sampler's own: the KV cache and the gathered policy it decodes with."""
        return self.kv_cache + self.decode_weights


COMPONENTS = [f.name for f in dataclasses.fields(StagePlan) if f.type == "int"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The stages' plans on one mesh; `check` is what `dist.check_memory=true` runs."""
    mesh: dict                      # {"data": .., "fsdp": .., "tensor": ..}
    stages: tuple[StagePlan, ...]

    def peak(self, remat: bool = False) -> int:
        return max(s.peak(remat) for s in self.stages)

    def table(self) -> str:
        """Per stage and component, GiB per device."""
        cols = COMPONENTS + ["peak", "peak_remat"]
        rows = [["stage"] + cols]
        for s in self.stages:
            values = [getattr(s, c) for c in COMPONENTS] + [s.peak(), s.peak(remat=True)]
            rows.append([s.stage] + [f"{v / GIB:.2f}" for v in values])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)

    def check(self, hbm_bytes: int, remat: bool = False) -> None:
        """Raise MemoryPlanError, with the breakdown, if a stage's peak exceeds `hbm_bytes`."""
        over = [s.stage for s in self.stages if s.peak(remat) > hbm_bytes]
        if over:
            raise MemoryPlanError(
                f"stage {', '.join(over)} needs {self.peak(remat) / GIB:.2f} GiB per device, "
                f"over the budget of {hbm_bytes / GIB:.2f} GiB, on a {mesh_text(self.mesh)} "
                f"mesh; estimated GiB per device (p3o_jax/memory_plan.py):\n{self.table()}\n"
                f"Lower sft.batch_size / rm.batch_size / eval_prompts, raise rl.minibatches, "
                f"add devices or mesh.tensor, or set policy.param_dtype=bfloat16 (or "
                f"rl.sampler_gather_once=false for sampling).")


def mesh_text(shape) -> str:
    """A mesh's axis sizes as "data=1 x fsdp=8 x tensor=1"."""
    return " x ".join(f"{k}={v}" for k, v in shape.items())


def abstract_mesh(mesh_cfg, n_devices: int) -> AbstractMesh:
    """The (data, fsdp, tensor) mesh of `mesh_cfg` over `n_devices`, without devices."""
    m = mesh_sizes(mesh_cfg, n_devices)
    return AbstractMesh((m.data, m.fsdp, m.tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def shard_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs with these shardings
    (uniform shardings: every device holds the same)."""
    return sum(math.prod(sh.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


# Plans differ mostly in their mesh; what does not depend on it is traced once per model.
_param_shapes = functools.lru_cache(maxsize=None)(
    lambda cfg: jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0))))
_param_axes = functools.lru_cache(maxsize=None)(M.param_axes)


def params_bytes(cfg: M.ModelConfig, mesh) -> int:
    """Bytes per device of `cfg`'s params laid out by the rule table on `mesh`."""
    shapes = _param_shapes(cfg)
    return shard_bytes(shapes, logical_shardings(_param_axes(cfg), mesh, shapes))


def train_state_bytes(model_cfgs: tuple[M.ModelConfig, ...], optim: OptimConfig,
                      mesh, rl_cfg: ExperimentConfig | None = None) -> tuple[int, int]:
    """(params, optimizer state) bytes per device of the TrainState `create_state` builds for
    the trained models `model_cfgs`, with `optim`'s optimizer, on `mesh`: the shardings of
    `train_state.state_shardings`, from a layout traced once per models and optimizer. With
    `rl_cfg`, the first model is RL's policy, of which the state holds the part `rl_cfg.rl`
    trains (`rl.split_policy`: LoRA adapters, the top layers)."""
    specs, shapes = _state_layout(model_cfgs, optim, rl_cfg)
    shardings = logical_shardings(specs, mesh, shapes)
    return (shard_bytes(shapes.params, shardings.params),
            shard_bytes(shapes.opt_state, shardings.opt_state))


@functools.lru_cache(maxsize=None)
def _state_layout(model_cfgs: tuple[M.ModelConfig, ...], optim: OptimConfig,
                  rl_cfg: ExperimentConfig | None = None):
    """Logical specs and shapes of a TrainState over `model_cfgs` (optimizer moments carry
    their params' logical axes through `tx.init`)."""
    tx = make_optimizer(optim, 1)
    boxed = {i: jax.tree.map(lambda x, spec: nn.LogicallyPartitioned(x, tuple(spec)),
                             _param_shapes(c), _param_axes(c))
             for i, c in enumerate(model_cfgs)}
    if rl_cfg is not None:
        boxed[0] = jax.eval_shape(lambda p: split_policy(rl_cfg, p)[0], boxed[0])
    state = jax.eval_shape(lambda p: TrainState.create(p, tx), boxed)
    return nn.get_partition_spec(state), nn.unbox(state)


def kv_cache_bytes(cfg: M.ModelConfig, rows: int, length: int, mesh) -> int:
    """Bytes per device of `model.init_cache(cfg, rows, length)`, sharded as the sampler
    constrains it (`model.KV_CACHE_AXES`)."""
    shape = jax.eval_shape(lambda: M.init_cache(cfg, rows, length)[0]["k"])
    sharding = logical_shardings(jax.sharding.PartitionSpec(*M.KV_CACHE_AXES), mesh, shape)
    return 2 * cfg.n_layers * shard_bytes(shape, sharding)


def gathered_bytes(cfg: M.ModelConfig, mesh, whole_model: bool = False) -> int:
    """Bytes per device of weights gathered over `fsdp` in the compute dtype (still split over
    `tensor`): two blocks' (what FSDP materialises while a block runs, with one block of
    prefetch: `model.fetched_after`), or with `whole_model` all of the model's (the sampler's
    copy: `sampler.weights_for_decode`). 0 when `fsdp` is 1 (the weights are used in place)."""
    if mesh.shape["fsdp"] == 1:
        return 0
    shapes, axes = _param_shapes(cfg), _param_axes(cfg)
    if not whole_model:
        shapes, axes = shapes["layer_0"], axes["layer_0"]
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, M.weight_compute_dtype(cfg, x)), shapes)
    shardings = jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fsdp_gathered_spec(spec, x.shape, mesh.shape)),
        axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    gathered = shard_bytes(shapes, shardings)
    return gathered if whole_model else 2 * gathered


def _split(n: int, ways: int) -> float:
    """n / ways if `ways` divides n (the rule table shards it), else n (replicated)."""
    return n / ways if n % ways == 0 else n


def activation_bytes(cfg: M.ModelConfig, seqs: int, length: int, head_positions: int, mesh,
                     mode: str, layers: int | None = None) -> int:
    """The module docstring's estimate for `seqs` sequences (global) of `length` tokens with
    the LM head on `head_positions` of them; mode: "train", "remat" or "scoring"; `layers`:
    the blocks the backward pass reaches (None: all; `rl.train_top_layers`)."""
    layers = cfg.n_layers if layers is None else layers
    t = mesh.shape["tensor"]
    n = math.ceil(seqs / (mesh.shape["data"] * mesh.shape["fsdp"]))
    s = jnp.dtype(cfg.compute_dtype).itemsize
    H, Hkv, E, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    layer = length * (6 * D * s + 2 * (_split(H, t) + _split(Hkv, t)) * E * s
                      + _split(H, t) * length * (4 + s)
                      + (3 if cfg.gated_mlp else 2) * _split(F, t) * s)
    head = head_positions * 8 * _split(cfg.vocab_size, t)
    per_seq = {"train": layers * layer + head,
               "remat": layers * length * D * s + layer + head,
               "scoring": layer + head}[mode]
    return int(n * per_seq)


def _step(cfg, seqs, length, head_positions, mesh, layers=None) -> dict:
    return {"activations": activation_bytes(cfg, seqs, length, head_positions, mesh, "train",
                                            layers),
            "activations_remat": activation_bytes(cfg, seqs, length, head_positions, mesh,
                                                  "remat", layers)}


def _trained(model_cfgs: tuple, optim: OptimConfig, mesh, rl_cfg=None) -> dict:
    # the state's shapes depend on the optimizer's structure only (accumulation or not)
    structure = OptimConfig(grad_accum=optim.grad_accum, grad_clip=float(optim.grad_clip > 0))
    params, opt = train_state_bytes(model_cfgs, structure, mesh, rl_cfg)
    return {"params": params, "grads": params, "opt_state": opt}


def make_plan(cfg: ExperimentConfig, n_devices: int, stages=("sft", "rm", "rl", "eval")) -> Plan:
    """Per-device memory of `stages` of the run `cfg` on `n_devices` devices (the policy's
    architecture must be concrete: resolve `base_model` first, `config_resolve.resolve`)."""
    mesh = abstract_mesh(cfg.mesh, n_devices)
    pol, rmc, rl = cfg.policy, cfg.rm_model, cfg.rl
    algo = ALGORITHMS[cfg.algo]
    N = cfg.response_len
    L = cfg.prompt_len + N
    sft_p, rm_p = params_bytes(pol, mesh), params_bytes(rmc, mesh)
    cache = lambda prompts, k: (kv_cache_bytes(pol, prompts * k, L, mesh)
                                + kv_cache_bytes(pol, prompts, L, mesh))
    scoring = lambda c, seqs, head: activation_bytes(c, seqs, L, head, mesh, "scoring")
    gathered = lambda *cfgs: max(gathered_bytes(c, mesh) for c in cfgs)
    decode = gathered_bytes(pol, mesh, whole_model=True) if rl.sampler_gather_once else 0
    plans = {}
    if "sft" in stages:
        plans["sft"] = StagePlan("sft", **_trained((pol,), cfg.sft.optim, mesh),
                                 gathered=gathered(pol),
                                 **_step(pol, cfg.sft.batch_size, L, L, mesh))
    if "rm" in stages:
        sampled = cfg.task == "toy"  # the toy task samples its pairs from the SFT policy
        plans["rm"] = StagePlan(
            "rm", **_trained((rmc,), cfg.rm.optim, mesh), frozen=sft_p,
            gathered=gathered(rmc, pol) if sampled else gathered(rmc),
            kv_cache=cache(rl.prompts_per_iter, 2) if sampled else 0,
            decode_weights=decode if sampled else 0,
            scoring=scoring(rmc, 2 * cfg.rm.batch_size, 0),  # the held-out pairs
            **_step(rmc, 2 * cfg.rm.batch_size, L, 0, mesh))
    if "rl" in stages:
        trained = (pol, rmc) if algo.critic else (pol,)
        layers = rl.train_top_layers or None     # the backward pass stops below them
        if algo.offline:  # reference log-probs, then DPO on the stored pairs
            seqs, kv = 2 * rl.prompts_per_iter, 0
            step = _step(pol, seqs // rl.minibatches, L, N, mesh, layers)
        else:
            seqs, kv = rl.prompts_per_iter * rl.n_samples, cache(rl.prompts_per_iter,
                                                                 rl.n_samples)
            step = _step(pol, seqs // rl.minibatches, L, N, mesh, layers)
            if algo.critic:  # the critic's forward and backward too
                critic = _step(rmc, seqs // rl.minibatches, L, 0, mesh)
                step = {k: v + critic[k] for k, v in step.items()}
        # the SFT policy (the reference, and the frozen part of a LoRA / top-layer policy)
        part = cfg if rl.lora.rank or rl.train_top_layers else None
        plans["rl"] = StagePlan("rl", **_trained(trained, rl.optim, mesh, part),
                                frozen=sft_p + rm_p, gathered=gathered(pol, rmc), kv_cache=kv,
                                decode_weights=0 if algo.offline else decode,
                                scoring=scoring(pol, seqs, N), step_factor=RL_UPDATE_FACTOR,
                                **step)
    if "eval" in stages:  # the final table: SFT, RL policy and RM; eval_prompts in one batch,
        # one response each (`evaluate.sample_one`)
        plans["eval"] = StagePlan("eval", frozen=2 * sft_p + rm_p, gathered=gathered(pol, rmc),
                                  kv_cache=kv_cache_bytes(pol, cfg.eval_prompts, L, mesh),
                                  decode_weights=decode, scoring=scoring(pol, cfg.eval_prompts, N))
    return Plan(dict(mesh.shape), tuple(plans[s] for s in stages if s in plans))


def device_budget(dist: DistConfig) -> int:
    """Bytes per device a run may use: `dist.hbm_gib`, else the device's own limit."""
    if dist.hbm_gib:
        return int(dist.hbm_gib * GIB)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ConfigError("config key 'dist.hbm_gib': this device reports no memory limit; "
                          "give the per-device budget in GiB")
    return stats["bytes_limit"]
