"""The algorithms, one module each (its config, its pure loss, how it prepares a rollout
buffer, its maths in the docstring): `p3o`, `ppo`, `dpo`, and the group-baseline methods
`rloo`, `grpo` (with Dr. GRPO's and DAPO's aggregations), `gspo`; and the objectives of the stages
before RL, `sft` and `reward_model`.

Adding an RL algorithm: a module that builds an `Algorithm` (algos/base.py), with its config
class and group name if it has one (`settings="p3o", config=P3OConfig`: the keys `p3o.*`), and a
line in `ALGORITHMS`. Nothing else changes: `config.ExperimentConfig` takes its algorithm
groups from here.
"""
from p3o_jax.algos import dpo, grpo, gspo, p3o, ppo, rloo
from p3o_jax.algos.base import Algorithm

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    p3o.ALGORITHM,
    ppo.ALGORITHM,
    dpo.ONLINE,
    dpo.OFFLINE,
    rloo.ALGORITHM,
    grpo.ALGORITHM,
    gspo.ALGORITHM,
)}
