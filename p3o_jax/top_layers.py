"""Partial-layer training (`rl.train_top_layers` = N > 0): RL trains the top N blocks, the final
norm and an untied LM head; the embeddings and the blocks below stay frozen.

The params split by top-level key into the trained part and the frozen trunk; the update
differentiates the trained part only, so the backward pass stops at block L - N's input (no
activations of the trunk are kept) and the optimizer's moments cover the top only. A tied LM
head is the embedding table, which the trunk reads too: it stays frozen.

The RL reference needs nothing more: it is the SFT policy, whose trunk arrays are the frozen
part itself, so beside the shared trunk only the reference's own top blocks are held.
"""
from __future__ import annotations

HEAD = ("final_norm", "lm_head", "lm_head_bias")


def trained_keys(params: dict, n: int) -> tuple[str, ...]:
    """Top-level keys of the top `n` blocks, the final norm and (untied) LM head of `params`
    (a model's params, or any tree of the same top-level keys: shapes, shardings)."""
    layers = [k for k in params if k.startswith("layer_")]
    top = sorted(layers, key=lambda k: int(k[6:]))[len(layers) - n:]
    return tuple(top) + tuple(k for k in HEAD if k in params)


def split(params: dict, n: int) -> tuple[dict, dict]:
    """(trained, frozen): the top `n` blocks + head, and the rest. Leaves are shared."""
    keys = trained_keys(params, n)
    return ({k: v for k, v in params.items() if k in keys},
            {k: v for k, v in params.items() if k not in keys})


def join(trained: dict, frozen: dict) -> dict:
    """The whole params again (`split`'s inverse)."""
    return {**frozen, **trained}
