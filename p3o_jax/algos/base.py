"""What an RL algorithm is to the training loop: a minibatch loss and how it completes a
rollout buffer, plus the little state some carry between iterations."""
from __future__ import annotations

from typing import Callable, NamedTuple


def _unchanged(buffer, params, cfg, carry):
    return buffer


class Algorithm(NamedTuple):
    """One entry of `p3o_jax.algos.ALGORITHMS`. `cfg` below is the run's resolved
    `ExperimentConfig` (static), `params` the trained params `{"policy", ...}`.

    loss(params, batch, cfg) -> (loss, metrics): the minibatch objective to minimise, `batch` a
        minibatch of the prepared `rollout.Rollout` (offline algorithms: of their own data).
    prepare(buffer, params, cfg, carry) -> buffer: once per rollout buffer, inside the scoring
        program (P3O's Delta, PPO's values and GAE).
    init_carry(cfg) -> dict / next_carry(carry, metrics, cfg) -> dict: scalars the loop carries
        from one iteration to the next and checkpoints (PPO's adaptive KL coefficient).
    settings, config: the `ExperimentConfig` field holding its own config and that config's
        class (a frozen dataclass; None: it has none). `config.ExperimentConfig` gets the field
        from here: an algorithm's config group needs no edit of config.py.
    critic: a separate value model trains beside the policy (`params["critic"]`).
    offline: it trains on the reward model's preference data instead of sampling.
    """
    name: str
    loss: Callable
    prepare: Callable = _unchanged
    init_carry: Callable = lambda cfg: {}
    next_carry: Callable = lambda carry, metrics, cfg: carry
    settings: str | None = None
    config: type | None = None
    critic: bool = False
    offline: bool = False
