"""XLA's memory analysis of the compiled RL update (`RLIteration.apply`: P3O, E epochs x M
minibatches, state donated) for full fine-tuning, LoRA (`rl.lora.rank`) and the top N layers
(`rl.train_top_layers`), at one model size. Compiles only (nothing runs), on this host's
default backend (CPU is fine). Prints one JSON line per mode:

    PYTHONPATH=. python bench/finetune_memory.py [layers=12 d_model=768 heads=12 vocab=50304
        prompts=16 prompt_len=128 response_len=64 rank=8 top=2]

argument = what the update reads (train state, buffer, and the frozen part of the policy, passed
as a separate, non-donated argument); temp = XLA's temporaries (activations kept for the
backward pass, gradients, optimizer scratch). The RL reference is not an argument of the update:
under LoRA it is the frozen base itself and under top-N it shares the frozen trunk, so a full
fine-tune holds one more copy of the policy besides (`ref_extra_mib`).
"""
import json
import math
import sys

import jax

from p3o_jax import config as C
from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax import model as M
from p3o_jax.rl import RLIteration, initial_params, split_policy
from p3o_jax.sampler import SamplingConfig
from p3o_jax.sharding import make_mesh
from p3o_jax.train_state import MinibatchPlan, TrainState, jit_step

MIB = 2 ** 20


def experiment(sizes: dict, mode: str) -> C.ExperimentConfig:
    s = sizes
    args = ["exp=toy", "policy.family=gpt_neox", f"policy.n_layers={s['layers']}",
            f"policy.d_model={s['d_model']}", f"policy.n_heads={s['heads']}",
            f"policy.vocab_size={s['vocab']}", "policy.max_len=2048", "policy.rotary_pct=0.25",
            f"toy.prompt_len={s['prompt_len']}", f"toy.response_len={s['response_len']}",
            f"rl.prompts_per_iter={s['prompts']}", "rl.epochs=4", "rl.minibatches=1",
            "rl.pack_prompts=false"]   # packed rows depend on the prompts: padded is the bound
    args += {"full": [], "lora": [f"rl.lora.rank={s['rank']}"],
             "top": [f"rl.train_top_layers={s['top']}"]}[mode]
    return config_resolve.resolve(config_args.from_args(args), jax.device_count())


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(sizes: dict, mode: str) -> dict:
    cfg = experiment(sizes, mode)
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        it = RLIteration(cfg, mesh, SamplingConfig(max_new_tokens=cfg.response_len))
        sft = jax.eval_shape(lambda: M.init_params(cfg.policy, jax.random.key(0)))
        trained = jax.eval_shape(lambda p: initial_params(cfg, p, p), sft)
        state = jax.eval_shape(lambda p: TrainState.create(p, it.tx), trained)
        frozen = jax.eval_shape(lambda p: split_policy(cfg, p)[1], sft)
        B, P = cfg.rl.prompts_per_iter, cfg.prompt_len
        prompts = {"ids": jax.ShapeDtypeStruct((B, P), "int32"),
                   "mask": jax.ShapeDtypeStruct((B, P), "int32")}
        samples = jax.eval_shape(lambda t, f, pr: it.sample(it.params(t, f), pr,
                                                            jax.random.key(0)),
                                 trained, frozen, prompts)
        carry = it.algo.init_carry(cfg)
        buffer, _ = jax.eval_shape(
            lambda t, f, ref, pr, s: it.score(it.params(t, f), ref, ref, pr, s, carry),
            trained, frozen, sft, prompts, samples)
        buffer = buffer.replace(entropy=None)       # as `RLIteration.__call__` hands it over
        rl = cfg.rl
        plan = MinibatchPlan(jax.ShapeDtypeStruct((rl.epochs * rl.minibatches,
                                                   B // rl.minibatches), "int32"))
        update = jit_step(it._update, it.shardings, (buffer, plan), mesh, it.frozen_shardings)
        memory = update.lower(state, (buffer, plan), frozen).compile().memory_analysis()
    mib = lambda b: round(b / MIB, 1)
    return dict(mode=mode, **sizes,
                trained_params_m=round(sum(math.prod(x.shape) for x in
                                           jax.tree.leaves(state.params)) / 1e6, 2),
                argument_mib=mib(memory.argument_size_in_bytes),
                output_mib=mib(memory.output_size_in_bytes),
                alias_mib=mib(memory.alias_size_in_bytes),
                temp_mib=mib(memory.temp_size_in_bytes),
                state_mib=mib(nbytes(state)), frozen_mib=mib(nbytes(frozen)),
                ref_extra_mib=mib({"full": nbytes(sft), "lora": 0,
                                   "top": nbytes(state.params)}[mode]))


def main(argv):
    sizes = dict(layers=12, d_model=768, heads=12, vocab=50304, prompts=16, prompt_len=128,
                 response_len=64, rank=8, top=2)
    sizes.update({k: int(v) for k, v in (a.split("=") for a in argv)})
    for mode in ("full", "lora", "top"):
        print(json.dumps(measure(sizes, mode)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
