"""Memory plans: bytes per device of each stage of a run, before anything is compiled.

    python -m p3o_jax.memory_plan                                  # presets x TPU slices
    python -m p3o_jax.memory_plan --model pythia-6.9b --slice v5e-16 mesh.tensor=2
    python -m p3o_jax.memory_plan exp=tldr --slice v4-8 rl.minibatches=8 [key=value ...]

`make_plan(cfg, n_devices)` lays the run's mesh (`cfg.mesh`, -1 resolved) out as a
`jax.sharding.AbstractMesh`, so no device is needed, and for each stage adds up what one
device holds:

- `params`, `grads`, `opt_state`: the trained model(s) (RL with PPO: policy and critic).
  Exact: `jax.eval_shape` of the params and of the TrainState under the stage's optimizer
  (AdamW: two moments in the param dtype, float32 by default; gradient accumulation adds a
  third copy), each leaf's shard shape from the rule table (`train_state.state_shardings`).
- `frozen`: models held but not trained, exact likewise: the SFT policy during RM; the
  reference (the SFT policy) and the reward model during RL; all three at the evaluation.
- `kv_cache`: sampling. Exact shard shapes of `model.init_cache`'s [rows, P + N, kv heads,
  head dim] per layer (k and v, compute dtype), rows over `data` x `fsdp`, kv heads over
  `tensor`: the prompts' cache plus the one repeated per response (`sampler.sample_pairs`).
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

with n the sequences per device (the step's batch / (data x fsdp)). The model does not
rematerialise today, so `check` uses the no-remat numbers; the remat column says what a
`jax.checkpoint` per block would buy. Peak of a stage = params + opt_state + frozen +
max(kv_cache, scoring, grads + activations): sampling, scoring and the update take turns.
XLA's own buffers, fragmentation and the runtime's reserve come on top: leave ~10-15%. For
scale: XLA's memory analysis of a compiled float32 SFT step on CPU (GPT-NeoX, 4 layers, d_model
256, 16 x 128 tokens) reports 375 MiB of temporaries where activations + gradients estimate
292 MiB, the rest being the optimizer update's temporaries (~4x the params).

Compiling instead of estimating: `jax.experimental.topologies.get_topology_desc` would let
this CPU host AOT-compile the P3O step for a TPU topology and read its memory analysis, but
it needs libtpu (the `jax[tpu]` extra); without it it raises "JAX TPU support not installed",
so the plan is analytic. With libtpu, `jax.jit(...).lower(...).compile().memory_analysis()`
on that topology's mesh checks these numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from p3o_jax import model as M
from p3o_jax.config import ConfigError, DistConfig, ExperimentConfig, OptimConfig, from_args
from p3o_jax.sharding import MESH_AXES, logical_shardings
from p3o_jax.train_state import TrainState, make_optimizer

GIB = 2 ** 30
# model.init_cache's layout [rows, S, kv heads, head dim], as Attention constrains k and v.
CACHE_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")

# Architectures of the hub checkpoints (their config.json), for plans without a download.
MODELS = {
    "pythia-410m": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=1024,
                                 n_layers=24, n_heads=16, d_ff=4096, max_len=2048,
                                 rotary_pct=0.25),
    "pythia-1b": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=2048, n_layers=16,
                               n_heads=8, d_ff=8192, max_len=2048, rotary_pct=0.25),
    "pythia-2.8b": M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=2560,
                                 n_layers=32, n_heads=32, d_ff=10240, max_len=2048,
                                 rotary_pct=0.25),
    "pythia-6.9b": M.ModelConfig(family="gpt_neox", vocab_size=50432, d_model=4096,
                                 n_layers=32, n_heads=32, d_ff=16384, max_len=2048,
                                 rotary_pct=0.25),
    "llama-7b": M.ModelConfig(family="llama", vocab_size=32000, d_model=4096, n_layers=32,
                              n_heads=32, d_ff=11008, max_len=4096),
}

# name: (chips, HBM GiB per chip, hosts). TPU names count TensorCores for v4/v5p (2 per chip)
# and chips for v5e.
SLICES = {
    "v4-8": (4, 32, 1), "v4-16": (8, 32, 2), "v4-32": (16, 32, 4), "v4-64": (32, 32, 8),
    "v5e-4": (4, 16, 1), "v5e-8": (8, 16, 1), "v5e-16": (16, 16, 4), "v5e-32": (32, 16, 8),
    "v5p-8": (4, 95, 1), "v5p-16": (8, 95, 2),
    "a100-80gb-x8": (8, 80, 1), "h100-x8": (8, 80, 1), "h100-x16": (16, 80, 2),
}


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
    kv_cache: int = 0
    scoring: int = 0
    activations: int = 0
    activations_remat: int = 0

    def peak(self, remat: bool = False) -> int:
        act = self.activations_remat if remat else self.activations
        return (self.params + self.opt_state + self.frozen
                + max(self.kv_cache, self.scoring, self.grads + act))


COMPONENTS = [f.name for f in dataclasses.fields(StagePlan)][1:]


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
            mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
            raise MemoryPlanError(
                f"stage {', '.join(over)} needs {self.peak(remat) / GIB:.2f} GiB per device, "
                f"over the budget of {hbm_bytes / GIB:.2f} GiB, on a {mesh} "
                f"mesh; estimated GiB per device (p3o_jax/memory_plan.py):\n{self.table()}\n"
                f"Lower sft.batch_size / rm.batch_size / eval_prompts, raise rl.minibatches, "
                f"add devices or mesh.tensor, or set policy.param_dtype=bfloat16.")


def abstract_mesh(mesh_cfg, n_devices: int) -> AbstractMesh:
    """The (data, fsdp, tensor) mesh of `mesh_cfg` over `n_devices`, without devices."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = n_devices // math.prod(s for s in sizes if s != -1)
    return AbstractMesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


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
                      mesh) -> tuple[int, int]:
    """(params, optimizer state) bytes per device of the TrainState `create_state` builds for
    the trained models `model_cfgs`, with `optim`'s optimizer, on `mesh`: the shardings of
    `train_state.state_shardings`, from a layout traced once per models and optimizer."""
    specs, shapes = _state_layout(model_cfgs, optim)
    shardings = logical_shardings(specs, mesh, shapes)
    return (shard_bytes(shapes.params, shardings.params),
            shard_bytes(shapes.opt_state, shardings.opt_state))


@functools.lru_cache(maxsize=None)
def _state_layout(model_cfgs: tuple[M.ModelConfig, ...], optim: OptimConfig):
    """Logical specs and shapes of a TrainState over `model_cfgs` (optimizer moments carry
    their params' logical axes through `tx.init`)."""
    tx = make_optimizer(optim, 1)
    boxed = {i: jax.tree.map(lambda x, spec: nn.LogicallyPartitioned(x, tuple(spec)),
                             _param_shapes(c), _param_axes(c))
             for i, c in enumerate(model_cfgs)}
    state = jax.eval_shape(lambda p: TrainState.create(p, tx), boxed)
    return nn.get_partition_spec(state), nn.unbox(state)


def kv_cache_bytes(cfg: M.ModelConfig, rows: int, length: int, mesh) -> int:
    """Bytes per device of `model.init_cache(cfg, rows, length)` sharded by `CACHE_AXES`."""
    shape = jax.ShapeDtypeStruct((rows, length, cfg.n_kv_heads, cfg.head_dim), cfg.compute_dtype)
    sharding = logical_shardings(jax.sharding.PartitionSpec(*CACHE_AXES), mesh, shape)
    return 2 * cfg.n_layers * shard_bytes(shape, sharding)


def _split(n: int, ways: int) -> float:
    """n / ways if `ways` divides n (the rule table shards it), else n (replicated)."""
    return n / ways if n % ways == 0 else n


def activation_bytes(cfg: M.ModelConfig, seqs: int, length: int, head_positions: int, mesh,
                     mode: str) -> int:
    """The module docstring's estimate for `seqs` sequences (global) of `length` tokens with
    the LM head on `head_positions` of them; mode: "train", "remat" or "scoring"."""
    t = mesh.shape["tensor"]
    n = math.ceil(seqs / (mesh.shape["data"] * mesh.shape["fsdp"]))
    s = jnp.dtype(cfg.compute_dtype).itemsize
    H, Hkv, E, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    layer = length * (6 * D * s + 2 * (_split(H, t) + _split(Hkv, t)) * E * s
                      + _split(H, t) * length * (4 + s)
                      + (3 if cfg.family == "llama" else 2) * _split(F, t) * s)
    head = head_positions * 8 * _split(cfg.vocab_size, t)
    per_seq = {"train": cfg.n_layers * layer + head,
               "remat": cfg.n_layers * length * D * s + layer + head,
               "scoring": layer + head}[mode]
    return int(n * per_seq)


def _step(cfg, seqs, length, head_positions, mesh) -> dict:
    return {"activations": activation_bytes(cfg, seqs, length, head_positions, mesh, "train"),
            "activations_remat": activation_bytes(cfg, seqs, length, head_positions, mesh,
                                                  "remat")}


def _trained(model_cfgs: tuple, optim: OptimConfig, mesh) -> dict:
    # the state's shapes depend on the optimizer's structure only (accumulation or not)
    structure = OptimConfig(grad_accum=optim.grad_accum, grad_clip=float(optim.grad_clip > 0))
    params, opt = train_state_bytes(model_cfgs, structure, mesh)
    return {"params": params, "grads": params, "opt_state": opt}


def make_plan(cfg: ExperimentConfig, n_devices: int, stages=("sft", "rm", "rl", "eval")) -> Plan:
    """Per-device memory of `stages` of the run `cfg` on `n_devices` devices (the policy's
    architecture must be concrete: resolve `base_model` first, as `train.with_base_model`)."""
    mesh = abstract_mesh(cfg.mesh, n_devices)
    pol, rmc, rl = cfg.policy, cfg.rm_model, cfg.rl
    P, N = ((cfg.toy.prompt_len, cfg.toy.response_len) if cfg.task == "toy"
            else (cfg.data.prompt_len, cfg.data.response_len))
    L = P + N
    sft_p, rm_p = params_bytes(pol, mesh), params_bytes(rmc, mesh)
    cache = lambda prompts, k: (kv_cache_bytes(pol, prompts * k, L, mesh)
                                + kv_cache_bytes(pol, prompts, L, mesh))
    scoring = lambda c, seqs, head: activation_bytes(c, seqs, L, head, mesh, "scoring")
    plans = {}
    if "sft" in stages:
        plans["sft"] = StagePlan("sft", **_trained((pol,), cfg.sft.optim, mesh),
                                 **_step(pol, cfg.sft.batch_size, L, L, mesh))
    if "rm" in stages:
        sampled = cfg.task == "toy"  # the toy task samples its pairs from the SFT policy
        plans["rm"] = StagePlan(
            "rm", **_trained((rmc,), cfg.rm.optim, mesh), frozen=sft_p,
            kv_cache=cache(rl.prompts_per_iter, 2) if sampled else 0,
            scoring=scoring(rmc, 2 * cfg.rm.batch_size, 0),  # the held-out pairs
            **_step(rmc, 2 * cfg.rm.batch_size, L, 0, mesh))
    if "rl" in stages:
        trained = (pol, rmc) if cfg.algo == "ppo" else (pol,)
        if cfg.algo == "dpo_offline":  # reference log-probs, then DPO on the stored pairs
            seqs, kv = 2 * rl.prompts_per_iter, 0
            step = _step(pol, seqs // rl.minibatches, L, N, mesh)
        else:
            seqs, kv = rl.prompts_per_iter * rl.n_samples, cache(rl.prompts_per_iter,
                                                                 rl.n_samples)
            step = _step(pol, seqs // rl.minibatches, L, N, mesh)
            if cfg.algo == "ppo":  # the critic's forward and backward too
                critic = _step(rmc, seqs // rl.minibatches, L, 0, mesh)
                step = {k: v + critic[k] for k, v in step.items()}
        plans["rl"] = StagePlan("rl", **_trained(trained, rl.optim, mesh), frozen=sft_p + rm_p,
                                kv_cache=kv, scoring=scoring(pol, seqs, N), **step)
    if "eval" in stages:  # the final table: SFT, RL policy and RM; eval_prompts in one batch
        plans["eval"] = StagePlan("eval", frozen=2 * sft_p + rm_p,
                                  kv_cache=cache(cfg.eval_prompts, 2),
                                  scoring=scoring(pol, 2 * cfg.eval_prompts, N))
    return Plan(dict(mesh.shape), tuple(plans[s] for s in stages if s in plans))


def check_config(cfg: ExperimentConfig, n_devices: int, hbm_bytes: int) -> Plan:
    """The run's stages (and the final evaluation) against `hbm_bytes` per device; raises
    MemoryPlanError with the breakdown if one does not fit."""
    plan = make_plan(cfg, n_devices, cfg.stage_list + ("eval",))
    plan.check(hbm_bytes)
    return plan


def device_budget(dist: DistConfig) -> int:
    """Bytes per device a run may use: `dist.hbm_gib`, else the device's own limit."""
    if dist.hbm_gib < 0:
        raise ConfigError(f"config key 'dist.hbm_gib': must be >= 0, got {dist.hbm_gib}")
    if dist.hbm_gib:
        return int(dist.hbm_gib * GIB)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ConfigError("config key 'dist.hbm_gib': this device reports no memory limit; "
                          "give the per-device budget in GiB")
    return stats["bytes_limit"]


def with_preset(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """`cfg` with the policy (and reward model) of preset `name`, its dtypes kept."""
    policy = dataclasses.replace(MODELS[name], dtype=cfg.policy.dtype,
                                 param_dtype=cfg.policy.param_dtype)
    return dataclasses.replace(cfg, policy=policy, reward_model=None, base_model="")


def overview(exp: str = "tldr", models=("pythia-1b", "pythia-2.8b", "pythia-6.9b", "llama-7b"),
             slices=("v4-8", "v4-32", "v5e-8", "v5e-16")) -> str:
    """A markdown table: `exp`'s settings with each preset on each slice, FSDP over all chips
    or over half of them x tensor parallelism 2. The RL stage's components, then the peak
    of the worst stage of the run and whether it fits the chips' HBM."""
    base = from_args([f"exp={exp}"])
    gib = lambda b: f"{b / GIB:.1f}"
    lines = ["| model | slice (chips x GiB) | fsdp x tensor | params | opt state | ref + RM | "
             "KV cache | P3O act. | act. remat | RL peak | worst stage: peak / remat | fits |",
             "|---" * 12 + "|"]
    for name in models:
        cfg = with_preset(base, name)
        for slice_name in slices:
            chips, hbm, _ = SLICES[slice_name]
            for t in (1, 2):
                mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=t)
                plan = make_plan(dataclasses.replace(cfg, mesh=mesh), chips)
                rl = next(s for s in plan.stages if s.stage == "rl")
                worst = max(plan.stages, key=StagePlan.peak)
                fits = ("yes" if plan.peak() <= hbm * GIB else
                        "with remat" if plan.peak(remat=True) <= hbm * GIB else "no")
                lines.append(
                    f"| {name} | {slice_name} ({chips} x {hbm}) | {chips // t} x {t} | "
                    f"{gib(rl.params)} | {gib(rl.opt_state)} | {gib(rl.frozen)} | "
                    f"{gib(rl.kv_cache)} | {gib(rl.activations)} | {gib(rl.activations_remat)} | "
                    f"{gib(rl.peak())} | {worst.stage}: {gib(plan.peak())} / "
                    f"{gib(plan.peak(remat=True))} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p3o_jax.memory_plan", description=__doc__.split("\n\n")[0],
        epilog="Without arguments: the overview table (EXP=tldr's batches).")
    parser.add_argument("overrides", nargs="*",
                        help="exp=NAME (default tldr) and key=value, as for train")
    parser.add_argument("--model", choices=MODELS, help="a preset architecture")
    parser.add_argument("--slice", choices=SLICES, help="devices and HBM per device")
    parser.add_argument("--devices", type=int, help="number of devices (instead of --slice)")
    parser.add_argument("--hbm-gib", type=float, help="GiB per device (instead of --slice)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.overrides or args.model or args.slice or args.devices):
        print(overview())
        return 0
    try:
        exp = [] if any(a.startswith("exp=") for a in args.overrides) else ["exp=tldr"]
        cfg = from_args(exp + args.overrides)
        if args.model:
            cfg = with_preset(cfg, args.model)
        elif cfg.base_model:
            from p3o_jax.train import with_base_model  # reads the checkpoint's config.json
            cfg = with_base_model(cfg)
        chips, hbm, hosts = SLICES[args.slice] if args.slice else (args.devices or 1, 0, 1)
        hbm = args.hbm_gib or hbm
        plan = make_plan(cfg, chips)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"{args.slice} ({hosts} hosts)" if args.slice else f"{chips} devices"
    print(f"{where}, mesh {plan.mesh}; GiB per device:\n{plan.table()}")
    if hbm:
        try:
            plan.check(int(hbm * GIB))
        except MemoryPlanError as e:
            print(f"does not fit: {e}", file=sys.stderr)
            return 1
        print(f"fits in {hbm} GiB per device (peak {plan.peak() / GIB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
