"""Real compiles of a run's programs for a named TPU slice or GPU box, on a host without one
(the command: p3o_jax/cli/compile_check.py).

`jax.experimental.topologies` describes the target's devices (TPU: libtpu; NVIDIA:
jax-cuda12-plugin and jax-cuda12-pjrt with a `GpuTargetConfig` from p3o_jax/gpu_specs/, and
`JAX_PLATFORMS=cpu`). On a host without the accelerator these compilers are compile-only: `make
test` installs them (requirements-compile.txt) into `COMPILERS`, a folder outside the venv's
site-packages that only `target_devices` puts on the path, so that no other command imports
them (they print at import and change how jax starts). The run's mesh (`cfg.mesh`) is laid over them
and each program the training loop jits is lowered on `jax.ShapeDtypeStruct`s carrying the
loop's `NamedSharding`s, then compiled by XLA for that target. Nothing is allocated. The
programs are the loop's own:

    sft_step      stage.supervised_step(policy, sft.loss)     batch: sft.batch_size x L
    rm_step       stage.supervised_step(rm_model, reward_model.loss)   rm.batch_size pairs
    rl_generate   RLIteration.sample (engine.sample)            prompts_per_iter x n_samples
    rl_score      RLIteration.score (rollout.score, algo.prepare)
    rl_update     RLIteration.compile_update (E x M minibatch steps, state donated)

with L = prompt_len + response_len. The RL programs take the train state (what `rl.lora.rank`
/ `rl.train_top_layers` train, `rl.split_policy`) and the frozen rest of the policy as the
loop passes them; the prompts are padded (`rl.pack_prompts`'s packed rows depend on the
data; padded is their upper bound).

Per program, bytes per device from XLA's `memory_analysis()`: arguments, outputs, aliased
(donated state: output written over its argument), temporaries, and `xla` = argument + output
- alias + temp. `resident` adds what the stage keeps alive besides the program's arguments
(the optimizer state while sampling, the reference and reward model during the update, the
SFT policy during reward modelling) and removes arrays passed twice (the frozen policy is also
the reference under LoRA / top layers: `rl_score` reads both). `plan` is the analytic estimate
of p3o_jax/memory_plan.py for the same program (params + opt state + frozen + the program's
own: KV cache, scoring, or gradients + activations). A program that does not fit the device's
memory fails TPU compilation (RESOURCE_EXHAUSTED); for GPUs XLA compiles anyway, so `resident`
is compared with the card's memory here. Either way the result says "does not fit" with one
line of why.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time

import jax
import jax.numpy as jnp

from p3o_jax import memory_plan
from p3o_jax import model as M
from p3o_jax.algos import ALGORITHMS, reward_model, sft
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_resolve import resolve
from p3o_jax.memory_plan import GIB, MemoryPlanError, shard_bytes
from p3o_jax.rl import RLIteration, frozen_policy, initial_params
from p3o_jax.sharding import batch_sharding, make_mesh, replicated
from p3o_jax.stage import sampling_config, supervised_step
from p3o_jax.train_state import MinibatchPlan, TrainState, param_shardings

PROGRAMS = ("sft_step", "rm_step", "rl_generate", "rl_score", "rl_update")
COLUMNS = ("program", "argument_gib", "output_gib", "alias_gib", "temp_gib", "xla_gib",
           "held_gib", "resident_gib", "plan_gib", "compile_s", "fits")
SPECS_DIR = os.path.join(os.path.dirname(__file__), "gpu_specs")


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice (`topology` as libtpu names it, `chip` its chip config) or an NVIDIA box
    (`topology` "slices x hosts x GPUs per host", `chip` a gpu_specs/ file)."""
    platform: str
    topology: str
    chip: str

    def spec(self) -> str:
        with open(os.path.join(SPECS_DIR, f"{self.chip}.txtpb")) as f:
            return f.read()

    def spec_memory(self) -> int:
        line = next(l for l in self.spec().splitlines() if "device_memory_size" in l)
        return int(line.split(":")[1])


TARGETS = {
    "v4-8": Target("tpu", "v4:2x2x1", "megacore"),
    "v4-16": Target("tpu", "v4:2x2x2", "megacore"),
    "v4-32": Target("tpu", "v4:2x2x4", "megacore"),
    "v5e-4": Target("tpu", "v5e:2x2", "default"),
    "v5e-8": Target("tpu", "v5e:2x4", "default"),
    "v5e-16": Target("tpu", "v5e:4x4", "default"),
    "v5e-32": Target("tpu", "v5e:4x8", "default"),
    "v5p-8": Target("tpu", "v5p:2x2x1", "megacore"),
    "v5p-16": Target("tpu", "v5p:2x2x2", "megacore"),
    "v6e-8": Target("tpu", "v6e:2x4", "default"),
    "h100-x1": Target("cuda", "1x1x1", "h100_sxm_80gb"),
    "h100-x8": Target("cuda", "1x1x8", "h100_sxm_80gb"),
    "h100-x16": Target("cuda", "1x2x8", "h100_sxm_80gb"),
    "a100-80gb-x1": Target("cuda", "1x1x1", "a100_sxm_80gb"),
    "a100-80gb-x8": Target("cuda", "1x1x8", "a100_sxm_80gb"),
}


# Where `make test` installs the compile-only compilers (requirements-compile.txt).
COMPILERS = os.path.join(sys.prefix, "compile-targets")


def add_compilers() -> None:
    """Put `COMPILERS` on the import path, after site-packages (a venv that has the plugins as
    its own runtime, `jax[tpu]` or `jax[cuda12]`, keeps them)."""
    if os.path.isdir(COMPILERS) and COMPILERS not in sys.path:
        sys.path.append(COMPILERS)
        importlib.invalidate_caches()


def cuda_topology(t: Target):
    """The CUDA plugin's compile-only topology of `t`. jax registers its plugins when it first
    starts a backend; a plugin put on the path after that (`add_compilers`) is registered
    here, by its own `initialize`."""
    from jax.experimental import topologies
    describe = lambda: topologies.get_topology_desc(platform="cuda", target_config=t.spec(),
                                                    topology=t.topology)
    try:
        return describe()
    except NotImplementedError:     # "topology not implemented for cuda": not registered
        importlib.import_module("jax_plugins.xla_cuda12").initialize()
        return describe()


def target_devices(name: str) -> list:
    """The devices of target `name` (TARGETS), described, not attached. ConfigError naming
    what to install when the compiler plugin is missing."""
    from jax.experimental import topologies
    add_compilers()
    t = TARGETS[name]
    # libtpu takes a machine-wide lock meant for attached chips; nothing is attached here, so
    # concurrent compiles (two test workers, a compile beside a test run) may share the host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if t.platform == "tpu":
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=t.topology, chip_config_name=t.chip,
                chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
        else:
            topo = cuda_topology(t)
    except Exception as e:   # the plugins raise RuntimeError / ValueError / XlaRuntimeError
        extra = ("libtpu" if t.platform == "tpu" else
                 "jax-cuda12-plugin and jax-cuda12-pjrt (and JAX_PLATFORMS=cpu)")
        raise ConfigError(f"config key 'target': {name} needs {extra} (`make test` installs "
                          f"them into {COMPILERS}): "
                          f"{str(e).strip().splitlines()[0]}") from e
    return list(topo.devices)


def hbm_bytes(name: str) -> int:
    """Memory per device of target `name`: the GPU spec's, or `memory_plan.SLICES`' GiB."""
    t = TARGETS[name]
    return t.spec_memory() if t.platform == "cuda" else int(memory_plan.SLICES[name][1] * GIB)


def abstract(shapes, shardings):
    """ShapeDtypeStructs of `shapes` (a pytree of arrays / ShapeDtypeStructs) placed by
    `shardings` (a matching pytree of NamedShardings)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def batch_of(shapes, mesh):
    """`shapes` placed as the loop places batches: leading axis over (data, fsdp), scalars
    replicated (`sharding.batch_sharding`)."""
    place = lambda x: batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place(x)),
                        shapes)


def nbytes(tree) -> int:
    """Bytes per device of a pytree of ShapeDtypeStructs with shardings."""
    return shard_bytes(tree, [x.sharding for x in jax.tree.leaves(tree)])


def tokens(mesh, *shape):
    """An int32 batch [shape] over the batch devices."""
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))


@dataclasses.dataclass
class Program:
    """A jitted program, its abstract arguments, and the stage's other resident bytes per
    device (`held`: alive but not arguments; minus arrays passed twice)."""
    fn: object
    args: tuple
    held: int
    plan: int          # the analytic estimate (memory_plan) of the same program


def program_plan(cfg: ExperimentConfig, n_devices: int, name: str) -> int:
    """The analytic plan's bytes per device of program `name` (PROGRAMS) of the resolved `cfg`:
    its stage's params, optimizer state, frozen models and FSDP-gathered blocks, plus the
    program's own term (a training step's temporaries, the KV cache, scoring's activations)."""
    stage = memory_plan.make_plan(cfg, n_devices, (name.split("_")[0],)).stages[0]
    own = {"rl_generate": stage.sampling, "rl_score": stage.scoring}.get(
        name, stage.step(cfg.policy.remat != "none"))
    return stage.params + stage.opt_state + stage.frozen + stage.gathered + own


def programs(cfg: ExperimentConfig, mesh, names=PROGRAMS) -> dict:
    """The loop's programs `names` for the resolved `cfg` on `mesh`, with abstract arguments
    (built outside `jax.set_mesh`: the rule table's eager helpers cannot run on a described
    mesh; lower them under it)."""
    plan = lambda name: program_plan(cfg, mesh.size, name)
    P, N = cfg.prompt_len, cfg.response_len
    L = P + N
    pol, rmc = cfg.policy, cfg.rm_model
    shapes = lambda c: jax.eval_shape(lambda: M.init_params(c, jax.random.key(0)))
    sft_params = abstract(shapes(pol), param_shardings(pol, mesh))
    out = {}
    for name, model_cfg, loss, c, batch in (
            ("sft_step", pol, sft.loss, cfg.sft,
             {k: tokens(mesh, cfg.sft.batch_size, L)
              for k in ("input_ids", "attention_mask", "loss_mask")}),
            ("rm_step", rmc, reward_model.loss, cfg.rm,
             {"tokens": tokens(mesh, cfg.rm.batch_size, 2, L),
              "mask": tokens(mesh, cfg.rm.batch_size, 2, L),
              "resp_mask": tokens(mesh, cfg.rm.batch_size, 2, N)})):
        if name not in names:
            continue
        step, tx, shardings = supervised_step(model_cfg, loss, c.optim, c.steps, mesh, batch)
        state = abstract(jax.eval_shape(lambda p: TrainState.create(p, tx), shapes(model_cfg)),
                         shardings)
        held = nbytes(sft_params) if name == "rm_step" else 0  # the SFT policy
        out[name] = Program(step, (state, batch), held, plan(name))
    if not set(names) & {"rl_generate", "rl_score", "rl_update"}:
        return out
    if ALGORITHMS[cfg.algo].offline:
        raise ConfigError(f"config key 'algo': {cfg.algo} is offline; compile_check compiles "
                          f"the online RL programs (leave out rl_* with programs=...)")
    padded = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, pack_prompts=False,
                                                             pack_responses=False))
    it = RLIteration(padded, mesh, sampling_config(cfg.rl, N, eos_ids=(0,)))
    rm_params = abstract(shapes(rmc), param_shardings(rmc, mesh))
    trained = jax.eval_shape(lambda p, r: initial_params(cfg, p, r), sft_params, rm_params)
    state = abstract(jax.eval_shape(lambda p: TrainState.create(p, it.tx), trained),
                     it.shardings)
    frozen = frozen_policy(cfg, sft_params)
    state_b, params_b, sft_b, rm_b, frozen_b = map(
        nbytes, (state, state.params, sft_params, rm_params, frozen))
    B = cfg.rl.prompts_per_iter
    prompts = {"ids": tokens(mesh, B, P), "mask": tokens(mesh, B, P)}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=replicated(mesh))
    generate = jax.jit(lambda t, f, pr, k: it.sample(it.params(t, f), pr, k))
    samples = batch_of(jax.eval_shape(generate, state.params, frozen, prompts, key), mesh)
    carry = it.algo.init_carry(cfg)
    score = jax.jit(lambda t, f, ref, rm, pr, s, c: it.score(it.params(t, f), ref, rm, pr, s, c))
    score_args = (state.params, frozen, sft_params, rm_params, prompts, samples, carry)
    buffer = batch_of(jax.eval_shape(score, *score_args)[0].replace(entropy=None), mesh)
    rl = cfg.rl
    minibatches = MinibatchPlan(jax.ShapeDtypeStruct(
        (rl.epochs * rl.minibatches, B // rl.minibatches), jnp.int32, sharding=replicated(mesh)))
    opt_b = state_b - params_b
    candidates = {
        # the optimizer state, the reference's part outside `frozen`, the reward model
        "rl_generate": Program(generate, (state.params, frozen, prompts, key),
                               opt_b + sft_b - frozen_b + rm_b, plan("rl_generate")),
        # the optimizer state; `frozen` is also inside the reference argument
        "rl_score": Program(score, score_args, opt_b - frozen_b, plan("rl_score")),
        # the reference's part outside `frozen`, the reward model
        "rl_update": Program(it.compile_update(buffer, minibatches),
                             (state, (buffer, minibatches), frozen), sft_b - frozen_b + rm_b,
                             plan("rl_update")),
    }
    out.update({k: v for k, v in candidates.items() if k in names})
    return out


def describe(cfg: ExperimentConfig) -> str:
    """What RL trains and how: full | lora-r8 | top2, with +remat-<policy>."""
    mode = (f"lora-r{cfg.rl.lora.rank}" if cfg.rl.lora.rank else
            f"top{cfg.rl.train_top_layers}" if cfg.rl.train_top_layers else "full")
    return mode + (f"+remat-{cfg.policy.remat}" if cfg.policy.remat != "none" else "")


# XLA:GPU's Triton gemm tiling fails on some large bf16 dots when compiling for a GPU that is
# not attached (Pythia-6.9B's SFT, RM, sampler and scoring programs: "INTERNAL: Couldn't find
# output tile sizes that satisfy ... dot"); with Triton gemms off cuBLAS takes those dots.
TRITON_GEMM_OFF = {"xla_gpu_enable_triton_gemm": False}


def compile_lowered(lowered):
    """`lowered.compile()`; (compiled, compiler options used: None, or TRITON_GEMM_OFF after
    XLA:GPU's Triton tiling failure)."""
    try:
        return lowered.compile(), None
    except Exception as e:       # XlaRuntimeError
        if "Couldn't find output tile sizes" not in str(e):
            raise
    return lowered.compile(compiler_options=TRITON_GEMM_OFF), TRITON_GEMM_OFF


def compile_program(program: Program, hbm: int) -> dict:
    """Lower and compile `program`; XLA's bytes per device, the resident total, the plan's
    estimate, compile seconds, and `fits` (with `why`, one line, when it does not);
    `compiler_options` when compiling needed some (`compile_lowered`)."""
    start = time.perf_counter()
    try:
        compiled, options = compile_lowered(program.fn.lower(*program.args))
    except Exception as e:       # XlaRuntimeError: RESOURCE_EXHAUSTED on TPU
        message = str(e).strip()
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        line = next(l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l)
        return dict(fits=False, why=line.strip()[:300], plan_gib=gib(program.plan),
                    compile_s=round(time.perf_counter() - start, 1))
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    xla = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
    resident = xla + program.held
    row = dict(argument_gib=gib(m.argument_size_in_bytes), output_gib=gib(m.output_size_in_bytes),
               alias_gib=gib(m.alias_size_in_bytes), temp_gib=gib(m.temp_size_in_bytes),
               xla_gib=gib(xla), held_gib=gib(program.held), resident_gib=gib(resident),
               plan_gib=gib(program.plan), compile_s=round(seconds, 1), fits=resident <= hbm)
    if options:
        row["compiler_options"] = " ".join(f"{k}={str(v).lower()}" for k, v in options.items())
    if not row["fits"]:
        row["why"] = (f"needs {resident / GIB:.2f} GiB per device (XLA {xla / GIB:.2f} + "
                      f"{program.held / GIB:.2f} held), over the {hbm / GIB:.2f} GiB of the device")
    return row


def gib(b: int) -> float:
    return round(b / GIB, 3)


def table(rows: list[dict]) -> str:
    """The rows' COLUMNS, aligned; a program that does not fit shows its reason below."""
    cells = [list(COLUMNS)] + [[str(r.get(c, "-")) for c in COLUMNS] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines += [f"{r['program']} does not fit: {r['why']}" for r in rows if not r["fits"]]
    return "\n".join(lines)


def check_run(cfg: ExperimentConfig, mesh, budget: int) -> list[dict]:
    """`dist.check_memory=true`, before anything trains: compile the programs of the stages
    `cfg` runs (resolved) for the run's own devices (`mesh`) and raise MemoryPlanError, with
    XLA's bytes per device of each, when one needs more than `budget` bytes per device. What
    no program here covers (an offline algorithm's update, the final evaluation) is checked
    against the analytic plan (`memory_plan.make_plan`). Returns the compiled programs' rows."""
    offline = ALGORITHMS[cfg.algo].offline
    names = [name for name in PROGRAMS
             if name.split("_")[0] in cfg.stage_list and not (offline and name[:3] == "rl_")]
    rows = []
    for name, program in programs(cfg, mesh, names).items():
        with jax.set_mesh(mesh):
            rows.append(dict(program=name, **compile_program(program, budget)))
    if not all(r["fits"] for r in rows):
        over = ", ".join(r["program"] for r in rows if not r["fits"])
        raise MemoryPlanError(
            f"{over} does not fit {budget / GIB:.4g} GiB per device on a "
            f"{memory_plan.mesh_text(mesh.shape)} mesh of {mesh.devices.flat[0].platform} "
            f"devices (XLA's compiled programs, p3o_jax/compile_check.py; GiB per device):\n"
            f"{table(rows)}\nSet policy.remat=block, rl.train_top_layers, rl.lora.rank (or "
            f"rl.sampler_gather_once=false for the sampler), raise rl.minibatches, lower the "
            f"batch sizes, or add devices or mesh.tensor.")
    rest = ("eval",) + (("rl",) if offline and "rl" in cfg.stage_list else ())
    memory_plan.make_plan(cfg, mesh.size, rest).check(budget, remat=cfg.policy.remat != "none")
    return rows


def compile_check(cfg: ExperimentConfig, target: str, names=PROGRAMS):
    """Compile the programs `names` of `cfg` (resolved here over the target's devices) for
    `target`; yields one result dict per program, as it is compiled."""
    devices = target_devices(target)
    cfg = resolve(cfg, len(devices))
    m = cfg.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    hbm = hbm_bytes(target)
    head = dict(target=target, devices=len(devices), hbm_gib=gib(hbm),
                mesh=f"{m.data}x{m.fsdp}x{m.tensor}", mode=describe(cfg), algo=cfg.algo,
                dtype=f"{cfg.policy.param_dtype}/{cfg.policy.dtype}")
    for name, program in programs(cfg, mesh, names).items():
        with jax.set_mesh(mesh):     # what the loop traces under (`sharding.constrain`)
            row = compile_program(program, hbm)
        yield dict(head, program=name, **row)
