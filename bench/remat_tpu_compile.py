"""XLA's memory analysis of the SFT gradient program, compiled for a TPU v5e-8 slice from a CPU
host, with and without per-block rematerialisation (`policy.remat`). Prints one JSON line per
policy. Needs libtpu (`make test` installs it for p3o_jax/compile_check.py), no TPU:

    PYTHONPATH=. .venv/bin/python bench/remat_tpu_compile.py [layers=12 d_model=768 heads=12]

XLA:CPU drops rematerialisation barriers when it fuses, so this host's own compiles show no
saving (tests/test_remat.py checks the recomputation in the lowered program instead).
"""
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from p3o_jax import model as M
from p3o_jax.algos import sft
from p3o_jax.compile_check import target_devices
from p3o_jax.sharding import logical_shardings


def main(argv):
    sizes = dict(layers=12, d_model=768, heads=12, batch=32, length=565)   # Pythia-160M, TL;DR
    sizes.update({k: int(v) for k, v in (a.split("=") for a in argv)})
    mesh = jax.sharding.Mesh(np.array(target_devices("v5e-8")).reshape(1, 8, 1),
                             ("data", "fsdp", "tensor"),
                             axis_types=(AxisType.Auto,) * 3)
    base = M.ModelConfig(family="gpt_neox", vocab_size=50304, d_model=sizes["d_model"],
                         n_layers=sizes["layers"], n_heads=sizes["heads"],
                         d_ff=4 * sizes["d_model"], max_len=2048, rotary_pct=0.25,
                         dtype="bfloat16")
    tokens = NamedSharding(mesh, P(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((sizes["batch"], sizes["length"]), jnp.int32,
                                     sharding=tokens)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    for remat in M.REMAT_POLICIES:
        cfg = dataclasses.replace(base, remat=remat)
        shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, logical_shardings(M.param_axes(cfg), mesh, shapes))
        start = time.time()
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(lambda p, b: sft.loss(p, b, cfg)[0]))
            memory = step.lower(params, batch).compile().memory_analysis()
        gib = lambda b: round(b / 2 ** 30, 3)
        print(json.dumps(dict(slice="v5e-8", **sizes, remat=remat,
                              compile_s=round(time.time() - start),
                              argument_gib=gib(memory.argument_size_in_bytes),
                              output_gib=gib(memory.output_size_in_bytes),
                              temp_gib=gib(memory.temp_size_in_bytes))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
