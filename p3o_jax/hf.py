"""Hugging Face interop: read and write `config.json` + safetensors for every family.

`load_pretrained` reads a local folder (or a hub name, resolved through `huggingface_hub`),
maps each HF tensor to our layout one at a time from the memory-mapped safetensors file and
places it straight onto the mesh with `jax.make_array_from_callback`, so no device ever holds an
unsharded copy. `save_pretrained` writes a folder that transformers' PyTorch classes load, as a
causal LM or (`as_reward_model=True`) as `*ForSequenceClassification`.

Layout map (ours <- HF), per layer; D d_model, H/K heads, E head dim, F MLP width:

| ours                   | gpt2 (Conv1D: [in, out]) | gpt_neox ([out, in])       | gptj, llama, gemma ([out, in])  |
|------------------------|--------------------------|----------------------------|---------------------------------|
| attn.wq/wk/wv [D,H,E]  | c_attn.weight [D, 3D]    | query_key_value [H*3*E, D] | q/k/v_proj [H*E, D]             |
| attn.wo [H,E,D]        | c_proj.weight [D, D]     | dense [D, D]               | o_proj / out_proj [D, H*E]      |
| mlp.w_in [D,F]         | c_fc.weight              | dense_h_to_4h [F, D]       | gate_proj (activated) / fc_in   |
| mlp.w_up [D,F]         | -                        | -                          | up_proj                         |
| mlp.w_out [F,D]        | mlp.c_proj.weight        | dense_4h_to_h [D, F]       | down_proj / fc_out [D, F]       |
| reward_head.w [D]      | score.weight [1, D] (every `*ForSequenceClassification`)                            |

The value head has no HF counterpart: it starts at zero on load and is not written. The reward
head is `score.weight` when the checkpoint has one (a published reward model), else zero.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from p3o_jax import lora, storage
from p3o_jax import model as M
from p3o_jax.checks import ConfigError
from p3o_jax.distributed import to_host
from p3o_jax.sharding import logical_shardings

# HF model_type -> (our family, causal LM class, reward model class)
SUPPORTED = {
    "gpt2": ("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
    "gptj": ("gptj", "GPTJForCausalLM", "GPTJForSequenceClassification"),
    "llama": ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("llama", "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("llama", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("llama", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": ("gemma", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("gemma", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
# config.json keys of options no family here implements; present and truthy -> refused
REFUSED_KEYS = {
    "vision_config": "multimodal models (load the text model alone)",
    "audio_config": "multimodal models (load the text model alone)",
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers",
    "use_bidirectional_attention": "bidirectional attention",
    "scale_attn_by_inverse_layer_idx": "this gpt2 attention variant",
    "reorder_and_upcast_attn": "this gpt2 attention variant",
}
ROLES = ("policy", "reward")


class HFFormatError(ConfigError):
    """A checkpoint folder that cannot be read: names the file and the tensor or key."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{file}: cannot read config: {e}") from e


def _rope(hf, raw: dict, file: str) -> dict:
    """`rope_parameters` as transformers standardised it, checked: {"full_attention": {..},
    "sliding_attention": {..}} for Gemma 3, one dict otherwise."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    for params in rope.values() if "full_attention" in rope else [rope]:
        kind = params.get("rope_type", "default")
        if kind not in M.ROPE_TYPES:
            raise HFFormatError(f"{file}: {key}.rope_type {kind!r} is not supported; supported: "
                                f"{list(M.ROPE_TYPES)}")
    return rope


def _rope_fields(rope: dict) -> dict:
    """ModelConfig fields of one standardised rope_parameters dict."""
    scaling = {k: v for k, v in rope.items()
               if k not in ("rope_theta", "partial_rotary_factor", "type")}  # type: legacy rope_type
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    return dict(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling)


def config_from_hf(path: str, **overrides) -> M.ModelConfig:
    """Read `path/config.json` into a ModelConfig (dtype etc. via overrides). An option that
    no family implements is refused with an `HFFormatError` naming the config key."""
    file = os.path.join(path, "config.json")
    raw = _read_json(file)
    for key, what in REFUSED_KEYS.items():
        if raw.get(key):
            raise HFFormatError(f"{file}: {key}={raw[key]!r}: {what} are not supported")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise HFFormatError(f"{file}: unsupported model_type {model_type!r}; supported: "
                            f"{sorted(SUPPORTED)}")
    import transformers  # heavy import, only needed here
    try:
        hf = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError) as e:
        raise HFFormatError(f"{file}: transformers rejects this config: {e}") from e
    family = SUPPORTED[model_type][0]
    if family in ("gpt2", "gptj"):
        kw = dict(vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer,
                  n_heads=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd, max_len=hf.n_positions,
                  norm_eps=hf.layer_norm_epsilon, activation=hf.activation_function,
                  tie_embeddings=hf.tie_word_embeddings)
        if family == "gptj":
            rotary_dim = hf.rotary_dim or hf.n_embd // hf.n_head
            kw.update(rotary_pct=rotary_dim / (hf.n_embd // hf.n_head))
    else:
        rope = _rope(hf, raw, file)
        kw = dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size,
                  n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
                  d_ff=hf.intermediate_size, max_len=hf.max_position_embeddings,
                  tie_embeddings=hf.tie_word_embeddings)
    if family == "gpt_neox":
        kw.update(**_rope_fields(rope), activation=hf.hidden_act, norm_eps=hf.layer_norm_eps,
                  rotary_pct=rope.get("partial_rotary_factor", 1.0),
                  parallel_residual=hf.use_parallel_residual,
                  qkv_bias=hf.attention_bias, out_bias=hf.attention_bias)
    elif family in ("llama", "gemma"):
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
        kw.update(norm_eps=hf.rms_norm_eps, n_kv_heads=hf.num_key_value_heads,
                  head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                  sliding_window=window,
                  sliding_layers=[i for i, t in enumerate(layer_types)
                                  if t == "sliding_attention"] if window else [])
    if family == "gemma":
        gemma3 = model_type == "gemma3_text"
        local = rope.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default":
            raise HFFormatError(f"{file}: rope_parameters.sliding_attention.rope_type "
                                f"{local['rope_type']!r} is not supported (only the global "
                                "layers' RoPE may be scaled)")
        kw.update(**_rope_fields(rope.get("full_attention", rope)),
                  activation=hf.hidden_activation, qk_norm=gemma3,
                  rope_local_theta=local.get("rope_theta") if gemma3 else None,
                  query_pre_attn_scalar=hf.query_pre_attn_scalar,
                  attn_softcap=hf.attn_logit_softcapping,
                  final_softcap=hf.final_logit_softcapping,
                  qkv_bias=hf.attention_bias, out_bias=hf.attention_bias)
    elif family == "llama":
        qwen2 = model_type == "qwen2"
        kw.update(**_rope_fields(rope), activation=hf.hidden_act,
                  qk_norm=model_type == "qwen3",
                  qkv_bias=True if qwen2 else getattr(hf, "attention_bias", False),
                  out_bias=False if qwen2 else getattr(hf, "attention_bias", False),
                  mlp_bias=getattr(hf, "mlp_bias", False))
    try:
        return M.ModelConfig(family=family, **dict(kw, **overrides))
    except ValueError as e:  # e.g. heads not a multiple of kv heads
        raise HFFormatError(f"{file}: {e}") from e


def _llama_model_type(cfg: M.ModelConfig) -> str:
    """The transformers class that computes what a `llama`-family `cfg` does."""
    all_sliding = cfg.sliding_window and len(cfg.sliding_layers) == cfg.n_layers
    if cfg.qk_norm:
        kind = "qwen3"
    elif cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        kind = "qwen2"
    elif all_sliding and not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias):
        kind = "mistral"
    else:
        kind = "llama"
    if kind == "llama" and cfg.sliding_window:
        raise ValueError("llama export: a sliding window needs the mistral/qwen pattern "
                         "(no biases, or q/k/v biases only)")
    if kind in ("qwen3", "llama", "mistral") and cfg.qkv_bias != cfg.out_bias:
        raise ValueError(f"{kind} export needs qkv_bias == out_bias")
    if kind in ("qwen3", "qwen2", "mistral") and cfg.mlp_bias:
        raise ValueError(f"{kind} export has no MLP biases")
    return kind


def config_to_hf(cfg: M.ModelConfig) -> dict:
    """The `config.json` content transformers needs to rebuild `cfg` (as a causal LM);
    ValueError for a config that transformers' class of its family cannot express."""
    if cfg.family in ("gpt2", "gptj", "gpt_neox") and cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ValueError(f"{cfg.family} in transformers needs n_heads * head_dim == d_model, "
                         f"got {cfg.n_heads} * {cfg.head_dim} != {cfg.d_model}")
    if cfg.family in ("gpt2", "gptj"):
        kw = dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                  n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
                  layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                  tie_word_embeddings=cfg.tie_embeddings)
        if cfg.family == "gptj":
            kw.update(rotary_dim=cfg.rotary_dim)
        return dict(kw, model_type=cfg.family, architectures=[SUPPORTED[cfg.family][1]])
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                  tie_word_embeddings=cfg.tie_embeddings)
    rope = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    if cfg.family == "gpt_neox":
        if cfg.qkv_bias != cfg.out_bias or not cfg.mlp_bias:
            raise ValueError("gpt_neox export needs qkv_bias == out_bias and mlp_bias")
        return dict(common, model_type="gpt_neox", architectures=[SUPPORTED["gpt_neox"][1]],
                    hidden_act=cfg.activation, layer_norm_eps=cfg.norm_eps,
                    use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.qkv_bias,
                    rope_parameters=dict(rope, partial_rotary_factor=cfg.rotary_pct))
    if cfg.rotary_pct != 1.0:
        raise ValueError(f"{cfg.family} export needs rotary_pct == 1")
    common.update(rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, sliding_window=cfg.sliding_window,
                  layer_types=["sliding_attention" if i in cfg.sliding_layers else
                               "full_attention" for i in range(cfg.n_layers)])
    if cfg.family == "gemma":
        kind = "gemma3_text" if cfg.qk_norm else "gemma2"
        if kind == "gemma2" and cfg.rope_local_theta is not None:
            raise ValueError("gemma2 export has no rope_local_theta (that is Gemma 3, qk_norm)")
        if kind == "gemma3_text":
            local = dict(rope_type="default", rope_theta=cfg.rope_local_theta or cfg.rope_theta)
            rope = {"full_attention": rope, "sliding_attention": local}
        return dict(common, model_type=kind, architectures=[SUPPORTED[kind][1]],
                    hidden_activation=cfg.activation, rope_parameters=rope,
                    query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                    attn_logit_softcapping=cfg.attn_softcap,
                    final_logit_softcapping=cfg.final_softcap, attention_bias=cfg.qkv_bias)
    kind = _llama_model_type(cfg)
    out = dict(common, model_type=kind, architectures=[SUPPORTED[kind][1]],
               hidden_act=cfg.activation, rope_parameters=rope)
    if kind in ("qwen2", "qwen3"):
        first = min(cfg.sliding_layers, default=cfg.n_layers)
        out.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=first)
    if kind in ("llama", "qwen3"):
        out.update(attention_bias=cfg.qkv_bias)
    if kind == "llama":
        out.update(mlp_bias=cfg.mlp_bias)
        del out["sliding_window"], out["layer_types"]
    if kind == "mistral":
        del out["layer_types"]
    return out


# ---------------------------------------------------------------------------------------------
# Tensor layout map

@dataclasses.dataclass(frozen=True)
class Mapping:
    """One HF tensor <-> one or more of our params (fused qkv maps to three)."""
    hf: str
    ours: tuple[tuple[str, ...], ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _one(path, hf, to_ours=lambda w: w, to_hf=lambda w: w):
    return Mapping(hf, (path,), lambda w: (to_ours(w),), to_hf)


def _t(w):
    return np.ascontiguousarray(w.T)


def _lm_head_name(cfg: M.ModelConfig) -> str:
    return "embed_out.weight" if cfg.family == "gpt_neox" else "lm_head.weight"


def _is_lm_head(m: Mapping) -> bool:
    return m.ours[0][0] in ("lm_head", "lm_head_bias")


class _Layout:
    """One model's `Mapping`s, built up by its family's function (`FAMILY_LAYOUTS`), with the
    shapes every family shares: norms, head-major projections, the attention's output."""

    def __init__(self, cfg: M.ModelConfig):
        self.cfg, self.out = cfg, []
        self.D, self.H, self.K, self.E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def one(self, ours, hf, *convert):
        """A tensor to one param (`convert`: to ours and back, default as it is)."""
        self.out.append(_one(ours, hf, *convert))

    def norm(self, ours, hf):
        self.one(ours + ("scale",), hf + ".weight")
        if self.cfg.norm == "layer":
            self.one(ours + ("bias",), hf + ".bias")

    def head_major(self, ours, hf, n, bias):
        """A [n*E, D] projection (and its bias) <-> our [D, n, E]."""
        D, E = self.D, self.E
        self.one(ours[:-1] + ("w" + ours[-1],), hf + ".weight",
                 lambda w: w.reshape(n, E, D).transpose(2, 0, 1),
                 lambda w: np.ascontiguousarray(w.transpose(1, 2, 0).reshape(n * E, D)))
        if bias:
            self.one(ours[:-1] + ("b" + ours[-1],), hf + ".bias",
                     lambda b: b.reshape(n, E), lambda b: b.reshape(n * E))

    def out_proj(self, a, hf):
        D, H, E = self.D, self.H, self.E
        self.one(a + ("wo",), hf + ".weight",
                 lambda w: w.T.reshape(H, E, D), lambda w: _t(w.reshape(H * E, D)))
        if self.cfg.out_bias:
            self.one(a + ("bo",), hf + ".bias")

    def mlp(self, L, h, names, biases=True, transposed=True):
        """Our (L, "mlp", "w_<ours>") <-> `<h>mlp.<hf>.weight` for each (ours, hf) of names."""
        for ours, hf in names:
            self.one((L, "mlp", "w_" + ours), f"{h}mlp.{hf}.weight",
                     *((_t, _t) if transposed else ()))
            if biases:
                self.one((L, "mlp", "b_" + ours), f"{h}mlp.{hf}.bias")


def _gpt2(m: _Layout) -> None:
    D, H, E = m.D, m.H, m.E
    m.one(("embed",), "transformer.wte.weight")
    m.one(("pos_embed",), "transformer.wpe.weight")
    for i in range(m.cfg.n_layers):
        L, h = f"layer_{i}", f"transformer.h.{i}."
        m.norm((L, "ln1"), h + "ln_1")
        m.norm((L, "ln2"), h + "ln_2")
        a = (L, "attn")     # Conv1D weights are [in, out]: no transposes
        m.out.append(Mapping(h + "attn.c_attn.weight", (a + ("wq",), a + ("wk",), a + ("wv",)),
                             lambda w: tuple(w.reshape(D, 3, H, E).transpose(1, 0, 2, 3)),
                             lambda q, k, v: np.stack([q, k, v], 1).reshape(D, 3 * D)))
        m.out.append(Mapping(h + "attn.c_attn.bias", (a + ("bq",), a + ("bk",), a + ("bv",)),
                             lambda b: tuple(b.reshape(3, H, E)),
                             lambda q, k, v: np.stack([q, k, v]).reshape(3 * D)))
        m.one(a + ("wo",), h + "attn.c_proj.weight", lambda w: w.reshape(H, E, D),
              lambda w: w.reshape(H * E, D))
        m.one(a + ("bo",), h + "attn.c_proj.bias")
        m.mlp(L, h, (("in", "c_fc"), ("out", "c_proj")), transposed=False)
    m.norm(("final_norm",), "transformer.ln_f")


def _gpt_neox(m: _Layout) -> None:
    D, H, E = m.D, m.H, m.E
    m.one(("embed",), "gpt_neox.embed_in.weight")
    for i in range(m.cfg.n_layers):
        L, h = f"layer_{i}", f"gpt_neox.layers.{i}."
        m.norm((L, "ln1"), h + "input_layernorm")
        m.norm((L, "ln2"), h + "post_attention_layernorm")
        a = (L, "attn")     # q, k, v interleaved per head
        m.out.append(Mapping(h + "attention.query_key_value.weight",
                             (a + ("wq",), a + ("wk",), a + ("wv",)),
                             lambda w: tuple(w.reshape(H, 3, E, D).transpose(1, 3, 0, 2)),
                             lambda q, k, v: np.stack([q, k, v]).transpose(2, 0, 3, 1)
                             .reshape(3 * H * E, D)))
        if m.cfg.qkv_bias:
            m.out.append(Mapping(h + "attention.query_key_value.bias",
                                 (a + ("bq",), a + ("bk",), a + ("bv",)),
                                 lambda b: tuple(b.reshape(H, 3, E).transpose(1, 0, 2)),
                                 lambda q, k, v: np.stack([q, k, v], 1).reshape(3 * H * E)))
        m.out_proj(a, h + "attention.dense")
        m.mlp(L, h, (("in", "dense_h_to_4h"), ("out", "dense_4h_to_h")))
    m.norm(("final_norm",), "gpt_neox.final_layer_norm")


def _gptj(m: _Layout) -> None:
    m.one(("embed",), "transformer.wte.weight")
    for i in range(m.cfg.n_layers):
        L, h = f"layer_{i}", f"transformer.h.{i}."
        m.norm((L, "ln1"), h + "ln_1")       # one norm: attention and MLP in parallel
        for name in "qkv":
            m.head_major((L, "attn", name), f"{h}attn.{name}_proj", m.H, m.cfg.qkv_bias)
        m.out_proj((L, "attn"), h + "attn.out_proj")
        m.mlp(L, h, (("in", "fc_in"), ("out", "fc_out")))
    m.norm(("final_norm",), "transformer.ln_f")


def _llama(m: _Layout) -> None:
    """Llama and the families laid out like it: Qwen2/3, Mistral, Gemma 2/3."""
    cfg = m.cfg
    m.one(("embed",), "model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        L, h = f"layer_{i}", f"model.layers.{i}."
        m.norm((L, "ln1"), h + "input_layernorm")
        if cfg.family == "gemma":  # Gemma's post_attention_layernorm norms the attention output
            m.norm((L, "ln1_post"), h + "post_attention_layernorm")
            m.norm((L, "ln2"), h + "pre_feedforward_layernorm")
            m.norm((L, "ln2_post"), h + "post_feedforward_layernorm")
        else:
            m.norm((L, "ln2"), h + "post_attention_layernorm")
        a = (L, "attn")
        for name, n in (("q", m.H), ("k", m.K), ("v", m.K)):
            m.head_major(a + (name,), f"{h}self_attn.{name}_proj", n, cfg.qkv_bias)
        if cfg.qk_norm:
            m.norm(a + ("q_norm",), h + "self_attn.q_norm")
            m.norm(a + ("k_norm",), h + "self_attn.k_norm")
        m.out_proj(a, h + "self_attn.o_proj")
        m.mlp(L, h, (("in", "gate_proj"), ("up", "up_proj"), ("out", "down_proj")),
              biases=cfg.mlp_bias)
    m.norm(("final_norm",), "model.norm")


# our family -> the function laying out its checkpoint's tensors
FAMILY_LAYOUTS = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "gptj": _gptj, "llama": _llama,
                  "gemma": _llama}


def _mappings(cfg: M.ModelConfig) -> list[Mapping]:
    """Every tensor of an HF checkpoint of `cfg` and the params it becomes."""
    m = _Layout(cfg)
    FAMILY_LAYOUTS[cfg.family](m)
    if not cfg.tie_embeddings:
        m.one(("lm_head",), _lm_head_name(cfg), _t, _t)
    if cfg.lm_head_bias:
        m.one(("lm_head_bias",), "lm_head.bias")
    return m.out


# ---------------------------------------------------------------------------------------------
# Loading

def _unreadable(file: str, error: Exception) -> str:
    """One line saying why a safetensors file cannot be read."""
    try:
        with open(file, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return (f"{file}: is a Git LFS pointer, not the weights (fetch them with `git lfs pull` "
                "or download the file itself)")
    return f"{file}: not a readable safetensors file (truncated or corrupt?): {error}"


class _SafetensorsReader:
    """Looks tensors up across one `model.safetensors` or a sharded set with an index."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self._open: dict[str, object] = {}
        if os.path.exists(index):
            self.origin = index
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index}: no 'weight_map'")
            self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self.origin = single
            self.files = {k: single for k in self._handle(single).keys()}
        else:
            bins = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
            hint = f" (found {', '.join(bins)}: only safetensors are read)" if bins else ""
            raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json"
                                + hint)

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, "np")
            except Exception as e:  # SafetensorError (bad header), OSError (missing shard)
                raise HFFormatError(_unreadable(file, e)) from e
        return self._open[file]

    def find(self, key: str) -> str | None:
        """Return the stored name of `key`, tolerating a missing/extra model-class prefix."""
        candidates = [key, key.split(".", 1)[1]] if key.startswith("transformer.") else [key]
        return next((k for k in candidates if k in self.files), None)

    def get(self, key: str) -> np.ndarray:
        file = self.files[key]
        try:
            return self._handle(file).get_tensor(key)
        except HFFormatError:
            raise
        except Exception as e:  # data past the end of a truncated file, a key the index invents
            raise HFFormatError(f"{file}: tensor {key!r} cannot be read (truncated file?): "
                                f"{e}") from e


def resolve(path_or_repo: str) -> str:
    """A local folder (`~` expanded); otherwise download the hub repo's config and safetensors."""
    if os.path.isdir(os.path.expanduser(path_or_repo)):
        return os.path.expanduser(path_or_repo)
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_repo, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                           "*.model"])


# Tensors transformers recomputes rather than loads (old checkpoints stored them).
_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|embed_positions)$")


def _check_role(reader: _SafetensorsReader, raw_config: dict, config_file: str,
                cfg: M.ModelConfig, role: str) -> str | None:
    """The stored name of the reward head's `score.weight` (None if absent), after checking by
    tensor names alone (the safetensors headers) that the checkpoint can serve as `role`:
    a reward model has one score, a policy its LM head, both every other tensor of `cfg`."""
    architectures = raw_config.get("architectures") or []
    score = reader.find("score.weight")
    if score is not None:
        labels = len(raw_config.get("id2label") or {0: 0})
        if labels != 1:
            raise HFFormatError(f"{config_file}: num_labels={labels} (id2label); a reward model "
                                "needs exactly one score ('score.weight' [1, d_model])")
    elif role == "reward":
        raise HFFormatError(f"{reader.origin}: no tensor 'score.weight': not a reward model "
                            f"(architectures {architectures}); role='reward' needs a "
                            "*ForSequenceClassification checkpoint")
    for m in _mappings(cfg):
        if reader.find(m.hf) is None and not (_is_lm_head(m) and role == "reward"):
            hint = (f": {architectures} is a reward model without an LM head; load it with "
                    "role='reward'" if score is not None and _is_lm_head(m) else "")
            raise HFFormatError(f"{reader.origin}: missing tensor {m.hf!r}{hint}")
    return score


def check_role(path_or_repo: str, role: str = "policy") -> None:
    """`load_pretrained`'s checks of the checkpoint's config and role without reading a
    weight (config.json and the safetensors headers): run before any stage trains, so that a
    causal LM given as the reward model stops the run before SFT rather than after it."""
    path = resolve(path_or_repo)
    config_file = os.path.join(path, "config.json")
    _check_role(_SafetensorsReader(path), _read_json(config_file), config_file,
                config_from_hf(path), role)


def load_pretrained(path_or_repo: str, mesh=None, *, role: str = "policy", **config_overrides):
    """Read an HF folder/repo into (ModelConfig, params) placed on `mesh` (or the default device).

    A `*ForSequenceClassification` checkpoint's `score.weight` becomes the reward head (with
    either role). `role="reward"` requires it, and allows a checkpoint without an LM head
    (the untied LM head is then zero); `role="policy"` requires the LM head. Every stored tensor
    is used, or named in a warning (the recomputed buffers of old checkpoints aside). Bad input
    raises `HFFormatError`, one line naming the file and the tensor or key.

    Each tensor is read, converted to our layout on the host and handed to
    `jax.make_array_from_callback`, which copies only each device's own shard.
    """
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is not one of {ROLES}")
    path = resolve(path_or_repo)
    cfg = config_from_hf(path, **config_overrides)
    config_file = os.path.join(path, "config.json")
    raw_config = _read_json(config_file)
    reader = _SafetensorsReader(path)
    axes = M.param_axes(cfg)
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    else:
        shardings = logical_shardings(axes, mesh, shapes)
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16

    def place(ours, array):
        array = np.asarray(array).astype(dtype)
        return jax.make_array_from_callback(array.shape, _get(shardings, ours),
                                            lambda idx: array[idx])

    def convert(m: Mapping, key: str) -> tuple[np.ndarray, ...]:
        raw = reader.get(key)
        try:
            parts = m.to_ours(raw)
        except ValueError:  # a reshape of a tensor of the wrong size
            parts = ()
        expected = [_get(shapes, p).shape for p in m.ours]
        if [np.shape(x) for x in parts] != expected:
            raise HFFormatError(f"{reader.files[key]}: tensor {key!r} has shape {raw.shape}, "
                                f"which does not fit config.json (ours: {expected})")
        return parts

    score, reward_w = _check_role(reader, raw_config, config_file, cfg, role), np.zeros(cfg.d_model)
    if score is not None:
        one_row = lambda w: (w[0],) if w.shape == (1, cfg.d_model) else ()  # noqa: E731
        (reward_w,) = convert(Mapping("score.weight", (("reward_head", "w"),), one_row, None),
                              score)
    used, params, mappings = {score} - {None}, {}, _mappings(cfg)
    for m in mappings:
        key = reader.find(m.hf)
        if key is None:  # the LM head of a reward model (_check_role)
            _set(params, m.ours[0], place(m.ours[0], np.zeros(_get(shapes, m.ours[0]).shape)))
            continue
        used.add(key)
        for p, arr in zip(m.ours, convert(m, key)):
            _set(params, p, place(p, arr))
    params["reward_head"] = {"w": place(("reward_head", "w"), reward_w),
                             "b": place(("reward_head", "b"), np.zeros(()))}
    params["value_head"] = jax.tree.map(
        lambda s, sh: jax.numpy.zeros(s.shape, s.dtype, device=sh),
        shapes["value_head"], shardings["value_head"])
    tied_head = reader.find(_lm_head_name(cfg))
    embed = next(reader.find(m.hf) for m in mappings if m.ours == (("embed",),))
    if cfg.tie_embeddings and tied_head is not None and np.array_equal(reader.get(tied_head),
                                                                       reader.get(embed)):
        used.add(tied_head)  # a tied LM head stored anyway
    ignored = sorted(k for k in reader.files if k not in used and not _BUFFERS.search(k))
    if ignored:
        warnings.warn(f"{reader.origin}: ignored {len(ignored)} tensor(s) with no counterpart in "
                      f"a {cfg.family} model: {', '.join(ignored[:20])}"
                      + (" ..." if len(ignored) > 20 else ""), stacklevel=2)
    return cfg, params


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Saving

def save_pretrained(params, cfg: M.ModelConfig, directory: str, *, tokenizer=None,
                    as_reward_model: bool = False, pad_token_id: int | None = None,
                    eos_ids: tuple[int, ...] = ()) -> None:
    """Write `config.json` + `model.safetensors` (+ the tokenizer's files) that transformers'
    `AutoModelForCausalLM` loads, or with `as_reward_model` its
    `AutoModelForSequenceClassification` (`score.weight` = our reward head, `num_labels` 1).
    `eos_ids` (a policy's stop set, `Task.eos_ids`) go to `generation_config.json`, so that
    `generate` stops where our sampler does (at a chat model's end of turn).

    transformers scores a sequence at its last token that is not `pad_token_id` (taken from
    `tokenizer` when not given; required for a reward model), so the exported scores equal
    `sequence_reward`'s when the pad id never occurs as a real token (an EOS used as pad
    does, at the end of a response: give the tokenizer a pad token of its own). Params with
    LoRA adapters are written merged (W + A B).
    """
    params = lora.merge(params)     # LoRA adapters (p3o_jax/lora.py) folded into their weights
    hf_config = config_to_hf(cfg)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is not None:
        hf_config["pad_token_id"] = int(pad_token_id)
    for key in ("bos_token_id", "eos_token_id"):   # the tokenizer's, not the family's defaults
        if tokenizer is not None and getattr(tokenizer, key, None) is not None:
            hf_config[key] = int(getattr(tokenizer, key))
    mappings = _mappings(cfg)
    tensors = {}
    if as_reward_model:
        if pad_token_id is None:
            raise ValueError("save_pretrained(as_reward_model=True) needs pad_token_id (or a "
                             "tokenizer with a pad token): transformers reads the score at the "
                             "last token that is not the pad token")
        hf_config.update(architectures=[SUPPORTED[hf_config["model_type"]][2]],
                         id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        mappings = [m for m in mappings if not _is_lm_head(m)]  # the class has no LM head
        head = to_host(params["reward_head"])
        tensors["score.weight"] = np.asarray(head["w"], np.float32)[None]
        if float(head["b"]) != 0:
            warnings.warn(f"reward head bias {float(head['b']):g} has no place in score.weight "
                          "(no bias): the exported scores are shifted by minus that", stacklevel=2)
    for m in mappings:
        parts = [np.asarray(to_host(_get(params, p)), np.float32) for p in m.ours]
        tensors[m.hf] = np.ascontiguousarray(m.to_hf(*parts))
    if jax.process_index() != 0:
        return
    # written whole into a temporary folder, then each file renamed into place: a failed write
    # (a full disk) leaves no file that transformers would read half of
    directory = os.path.abspath(directory)
    partial = directory + ".partial"
    with storage.writing(directory):
        shutil.rmtree(partial, ignore_errors=True)
        try:
            os.makedirs(partial)
            with open(os.path.join(partial, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
            save_file(tensors, os.path.join(partial, "model.safetensors"),
                      metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            if eos_ids and not as_reward_model:
                generation = {k: hf_config[k] for k in ("bos_token_id", "pad_token_id")
                              if k in hf_config}
                with open(os.path.join(partial, "generation_config.json"), "w") as f:
                    json.dump(dict(generation, eos_token_id=[int(i) for i in eos_ids]), f,
                              indent=2)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(partial):
            os.replace(os.path.join(partial, name), os.path.join(directory, name))
        os.rmdir(partial)
