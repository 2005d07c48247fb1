"""LoRA: rank-r adapters on the attention and MLP projections (`rl.lora`), what RL trains
instead of the policy when `rl.lora.rank` > 0.

An adapter of weight W [in.., out..] is A [in.., r] (random) and B [r, out..] (zero), so fresh
adapters leave the model exactly as it was; the adapted projection is

    x W + (alpha / r) (x A) B

Adapters live beside their weight in the params tree: `layer_i/attn/lora_a_wq` and
`lora_b_wq`, ... (`join`); the model adds the low-rank term wherever a weight has them
(`model._adapted`), so the same forward, sampler and losses run the base (no adapters: the
frozen SFT policy, which is also the RL reference: no second copy of the model) and the
adapted policy. The scale is folded into B when joining, so a joined tree is self-describing:
`merge` folds it into the weights (W + A B') for the checkpoint and the HF export.

Shapes: D d_model, H heads, K kv heads, E head dim, F MLP width, r rank.

| target    | weight       | A          | B            |
|-----------|--------------|------------|--------------|
| `q`       | attn/wq      | [D, r]     | [r, H, E]    |
| `k`, `v`  | attn/wk, wv  | [D, r]     | [r, K, E]    |
| `o`       | attn/wo      | [H, E, r]  | [r, D]       |
| `mlp_in`  | mlp/w_in     | [D, r]     | [r, F]       |
| `mlp_up`  | mlp/w_up     | [D, r]     | [r, F]       |  (gated MLPs only)
| `mlp_out` | mlp/w_out    | [F, r]     | [r, D]       |
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated

import jax
import jax.numpy as jnp

from p3o_jax.checks import NonNegative, Positive, SubsetOf

# target -> (module, weight, number of input dims of the weight)
TARGETS = {"q": ("attn", "wq", 1), "k": ("attn", "wk", 1), "v": ("attn", "wv", 1),
           "o": ("attn", "wo", 2), "mlp_in": ("mlp", "w_in", 1), "mlp_up": ("mlp", "w_up", 1),
           "mlp_out": ("mlp", "w_out", 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: Annotated[int, NonNegative] = 0       # r; 0: off (RL trains the whole policy)
    alpha: Annotated[float, Positive] = 16.0    # the adapters' output is scaled by alpha / r
    targets: Annotated[str, SubsetOf(*TARGETS)] = ",".join(TARGETS)  # comma-separated; those
                                    # the model has (mlp_up: gated MLPs only)
    lr: Annotated[float | None, Positive] = 1e-3  # RL's learning rate with adapters (instead of
                                    # rl.optim.lr, tuned for the whole model); none: rl.optim.lr

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets.split(",") if t)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _layers(params: dict) -> list[str]:
    return sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))


def adapted_weights(cfg: LoraConfig, params: dict) -> list[tuple[str, str, str, int]]:
    """(layer, module, weight, input dims) of every weight of `params` that `cfg` adapts."""
    return [(layer, *TARGETS[t]) for layer in _layers(params) for t in cfg.target_list
            if TARGETS[t][1] in params[layer].get(TARGETS[t][0], {})]


def init(cfg: LoraConfig, base: dict, key: jax.Array) -> dict:
    """Fresh adapters for `base` (model params, or their shapes): {layer: {module: {"lora_a_<w>":
    A, "lora_b_<w>": B}}}, A ~ U(+-1/sqrt(fan_in)) (PEFT's), B = 0, in W's dtype."""
    adapters = {}
    for i, (layer, module, name, n_in) in enumerate(adapted_weights(cfg, base)):
        w = base[layer][module][name]
        a_shape, b_shape = (*w.shape[:n_in], cfg.rank), (cfg.rank, *w.shape[n_in:])
        bound = 1.0 / math.sqrt(math.prod(w.shape[:n_in]))
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        adapters.setdefault(layer, {}).setdefault(module, {}).update({
            "lora_a_" + name: a.astype(w.dtype), "lora_b_" + name: jnp.zeros(b_shape, w.dtype)})
    return adapters


def join(cfg: LoraConfig, adapters: dict, base: dict) -> dict:
    """The adapted policy: `base` with the adapters beside their weights, B scaled by
    alpha / r. The base's arrays are shared, not copied."""
    params = dict(base)
    for layer, modules in adapters.items():
        params[layer] = dict(base[layer])
        for module, leaves in modules.items():
            params[layer][module] = dict(base[layer][module], **{
                k: (v * cfg.scale).astype(v.dtype) if k.startswith("lora_b_") else v
                for k, v in leaves.items()})
    return params


def merge(params: dict) -> dict:
    """Plain model params: each adapter folded into its weight, W + A B (in float32, then W's
    dtype), and removed. A tree without adapters comes back unchanged."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = merge(v)
        elif k.startswith("lora_"):
            continue
        elif "lora_a_" + k in params:
            a, b = params["lora_a_" + k], params["lora_b_" + k]
            delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), 1)
            out[k] = (v.astype(jnp.float32) + delta).astype(v.dtype)
        else:
            out[k] = v
    return out
