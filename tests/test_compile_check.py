"""Real compiles for a TPU v5e-8 slice and an 8 x H100 box on this CPU host
(p3o_jax/compile_check.py): the loop's programs of a tiny config compile with the rule
table's shardings on the target's devices, XLA's memory analysis covers their arguments, and an
oversized config is rejected with one clear line on both compilers.

Needs libtpu and jax-cuda12-plugin / jax-cuda12-pjrt, which `make test` installs
(requirements-compile.txt) into compile_check's own folder; each half skips, saying which
package is missing, only when it is not installed.
"""
import importlib.util
import re

import jax
import pytest

from p3o_jax import model as M
from p3o_jax import rollout
from p3o_jax.cli import compile_check as cli
from p3o_jax.compile_check import (PROGRAMS, TRITON_GEMM_OFF, add_compilers, check_run,
                                   compile_lowered, hbm_bytes, nbytes, programs, target_devices)
from p3o_jax.config_args import from_args
from p3o_jax.config_resolve import resolve
from p3o_jax.memory_plan import GIB, MemoryPlanError
from p3o_jax.sharding import make_mesh

add_compilers()
HAVE = {"v5e-8": importlib.util.find_spec("libtpu") is not None,
        "h100-x8": importlib.util.find_spec("jax_cuda12_plugin") is not None}
MISSING = {"v5e-8": "libtpu (jax[tpu]==0.10.2) is not installed",
           "h100-x8": "jax-cuda12-plugin / jax-cuda12-pjrt 0.10.2 are not installed"}
TARGETS = [pytest.param(t, marks=pytest.mark.skipif(not HAVE[t], reason=MISSING[t]))
           for t in HAVE]
PLATFORM = {"v5e-8": "tpu", "h100-x8": "gpu"}

# the toy experiment with a vocabulary of a real tokenizer's size, 4 layers and LoRA: small
# enough to compile in seconds, sharded over 8 devices like a real run
TINY = ["exp=toy", "policy.vocab_size=1024", "policy.n_layers=4", "rl.prompts_per_iter=16",
        "rl.lora.rank=4"]


def tiny_mesh(devices, args=TINY):
    cfg = resolve(from_args(args), len(devices))
    return cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)


def tiny_programs(devices, names):
    cfg, mesh = tiny_mesh(devices)
    return cfg, mesh, programs(cfg, mesh, names)


@pytest.mark.parametrize("target", TARGETS)
def test_programs_compile_sharded_by_the_rule_table(target):
    cfg, mesh, progs = tiny_programs(target_devices(target),
                                     ("sft_step", "rl_generate", "rl_update"))
    assert mesh.devices.size == 8 and mesh.shape["fsdp"] == 8
    assert {d.platform for d in mesh.devices.flat} == {PLATFORM[target]}
    for name, program in progs.items():
        with jax.set_mesh(mesh):
            compiled = program.fn.lower(*program.args).compile()
        memory = compiled.memory_analysis()
        arrays = [x for x in jax.tree.leaves(program.args)
                  if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
        # XLA's arguments are every argument's shard (jit drops unused leaves such as the
        # reward head from the sampler; TPU pads small arrays)
        assert memory.argument_size_in_bytes >= 0.99 * nbytes(arrays), name
        if name == "rl_update" and target != "v5e-8":   # activations and gradients (a
            assert memory.temp_size_in_bytes > 0, name  # TPU core keeps this tiny one on chip)
        if name == "rl_generate":      # shardings come from the abstract arguments
            trained, frozen = compiled.input_shardings[0][:2]
            embed = frozen["embed"]
        else:                          # jit_step's: the train state's
            state = compiled.input_shardings[0][0]
            embed = (state.params["embed"] if name == "sft_step"
                     else compiled.input_shardings[0][2]["embed"])   # frozen base
        # the rule table: ("vocab", "embed") -> (tensor, fsdp); fsdp = 8 splits d_model
        assert embed.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), (name, embed.spec)
        assert embed.shard_shape((cfg.policy.vocab_size, cfg.policy.d_model)) == (
            cfg.policy.vocab_size, cfg.policy.d_model // 8)
        assert embed.mesh.devices.flat[0].platform == PLATFORM[target]
    # LoRA: the donated state holds the adapters only (replicated: new leaves have no logical
    # axes); the base is a separate, read argument, sharded like the SFT policy
    state, _, frozen = progs["rl_update"].args
    adapters = jax.tree_util.tree_leaves_with_path(state.params)
    assert adapters and all(str(path[-1].key).startswith("lora_") and x.sharding.is_fully_replicated
                            for path, x in adapters)
    assert frozen["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize("target", TARGETS)
def test_oversized_config_is_rejected_in_one_line(target, capsys):
    # 6 blocks of width 16384: 19 B params; float32 params and AdamW moments alone are 27 GiB
    # per device under FSDP over 8, and XLA's temporaries hold an unsharded float32 copy of
    # the weights (72 GiB): over a v5e's 16 GiB and an H100's 79 GiB. (Sequences of 32
    # tokens: with 29, 232-row dots this wide fail XLA:GPU's deviceless Triton tiling.)
    argv = ["exp=toy", "policy.d_model=16384", "policy.n_heads=128", "policy.n_layers=6",
            "toy.response_len=13",
            f"target={target}", "programs=sft_step"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if "does not fit:" in l]
    assert len(lines) == 1, out
    if target == "v5e-8":          # the TPU compiler refuses it
        assert "RESOURCE_EXHAUSTED" in lines[0] and "HBM" in lines[0]
    else:                          # XLA:GPU compiles it; the check compares with the card
        assert f"over the {hbm_bytes(target) / 2**30:.2f} GiB of the device" in lines[0]


def test_unknown_program_and_target_name_the_key(capsys):
    assert cli.main(["exp=toy", "programs=rl_train"]) == 2
    assert "config key 'programs'" in capsys.readouterr().err
    assert cli.main(["exp=toy", "target=v9-8"]) == 2
    assert "target" in capsys.readouterr().err


def test_check_memory_compiles_the_runs_own_programs():
    # dist.check_memory on the run's devices (8 CPU devices here): each program of the stages
    # the run has, compiled; a budget between two programs' needs stops the run naming the
    # ones over it, with XLA's table
    cfg = resolve(from_args(TINY), jax.device_count())
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rows = check_run(cfg, mesh, 64 * GIB)
    assert [r["program"] for r in rows] == list(PROGRAMS)
    assert all(r["fits"] and r["xla_gib"] > 0 for r in rows)
    need = sorted(r["resident_gib"] for r in rows if r["program"].startswith("rl_"))
    assert need[-2] < need[-1], need
    top = max(rows, key=lambda r: r["resident_gib"] * r["program"].startswith("rl_"))["program"]
    # only the stages the run has (stages=rl: the RL programs)
    rl_only = resolve(from_args(TINY + ["stages=rl"]), jax.device_count())
    with pytest.raises(MemoryPlanError) as e:
        check_run(rl_only, mesh, int((need[-2] + need[-1]) / 2 * GIB))
    message = str(e.value)
    assert message.startswith(f"{top} does not fit") and f"{top} does not fit: needs" in message
    assert "mesh of cpu devices (XLA's compiled programs" in message.splitlines()[0]
    table = message.split("GiB per device):\n")[1]
    assert "temp_gib" in table and "rl_generate" in table and "sft_step" not in table
    # an offline algorithm's update and the evaluation are the analytic plan's, which a budget
    # below the evaluation's KV cache fails
    dpo = resolve(from_args(TINY + ["algo=dpo_offline", "stages=rl"]), jax.device_count())
    assert check_run(dpo, mesh, 64 * GIB) == []
    with pytest.raises(MemoryPlanError, match="stage eval, rl needs"):
        check_run(dpo, mesh, 1024)


@pytest.mark.parametrize("target", TARGETS)
def test_cpu_and_accelerator_programs_get_their_own_rewrites(target):
    # model.stored_cotangent's conditional is an XLA:CPU fusion workaround: a program lowered
    # for a TPU or GPU mesh from this CPU host has none, the same program for CPUs has it; the
    # weight/activation tie (model.fetched_after's barriers) the other way round
    conditionals, barriers = {}, {}
    for platform, devices in (("target", target_devices(target)), ("cpu", jax.devices()[:8])):
        _, mesh, progs = tiny_programs(devices, ("sft_step",))
        with jax.set_mesh(mesh):
            text = progs["sft_step"].fn.lower(*progs["sft_step"].args).as_text()
        conditionals[platform] = text.count("stablehlo.case") + text.count("stablehlo.if")
        barriers[platform] = text.count("stablehlo.optimization_barrier")
    assert conditionals["target"] == 0 and conditionals["cpu"] > 0, conditionals
    assert barriers["target"] > 0 and barriers["cpu"] == 0, barriers


# a toy config 8 blocks deep and 1024 wide: what the weight/activation ties save shows
WIDE = ["exp=toy", "policy.vocab_size=1024", "policy.n_layers=8", "policy.d_model=1024",
        "rl.prompts_per_iter=16"]


def temp_bytes(cfg, mesh, name) -> int:
    """XLA's temporaries of program `name`, traced anew (jit would reuse an earlier trace)."""
    program = programs(cfg, mesh, (name,))[name]
    with jax.set_mesh(mesh):
        return program.fn.lower(*program.args).compile().memory_analysis().temp_size_in_bytes


# The ties that order XLA's schedule on TPU and GPU, each on the program it is for: (program,
# config, the tied function, its untied stand-in, most tied / untied temporaries on 8 x H100
# and v5e-8).
# - model.fetched_after ties each block's weights to the previous block's input. Without it
#   XLA gathers the frozen trunk's weights of a top-1 update (nothing in the update's loop
#   changes them) as early as it likes, all alive at once (measured: 214 vs 335 MiB on
#   8 x H100, 42 vs 51 MiB on v5e-8).
# - rollout.after_previous_model orders scoring's reference after the policy's results and
#   the reward model after the reference's: each model's prompt pass keeps every layer's keys
#   and values for its response pass, and one model's are alive at a time (measured: 196 vs
#   522 MiB on 8 x H100, 34 vs 279 MiB on v5e-8).
TIES = {
    "frozen_trunk_waits_for_its_block": (
        "rl_update", ["rl.train_top_layers=1"], (M, "fetched_after"), lambda w, x: w,
        {"h100-x8": 0.75, "v5e-8": 0.9}),
    "scoring_runs_one_model_at_a_time": (
        "rl_score", ["rl.recompute_logp_old=true"], (rollout, "after_previous_model"),
        lambda params, previous: params, {"h100-x8": 0.75, "v5e-8": 0.75}),
}


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("target", TARGETS)
def test_ties_hold_fewer_temporaries(target, tie, monkeypatch):
    name, extra, (module, attr), untied_fn, most = TIES[tie]
    # a toy config 8 blocks deep and 1024 wide, where what the ties save shows
    cfg, mesh = tiny_mesh(target_devices(target),
                          ["exp=toy", "policy.vocab_size=1024", "policy.n_layers=8",
                           "policy.d_model=1024", "rl.prompts_per_iter=16"] + extra)
    tied = temp_bytes(cfg, mesh, name)
    monkeypatch.setattr(module, attr, untied_fn)
    assert tied < most[target] * temp_bytes(cfg, mesh, name), tied


def _loop_collectives(hlo: str) -> dict:
    """{while loop body: the all-gather instructions (XLA combines several into one) it or
    what it calls runs per iteration} of an optimized HLO module's text."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)

    def gathers(comp, seen):
        seen.add(comp)
        body = "\n".join(computations.get(comp, ()))
        called = set(re.findall(r"(?:calls|body|condition|to_apply|branch_computations)="
                                r"\{?%([\w.\-]+)", body)) - seen
        return (len(re.findall(r" all-gather(?:-start)?\(", body))
                + sum(gathers(c, seen) for c in called))
    bodies = {b for lines in computations.values() for l in lines
              for b in re.findall(r" while\(.*body=%([\w.\-]+)", l)}
    return {b: gathers(b, set()) for b in bodies}


@pytest.mark.parametrize("target", TARGETS)
def test_decode_loop_reads_weights_gathered_once(target):
    # rl.sampler_gather_once (the default): the sampler all-gathers the policy over fsdp once
    # per call, so its decode loop runs no collective on weights; without it each decode step
    # gathers every block's weights again (model.fetched_after keeps them in the loop)
    counts = {}
    for once in ("true", "false"):
        cfg, mesh = tiny_mesh(target_devices(target), TINY + [f"rl.sampler_gather_once={once}"])
        program = programs(cfg, mesh, ("rl_generate",))["rl_generate"]
        with jax.set_mesh(mesh):
            counts[once] = _loop_collectives(program.fn.lower(*program.args).compile().as_text())
    assert len(counts["true"]) == len(counts["false"]) >= 1, counts
    assert sum(counts["true"].values()) == 0 < min(counts["false"].values()), counts


def test_triton_tiling_failure_compiles_again_without_triton_gemms():
    # the Pythia-6.9B SFT / RM / sampler / scoring programs fail XLA:GPU's Triton gemm tiling
    # when cross-compiled; compile_lowered compiles them again with cuBLAS gemms, and says so
    class Lowered:
        def __init__(self, error):
            self.error, self.calls = error, []

        def compile(self, compiler_options=None):
            self.calls.append(compiler_options)
            if compiler_options is None:
                raise RuntimeError(self.error)
            return "compiled"

    tiling = Lowered("INTERNAL: Couldn't find output tile sizes that satisfy hlo %dot.1 = "
                     "bf16[2256,4096]{1,0} dot(...)")
    assert compile_lowered(tiling) == ("compiled", TRITON_GEMM_OFF)
    assert tiling.calls == [None, TRITON_GEMM_OFF]
    other = Lowered("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        compile_lowered(other)
    assert other.calls == [None]


@pytest.mark.skipif(not HAVE["h100-x8"], reason=MISSING["h100-x8"])
def test_triton_gemm_off_is_an_option_xla_gpu_reads():
    # the fallback's option is real: the same program's dots become cuBLAS calls
    _, mesh, progs = tiny_programs(target_devices("h100-x8"), ("sft_step",))
    with jax.set_mesh(mesh):
        lowered = progs["sft_step"].fn.lower(*progs["sft_step"].args)
        triton, cublas = (lowered.compile(compiler_options=o).as_text()
                          for o in (None, TRITON_GEMM_OFF))
    assert "__triton_nested_gemm_fusion" in triton and "__cublas$lt$matmul" not in triton
    assert "__triton_nested_gemm_fusion" not in cublas and "__cublas$lt$matmul" in cublas
