"""A decoder-only transformer in Flax linen, used as pure functions of (params, inputs).

Five families share one trunk, selected by `ModelConfig.family`, which sets the defaults of the
fields that differ (every difference is a config field, so a checkpoint may mix them):

| family     | positions                | norm          | MLP          | residual           | head     |
|------------|--------------------------|---------------|--------------|--------------------|----------|
| `gpt2`     | learned table            | LayerNorm     | GELU (tanh)  | serial             | tied     |
| `gpt_neox` | partial rotary           | LayerNorm     | GELU         | parallel, 2 norms  | untied   |
| `gptj`     | partial rotary, pairs    | LayerNorm     | GELU (tanh)  | parallel, 1 norm   | + bias   |
| `llama`    | rotary (scaled)          | RMSNorm       | SwiGLU, GQA  | serial             | either   |
| `gemma`    | rotary, local theta      | RMSNorm (1+w) | GeGLU, GQA   | serial, post-norms | tied     |

`llama` covers Llama 2/3 (`rope_scaling`), Qwen2 (`qkv_bias`), Qwen3 (`qk_norm`) and Mistral
(`sliding_window`); `gemma` covers Gemma 2 (soft-capping) and Gemma 3 (`qk_norm`,
`rope_local_theta`), both with alternating sliding-window / global layers (`sliding_layers`).
On the trunk sit three heads: LM logits, a scalar reward per token (read at the last real token
by `reward_at_last_token`) and a per-token value. Params are a plain pytree whose leaves carry
logical axis names (`param_axes`); compute runs in `cfg.dtype`, params stay in `cfg.param_dtype`.

Shapes: B batch, T query length, S key length (= T, or the KV-cache length), D d_model,
H heads, K kv heads, E head dim, F MLP width, V vocab.

Padding convention: `mask[b, t] = 1` marks a real token. Prompts are left-padded, responses
right-padded; positions count real tokens only (`positions_from_mask`), and attention never looks
at a pad key, so a left-padded row gives the same logits as the unpadded one. A sliding window
counts sequence slots (as transformers does); real tokens are contiguous in every layout we use
([left pads | prompt | response | right pads]), so slots and positions differ by a constant.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax.checks import OneOf, Positive, Probability, field_checks
from p3o_jax.ops import last_token_index
from p3o_jax.sharding import constrain

FAMILIES = ("gpt2", "gpt_neox", "gptj", "llama", "gemma")
NORMS = ("layer", "rms", "rms_plus_one")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
# what a rematerialised block keeps for its backward pass (jax.checkpoint policies)
REMAT_POLICIES = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
KV_CACHE_AXES = ("act_batch", "act_kv_heads", "act_length", "act_head_dim")  # [B, K, S, E]
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def _frozen(value):
    """dicts and lists (from JSON or HF) -> nested tuples, so that the config stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; `family` picks the defaults of the table above."""
    family: Annotated[str, OneOf(*FAMILIES)] = "gpt2"
    vocab_size: Annotated[int, Positive] = 256
    d_model: Annotated[int, Positive] = 64
    n_layers: Annotated[int, Positive] = 2
    n_heads: Annotated[int, Positive] = 4
    n_kv_heads: Annotated[int | None, Positive] = None   # None: = n_heads (no GQA)
    head_dim: Annotated[int | None, Positive] = None     # None: d_model // n_heads
    d_ff: Annotated[int | None, Positive] = None         # None: 4 * d_model
    max_len: Annotated[int, Positive] = 1024             # learned position table size (gpt2)
    norm_eps: Annotated[float, Positive] = 1e-5
    activation: Annotated[str | None, OneOf(*ACTIVATIONS)] = None   # None: family default
    rotary_pct: Annotated[float, Probability] = 1.0      # fraction of head_dim rotated
    rope_theta: Annotated[float, Positive] = 10000.0
    # transformers' `rope_parameters` besides rope_theta: (("factor", 8.0), ("rope_type",
    # "llama3"), ...); () is plain RoPE. See `rope_frequencies`. Set from config.json only.
    rope_scaling: tuple = ()
    rope_local_theta: Annotated[float | None, Positive] = None  # sliding-window layers' (Gemma 3)
    rope_interleaved: bool | None = None    # rotate (x0, x1), (x2, x3).. pairs (GPT-J), not halves
    parallel_residual: bool | None = None
    shared_block_norm: bool | None = None   # parallel attention and MLP read one norm (GPT-J)
    norm: Annotated[str | None, OneOf(*NORMS)] = None   # layer | rms | rms_plus_one (Gemma: 1 + w)
    post_norms: bool | None = None      # also norm the attention and MLP outputs (Gemma)
    qk_norm: bool = False               # per-head norm of q and k before rotary (Qwen3, Gemma 3)
    gated_mlp: bool | None = None       # act(x W_in) * (x W_up) (SwiGLU / GeGLU)
    embed_scale: bool | None = None     # multiply embeddings by sqrt(d_model) (Gemma)
    tie_embeddings: bool | None = None
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    lm_head_bias: bool | None = None    # GPT-J
    sliding_window: Annotated[int | None, Positive] = None  # a query sees the keys at most this
                                        # many slots back,
    sliding_layers: tuple | None = None  # in these layers (None: all, when the window is set)
    query_pre_attn_scalar: Annotated[float | None, Positive] = None  # scores scaled by its
                                        # ** -0.5 (None: head_dim)
    attn_softcap: Annotated[float | None, Positive] = None  # scores -> cap tanh(scores / cap)
    final_softcap: Annotated[float | None, Positive] = None  # the same on the LM logits
    dtype: Annotated[str, OneOf(*DTYPES)] = "float32"    # compute dtype
    param_dtype: Annotated[str, OneOf(*DTYPES)] = "float32"
    remat: Annotated[str, OneOf(*REMAT_POLICIES)] = "none"  # per-block rematerialisation of
                                        # training forwards: none | block (keep each block's
                                        # input, recompute the rest in the backward pass) |
                                        # save_matmuls (keep the matmul outputs too)

    def __post_init__(self):
        for key, checks in field_checks(ModelConfig).items():    # before anything is derived
            value = getattr(self, key)
            for check in checks if value is not None else ():
                if problem := check.problem(value):
                    raise ValueError(f"model.{key}: {problem}")
        for name in ("rope_scaling", "sliding_layers"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        derived = {k: v for k, v in self.derived_defaults().items() if getattr(self, k) is None}
        for k, v in derived.items():
            object.__setattr__(self, k, v)
        # not a dataclass field: it stays out of ==, hash and asdict (the saved config)
        object.__setattr__(self, "_derived", frozenset(derived))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                             f"model.n_kv_heads={self.n_kv_heads}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling: rope_type {rope_type!r} is not supported; "
                             f"expected one of {ROPE_TYPES}")
        try:
            rope_frequencies(self)
        except KeyError as e:
            raise ValueError(f"model.rope_scaling: rope_type {rope_type!r} needs {e}") from None
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers) or (
                self.sliding_layers and not self.sliding_window):
            raise ValueError(f"model.sliding_layers: {self.sliding_layers} needs a "
                             f"sliding_window and layers in [0, {self.n_layers})")

    def derived_defaults(self) -> dict:
        """The values the `None` fields take, from `family`, `d_model`, `n_heads` and
        `sliding_window`."""
        serial = dict(parallel_residual=False, shared_block_norm=False)
        plain = dict(post_norms=False, embed_scale=False, rope_interleaved=False,
                     lm_head_bias=False)
        return dict(n_kv_heads=self.n_heads, head_dim=self.d_model // self.n_heads,
                    d_ff=4 * self.d_model,
                    sliding_layers=tuple(range(self.n_layers)) if self.sliding_window else (),
                    **{
            "gpt2": dict(serial, **plain, activation="gelu_new", norm="layer", gated_mlp=False,
                         tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True),
            "gpt_neox": dict(plain, activation="gelu", norm="layer", gated_mlp=False,
                             parallel_residual=True, shared_block_norm=False,
                             tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True),
            "gptj": dict(activation="gelu_new", norm="layer", gated_mlp=False,
                         parallel_residual=True, shared_block_norm=True, post_norms=False,
                         embed_scale=False, rope_interleaved=True, lm_head_bias=True,
                         tie_embeddings=False, qkv_bias=False, out_bias=False, mlp_bias=True),
            "llama": dict(serial, **plain, activation="silu", norm="rms", gated_mlp=True,
                          tie_embeddings=False, qkv_bias=False, out_bias=False, mlp_bias=False),
            "gemma": dict(serial, activation="gelu_pytorch_tanh", norm="rms_plus_one",
                          gated_mlp=True, post_norms=True, embed_scale=True,
                          rope_interleaved=False, lm_head_bias=False, tie_embeddings=True,
                          qkv_bias=False, out_bias=False, mlp_bias=False),
        }[self.family])

    def rebased(self, **changes) -> "ModelConfig":
        """`dataclasses.replace` that derives again the fields this config derived (left None
        when it was built): `rebased(d_model=256)` of a d_model-128 config gets head_dim and d_ff
        from 256; fields that were given keep their values."""
        unset = {k: None for k in self._derived if k not in changes}
        return dataclasses.replace(self, **unset, **changes)

    @property
    def rotary_dim(self) -> int:
        return 0 if self.family == "gpt2" else int(self.head_dim * self.rotary_pct)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count of the LM (trunk + LM head), without the scalar heads."""
        shapes = jax.eval_shape(lambda: init_params(self, jax.random.key(0)))
        shapes = {k: v for k, v in shapes.items() if k not in ("reward_head", "value_head")}
        if not include_embeddings:
            shapes = {k: v for k, v in shapes.items() if k not in ("embed", "pos_embed")}
        return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def weight_compute_dtype(cfg: ModelConfig, x):
    """The dtype param `x` (an array or its shape) is computed with: the compute dtype for its
    matrices (the modules cast them before every matmul or lookup), its own for the rest."""
    return cfg.compute_dtype if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype


def _param(module: nn.Module, name: str, shape, axes, init=nn.initializers.normal(0.02),
           after=None):
    """The param `name` (created by `init` with logical `axes`), readable once `after` exists
    (`fetched_after`; None: at any time)."""
    dtype = jnp.dtype(module.cfg.param_dtype)
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    return w if after is None else fetched_after(w, after)


def fetched_after(w, x):
    """`w` (the identity), readable only once `x` exists: an optimization barrier, so XLA
    cannot fetch a block's weights (with FSDP: all-gather them) before the activations it
    waits on. Without it XLA starts the gathers of weights that nothing in the update's loop
    changes (the frozen trunk under `rl.train_top_layers`) as early as it likes, and every
    layer's gathered weights were alive at once. The blocks pass the previous block's input:
    one block of prefetch. Measured (Pythia-6.9B, top-2 RL update, bench/NOTES.md):
    temporaries 10.0 -> 3.8 GiB on 8 x H100, 7.7 -> 3.9 GiB on v5e-16. Not on CPUs
    (`Transformer.trunk`): nothing is gathered there, and the barrier only constrains XLA:CPU's
    buffer schedule."""
    return jax.lax.optimization_barrier((w, jax.lax.stop_gradient(x)))[0]


def _adapted(module: nn.Module, name: str, x, y, n_in: int = 1):
    """`y` (= x W, weight `name`) plus (x A) B where the params hold a LoRA adapter of `name`
    (`lora_a_<name>` A [in dims.., r], `lora_b_<name>` B [r, out dims..], the scale already in
    B: p3o_jax/lora.py); x's last `n_in` axes are W's input dims. Without one (init, the base,
    the reference) `y` itself."""
    if not module.has_variable("params", "lora_a_" + name):
        return y
    dt = module.cfg.compute_dtype
    a = module.get_variable("params", "lora_a_" + name).astype(dt)
    b = module.get_variable("params", "lora_b_" + name).astype(dt)
    return y + jnp.tensordot(jnp.tensordot(x, a, n_in), b, 1)


class Norm(nn.Module):
    """LayerNorm or RMSNorm (`cfg.norm`) over the last axis, of size `dim` (None: d_model)."""
    cfg: ModelConfig
    dim: int | None = None
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        shape, axes = (self.dim or cfg.d_model,), (self.axis_name,)
        plus_one = cfg.norm == "rms_plus_one"   # Gemma stores w and scales by (1 + w)
        scale = _param(self, "scale", shape, axes,
                       nn.initializers.zeros if plus_one else nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        if cfg.norm != "layer":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.norm_eps)
            return (y * (1.0 + scale if plus_one else scale)).astype(x.dtype)
        bias = _param(self, "bias", shape, axes, nn.initializers.zeros)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (y * scale + bias).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim / 2] float32, scale of cos and sin), as transformers'
    `modeling_rope_utils` computes them for `cfg.rope_scaling`'s rope_type; `local`: the
    sliding-window layers' plain RoPE with `rope_local_theta` (Gemma 3)."""
    dim = cfg.rotary_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    p = {} if local else dict(cfg.rope_scaling)
    kind, scale = p.get("rope_type", "default"), 1.0
    if kind == "linear":
        inv_freq = inv_freq / p["factor"]
    elif kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        old_len = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.max_len / old_len

        def mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        scale = p.get("attention_factor")
        if scale is None:
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            scale = mscale(m) / mscale(m_all) if m and m_all else mscale()

        def correction_dim(rotations):  # the dimension that turns `rotations` times in old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.astype(np.float32), float(scale)


def rotary(x: jax.Array, positions: jax.Array, cfg: ModelConfig, local: bool = False) -> jax.Array:
    """RoPE on the first `cfg.rotary_dim` features, rotating halves (or interleaved pairs,
    `cfg.rope_interleaved`). x: [B, T, H, E], positions: [B, T]."""
    dim = cfg.rotary_dim
    if dim == 0:
        return x
    inv_freq, scale = rope_frequencies(cfg, local)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq             # [B, T, rot/2]
    rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
    if cfg.rope_interleaved:
        emb = jnp.repeat(freqs, 2, -1)[:, :, None, :]                       # [B, T, 1, rot]
        pairs = rot.reshape(*rot.shape[:-1], dim // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(rot.shape)
    else:
        emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
        rotated = jnp.concatenate([-rot[..., dim // 2:], rot[..., :dim // 2]], -1)
    rot = rot * (jnp.cos(emb) * scale) + rotated * (jnp.sin(emb) * scale)
    return jnp.concatenate([rot.astype(x.dtype), rest], -1)


def write_cache(cache, new, index):
    """new [B, K, T, E] into cache [B, K, S, E] at slots [index, index + T): `index` an int
    (every row at the same slot) or int [B] (each row at its own, continuous batching)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, 2)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, 1))(
        cache, new, index)


class Attention(nn.Module):
    cfg: ModelConfig
    sliding: bool = False   # this layer uses `cfg.sliding_window` (and `rope_local_theta`)

    @nn.compact
    def __call__(self, x, positions, key_mask, cache=None, cache_index=0, after=None):
        """x: [B, T, D]; key_mask: [B, S], or [B, T, S] (which keys each query may see, e.g.
        only its own segment's in a packed row: `packing.py`); cache: {"k", "v": [B, K, S, E]}
        or None; after: the weights are read once it exists (`fetched_after`).

        Keys and values are kept head-major ([B, K, S, E]), the layout the score and output
        contractions read, so a decode step reads the cache in place instead of transposing it.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        H, K, E, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        zeros = nn.initializers.zeros

        def proj(name, n, axis):
            w = _param(self, "w" + name, (D, n, E), ("embed", axis, "head_dim"), after=after)
            y = _adapted(self, "w" + name, x, jnp.einsum("btd,dhe->bthe", x, w.astype(dt)))
            if cfg.qkv_bias:
                y = y + _param(self, "b" + name, (n, E), (axis, "head_dim"), zeros).astype(dt)
            if cfg.qk_norm and name != "v":
                y = Norm(cfg, E, "head_dim", name=name + "_norm")(y)
            return y

        local = self.sliding and cfg.rope_local_theta is not None
        q = rotary(proj("q", H, "heads"), positions, cfg, local)
        k = rotary(proj("k", K, "kv_heads"), positions, cfg, local)
        v = proj("v", K, "kv_heads")

        T = x.shape[1]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # [B, K, T, E]
        if cache is not None:
            k, v = write_cache(cache["k"], k, cache_index), write_cache(cache["v"], v, cache_index)
            cache = {"k": k, "v": v}
        k, v = constrain(k, KV_CACHE_AXES), constrain(v, KV_CACHE_AXES)
        S = k.shape[2]

        q = q.reshape(q.shape[0], T, K, H // K, E)
        scores = jnp.einsum("btkge,bkse->bkgts", q, k.astype(dt)).astype(jnp.float32)
        scores = scores * (cfg.query_pre_attn_scalar or E) ** -0.5
        if cfg.attn_softcap:
            scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        # [T, 1] slots of the queries, or [B, T, 1] with a cache index per row
        q_slot = jnp.asarray(cache_index)[..., None, None] + jnp.arange(T)[:, None]
        k_slot = jnp.arange(S)[None, :]
        allowed = k_slot <= q_slot
        if self.sliding and cache is None:  # keys are the queries: the window counts positions,
            # which packed rows (packing.sequence_hidden) do not lay out slot by slot
            allowed = allowed & (positions[:, None, :] > positions[:, :, None] - cfg.sliding_window)
        elif self.sliding:
            allowed &= k_slot > q_slot - cfg.sliding_window
        key_mask = key_mask[:, None, :] if key_mask.ndim == 2 else key_mask
        allowed = (allowed if allowed.ndim == 3 else allowed[None]) & key_mask.astype(bool)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bkse->btkge", probs, v.astype(dt)).reshape(x.shape[0], T, H, E)
        out = constrain(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        wo = _param(self, "wo", (H, E, D), ("heads", "head_dim", "embed"), after=after)
        y = _adapted(self, "wo", out, jnp.einsum("bthe,hed->btd", out, wo.astype(dt)), 2)
        if cfg.out_bias:
            y = y + _param(self, "bo", (D,), ("embed",), zeros).astype(dt)
        return y, cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, after=None):
        """x: [B, T, D]; after: the weights are read once it exists (`fetched_after`)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, F = cfg.d_model, cfg.d_ff
        zeros = nn.initializers.zeros
        act = ACTIVATIONS[cfg.activation]

        def dense(name, inp, shape, axes):
            w = _param(self, "w_" + name, shape, axes, after=after)
            y = _adapted(self, "w_" + name, inp, jnp.einsum("btd,df->btf", inp, w.astype(dt)))
            if cfg.mlp_bias:
                y = y + _param(self, "b_" + name, shape[-1:], axes[-1:], zeros).astype(dt)
            return y

        h = act(dense("in", x, (D, F), ("embed", "mlp")))
        if cfg.gated_mlp:
            h = h * dense("up", x, (D, F), ("embed", "mlp"))
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense("out", h, (F, D), ("mlp", "embed"))


@jax.custom_vjp
def _stored_cotangent(x):
    return x


def _stored_cotangent_bwd(_, g):
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), g),)


_stored_cotangent.defvjp(lambda x: (x, None), _stored_cotangent_bwd)


def on_cpu() -> bool:
    """Whether the program being traced is for CPUs: the mesh's platform (`jax.set_mesh`: a TPU
    or GPU program compiled on a CPU host is the accelerator's), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return (device.platform if device is not None else jax.default_backend()) == "cpu"


def stored_cotangent(x):
    """Identity whose backward (on CPU) writes the residual stream's gradient to memory.

    Without it XLA:CPU fuses each layer's norm backward into every consumer below it,
    recomputing the chain once per consumer (measured: a third of a GPT-2 backward). XLA:CPU
    drops `optimization_barrier` before fusion, so the barrier is a conditional that cannot be
    folded: the gradient passes unchanged unless its first entry is NaN, in which case all of it
    is NaN (an update that the non-finite check skips anyway). Other backends skip it: a
    conditional there costs a device-to-host sync (`on_cpu`)."""
    return _stored_cotangent(x) if on_cpu() else x


class Block(nn.Module):
    cfg: ModelConfig
    sliding: bool = False

    @nn.compact
    def __call__(self, x, positions, key_mask, cache=None, cache_index=0, after=None):
        """`Attention`'s arguments; after: the previous block's input (`fetched_after`)."""
        cfg = self.cfg
        x = stored_cotangent(x)
        h = Norm(cfg, name="ln1")(x)
        attn, cache = Attention(cfg, self.sliding, name="attn")(h, positions, key_mask, cache,
                                                                 cache_index, after)
        if cfg.post_norms:
            attn = Norm(cfg, name="ln1_post")(attn)
        if cfg.parallel_residual:
            mlp_in = h if cfg.shared_block_norm else Norm(cfg, name="ln2")(x)
            x = x + attn + MLP(cfg, name="mlp")(mlp_in, after)
        else:
            x = stored_cotangent(x + attn)
            mlp = MLP(cfg, name="mlp")(Norm(cfg, name="ln2")(x), after)
            x = x + (Norm(cfg, name="ln2_post")(mlp) if cfg.post_norms else mlp)
        return constrain(x, ("act_batch", "act_length", "act_embed")), cache


class Transformer(nn.Module):
    """Trunk plus the three heads; see the module docstring for conventions."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), dtype)
        if cfg.family == "gpt2":
            self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
                nn.initializers.normal(0.01), ("position", "embed")), (cfg.max_len, cfg.d_model),
                dtype)
        block = (Block if cfg.remat == "none" else
                 nn.remat(Block, policy=REMAT_POLICIES[cfg.remat]))
        self.blocks = [block(cfg, i in cfg.sliding_layers, name=f"layer_{i}")
                       for i in range(cfg.n_layers)]
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                dtype)
        if cfg.lm_head_bias:
            self.lm_head_bias = self.param("lm_head_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), dtype)
        self.reward_head = ScalarHead(cfg)
        self.value_head = ScalarHead(cfg)

    def trunk(self, tokens, positions, key_mask, cache=None, cache_index=0):
        """tokens, positions: [B, T]; key_mask: [B, S]. Returns (hidden [B, T, D], cache)."""
        cfg = self.cfg
        x = jnp.take(self.embed, tokens, axis=0).astype(cfg.compute_dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
        if cfg.family == "gpt2":
            x = x + jnp.take(self.pos_embed, positions, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        new_cache, previous, tie = [], None, not on_cpu()    # `fetched_after`
        for i, block in enumerate(self.blocks):
            y, c = block(x, positions, key_mask, None if cache is None else cache[i],
                         cache_index, previous)
            previous, x = (x if tie else None), y
            new_cache.append(c)
        return self.final_norm(stored_cotangent(x)), (None if cache is None else tuple(new_cache))

    def lm_logits(self, hidden):
        """hidden: [B, T, D] -> float32 logits [B, T, V]."""
        cfg = self.cfg
        w = self.embed.T if cfg.tie_embeddings else self.lm_head
        logits = jnp.einsum("btd,dv->btv", hidden, w.astype(cfg.compute_dtype)).astype(jnp.float32)
        if cfg.lm_head_bias:
            logits = logits + self.lm_head_bias.astype(jnp.float32)
        if cfg.final_softcap:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def rewards(self, hidden):
        """Per-token reward scores [B, T]; read the sequence reward with `reward_at_last_token`."""
        return self.reward_head(hidden)

    def values(self, hidden):
        """Per-token value estimates [B, T]."""
        return self.value_head(hidden)

    def __call__(self, tokens, positions, key_mask):
        """Used by `init` only: touches every head so that all params exist."""
        h, _ = self.trunk(tokens, positions, key_mask)
        return self.lm_logits(h), self.rewards(h), self.values(h)


class ScalarHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden):
        w = _param(self, "w", (self.cfg.d_model,), ("embed",), nn.initializers.zeros)
        b = _param(self, "b", (), (), nn.initializers.zeros)
        return (hidden.astype(jnp.float32) @ w.astype(jnp.float32)) + b


# ---------------------------------------------------------------------------------------------
# Pure functions of (params, inputs)

def positions_from_mask(mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> [B, T] int32 positions counting real tokens (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def reward_at_last_token(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token scores [B, T] -> [B], read at the last real token (never at a pad)."""
    return jnp.take_along_axis(scores, last_token_index(mask)[:, None], axis=-1)[:, 0]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random params as a plain pytree (logical axes are recovered by `param_axes`)."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    variables = Transformer(cfg).init(rng, tokens, tokens, jnp.ones_like(tokens))
    return nn.unbox(variables["params"])


def param_axes(cfg: ModelConfig) -> dict:
    """Pytree of logical PartitionSpecs, same structure as `init_params`."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens,
                                                          jnp.ones_like(tokens)))
    return nn.get_partition_spec(boxed)["params"]


def forward(params, cfg: ModelConfig, tokens, mask, cache=None, cache_index=0, positions=None):
    """Trunk forward. tokens: [B, T]; mask: [B, T] (or [B, S] key mask with a cache; or a
    [B, T, S] mask of the keys each query may see, which needs `positions`).

    Without a cache, attention is causal over the T tokens. With a cache ([B, K, S, E] per
    layer), the T tokens are written at slots [cache_index, cache_index + T) (cache_index: int,
    or int [B], a slot per row) and attend to every earlier slot whose `mask` entry is 1; pass
    `positions` then. Returns (hidden, cache).
    """
    if positions is None:
        positions = positions_from_mask(mask)
    return Transformer(cfg).apply({"params": params}, tokens, positions, mask, cache, cache_index,
                                  method=Transformer.trunk)


def lm_logits(params, cfg: ModelConfig, hidden):
    return Transformer(cfg).apply({"params": params}, hidden, method=Transformer.lm_logits)


def reward_scores(params, cfg: ModelConfig, hidden):
    return Transformer(cfg).apply({"params": params}, hidden, method=Transformer.rewards)


def value_scores(params, cfg: ModelConfig, hidden):
    return Transformer(cfg).apply({"params": params}, hidden, method=Transformer.values)


def logits(params, cfg: ModelConfig, tokens, mask):
    """Convenience: full forward to LM logits [B, T, V]."""
    hidden, _ = forward(params, cfg, tokens, mask)
    return lm_logits(params, cfg, hidden)


def sequence_reward(params, cfg: ModelConfig, tokens, mask):
    """Reward-model score of each row, read at its last real token: [B]. (Training scores
    [prompt | response] pairs with `rollout.response_reward`, each prompt run once.)"""
    hidden, _ = forward(params, cfg, tokens, mask)
    return reward_at_last_token(reward_scores(params, cfg, hidden), mask)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> tuple:
    """Preallocated KV cache: per layer {"k", "v": zeros [B, K, S, E]} (head-major)."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(cfg.n_layers))

