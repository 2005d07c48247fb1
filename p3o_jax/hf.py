"""Hugging Face interop: read and write `config.json` + safetensors for the three families.

`load_pretrained` reads a local folder (or a hub name, resolved through `huggingface_hub`),
maps each HF tensor to our layout one at a time from the memory-mapped safetensors file and
places it straight onto the mesh with `jax.make_array_from_callback`, so no device ever holds an
unsharded copy. `save_pretrained` writes a folder that transformers' PyTorch classes load.

Layout map (ours <- HF), per layer; D d_model, H/K heads, E head dim, F MLP width:

| ours                   | gpt2 (Conv1D: [in, out])   | gpt_neox ([out, in])          | llama / qwen2 ([out, in]) |
|------------------------|----------------------------|-------------------------------|---------------------------|
| attn.wq/wk/wv [D,H,E]  | c_attn.weight [D, 3D]      | query_key_value [H*3*E, D]    | q/k/v_proj [H*E, D]       |
| attn.wo [H,E,D]        | c_proj.weight [D, D]       | dense [D, D]                  | o_proj [D, H*E]           |
| mlp.w_in [D,F]         | c_fc.weight                | dense_h_to_4h [F, D]          | gate_proj (activated)     |
| mlp.w_up [D,F]         | -                          | -                             | up_proj                   |
| mlp.w_out [F,D]        | mlp.c_proj.weight          | dense_4h_to_h [D, F]          | down_proj [D, F]          |

The reward and value heads have no HF counterpart: they start at zero on load and are not
written by `save_pretrained` (our own checkpoints keep them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from p3o_jax import model as M
from p3o_jax.distributed import to_host
from p3o_jax.sharding import logical_shardings

SUPPORTED = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "qwen2": "llama"}


class HFFormatError(ValueError):
    """A checkpoint folder that cannot be read: names the file and the tensor."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def config_from_hf(path: str, **overrides) -> M.ModelConfig:
    """Read `path/config.json` into a ModelConfig (dtype etc. via overrides)."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{file}: cannot read config: {e}") from e
    if model_type not in SUPPORTED:
        raise HFFormatError(f"{file}: unsupported model_type {model_type!r}; supported: "
                            f"{sorted(SUPPORTED)}")
    import transformers  # heavy import, only needed here
    hf = transformers.AutoConfig.from_pretrained(path)
    if model_type == "gpt2":
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(
                hf, "reorder_and_upcast_attn", False):
            raise HFFormatError(f"{file}: gpt2 attention variants (scale_attn_by_inverse_layer_idx,"
                                " reorder_and_upcast_attn) are not supported")
        kw = dict(family="gpt2", vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer,
                  n_heads=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd, max_len=hf.n_positions,
                  norm_eps=hf.layer_norm_epsilon, activation=hf.activation_function,
                  tie_embeddings=hf.tie_word_embeddings)
    else:
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise HFFormatError(f"{file}: rope_type {rope['rope_type']!r} is not supported "
                                "(only the default rotary embedding)")
        common = dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size,
                      n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
                      d_ff=hf.intermediate_size, max_len=hf.max_position_embeddings,
                      rope_theta=rope.get("rope_theta", 10000.0),
                      tie_embeddings=hf.tie_word_embeddings, activation=hf.hidden_act)
        if model_type == "gpt_neox":
            kw = dict(common, family="gpt_neox", norm_eps=hf.layer_norm_eps,
                      rotary_pct=rope.get("partial_rotary_factor", 1.0),
                      parallel_residual=hf.use_parallel_residual,
                      qkv_bias=hf.attention_bias, out_bias=hf.attention_bias)
        else:
            qwen = model_type == "qwen2"
            if qwen and getattr(hf, "use_sliding_window", False):
                raise HFFormatError(f"{file}: sliding-window attention is not supported")
            kw = dict(common, family="llama", norm_eps=hf.rms_norm_eps,
                      n_kv_heads=hf.num_key_value_heads,
                      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                      qkv_bias=True if qwen else hf.attention_bias,
                      out_bias=False if qwen else hf.attention_bias,
                      mlp_bias=False if qwen else getattr(hf, "mlp_bias", False))
    kw.update(overrides)
    return M.ModelConfig(**kw)


def config_to_hf(cfg: M.ModelConfig) -> dict:
    """The `config.json` content transformers needs to rebuild `cfg`."""
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function=cfg.activation, tie_word_embeddings=cfg.tie_embeddings)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                  hidden_act=cfg.activation, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family == "gpt_neox":
        if cfg.qkv_bias != cfg.out_bias or not cfg.mlp_bias:
            raise ValueError("gpt_neox export needs qkv_bias == out_bias and mlp_bias")
        return dict(common, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
                    layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
                    attention_bias=cfg.qkv_bias,
                    rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta,
                                         partial_rotary_factor=cfg.rotary_pct))
    if cfg.rotary_pct != 1.0:
        raise ValueError("llama export needs rotary_pct == 1")
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                    rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.n_kv_heads,
                    head_dim=cfg.head_dim, rope_parameters=rope, use_sliding_window=False)
    if cfg.qkv_bias != cfg.out_bias:
        raise ValueError("llama export needs qkv_bias == out_bias (or the qwen2 pattern)")
    return dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
                rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                rope_parameters=rope)


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


def _mappings(cfg: M.ModelConfig) -> list[Mapping]:
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out: list[Mapping] = []

    def norm(ours, hf):
        out.append(_one(ours + ("scale",), hf + ".weight"))
        if cfg.family != "llama":
            out.append(_one(ours + ("bias",), hf + ".bias"))

    if cfg.family == "gpt2":
        out += [_one(("embed",), "transformer.wte.weight"),
                _one(("pos_embed",), "transformer.wpe.weight")]
        for i in range(cfg.n_layers):
            L, h = f"layer_{i}", f"transformer.h.{i}."
            norm((L, "ln1"), h + "ln_1")
            norm((L, "ln2"), h + "ln_2")
            a = (L, "attn")
            out.append(Mapping(h + "attn.c_attn.weight", (a + ("wq",), a + ("wk",), a + ("wv",)),
                               lambda w: tuple(w.reshape(D, 3, H, E).transpose(1, 0, 2, 3)),
                               lambda q, k, v: np.stack([q, k, v], 1).reshape(D, 3 * D)))
            out.append(Mapping(h + "attn.c_attn.bias", (a + ("bq",), a + ("bk",), a + ("bv",)),
                               lambda b: tuple(b.reshape(3, H, E)),
                               lambda q, k, v: np.stack([q, k, v]).reshape(3 * D)))
            out.append(_one(a + ("wo",), h + "attn.c_proj.weight", lambda w: w.reshape(H, E, D),
                            lambda w: w.reshape(H * E, D)))
            out.append(_one(a + ("bo",), h + "attn.c_proj.bias"))
            for ours, hf in (("in", "c_fc"), ("out", "c_proj")):
                out.append(_one((L, "mlp", "w_" + ours), f"{h}mlp.{hf}.weight"))
                out.append(_one((L, "mlp", "b_" + ours), f"{h}mlp.{hf}.bias"))
        norm(("final_norm",), "transformer.ln_f")
    elif cfg.family == "gpt_neox":
        out.append(_one(("embed",), "gpt_neox.embed_in.weight"))
        for i in range(cfg.n_layers):
            L, h = f"layer_{i}", f"gpt_neox.layers.{i}."
            norm((L, "ln1"), h + "input_layernorm")
            norm((L, "ln2"), h + "post_attention_layernorm")
            a = (L, "attn")
            out.append(Mapping(h + "attention.query_key_value.weight",
                               (a + ("wq",), a + ("wk",), a + ("wv",)),
                               lambda w: tuple(w.reshape(H, 3, E, D).transpose(1, 3, 0, 2)),
                               lambda q, k, v: np.stack([q, k, v]).transpose(2, 0, 3, 1)
                               .reshape(3 * H * E, D)))
            if cfg.qkv_bias:
                out.append(Mapping(h + "attention.query_key_value.bias",
                                   (a + ("bq",), a + ("bk",), a + ("bv",)),
                                   lambda b: tuple(b.reshape(H, 3, E).transpose(1, 0, 2)),
                                   lambda q, k, v: np.stack([q, k, v], 1).reshape(3 * H * E)))
            out.append(_one(a + ("wo",), h + "attention.dense.weight",
                            lambda w: w.T.reshape(H, E, D), lambda w: _t(w.reshape(H * E, D))))
            if cfg.out_bias:
                out.append(_one(a + ("bo",), h + "attention.dense.bias"))
            for ours, hf in (("in", "dense_h_to_4h"), ("out", "dense_4h_to_h")):
                out.append(_one((L, "mlp", "w_" + ours), f"{h}mlp.{hf}.weight", _t, _t))
                out.append(_one((L, "mlp", "b_" + ours), f"{h}mlp.{hf}.bias"))
        norm(("final_norm",), "gpt_neox.final_layer_norm")
        if not cfg.tie_embeddings:
            out.append(_one(("lm_head",), "embed_out.weight", _t, _t))
    else:
        out.append(_one(("embed",), "model.embed_tokens.weight"))
        for i in range(cfg.n_layers):
            L, h = f"layer_{i}", f"model.layers.{i}."
            norm((L, "ln1"), h + "input_layernorm")
            norm((L, "ln2"), h + "post_attention_layernorm")
            a = (L, "attn")
            for name, n in (("q", H), ("k", K), ("v", K)):
                out.append(_one(a + ("w" + name,), f"{h}self_attn.{name}_proj.weight",
                                lambda w, n=n: w.reshape(n, E, D).transpose(2, 0, 1),
                                lambda w, n=n: np.ascontiguousarray(
                                    w.transpose(1, 2, 0).reshape(n * E, D))))
                if cfg.qkv_bias:
                    out.append(_one(a + ("b" + name,), f"{h}self_attn.{name}_proj.bias",
                                    lambda b, n=n: b.reshape(n, E), lambda b, n=n: b.reshape(n * E)))
            out.append(_one(a + ("wo",), h + "self_attn.o_proj.weight",
                            lambda w: w.T.reshape(H, E, D), lambda w: _t(w.reshape(H * E, D))))
            if cfg.out_bias:
                out.append(_one(a + ("bo",), h + "self_attn.o_proj.bias"))
            for ours, hf in (("in", "gate_proj"), ("up", "up_proj"), ("out", "down_proj")):
                out.append(_one((L, "mlp", "w_" + ours), f"{h}mlp.{hf}.weight", _t, _t))
                if cfg.mlp_bias:
                    out.append(_one((L, "mlp", "b_" + ours), f"{h}mlp.{hf}.bias"))
        norm(("final_norm",), "model.norm")
        if not cfg.tie_embeddings:
            out.append(_one(("lm_head",), "lm_head.weight", _t, _t))
    return out


# ---------------------------------------------------------------------------------------------
# Loading

class _SafetensorsReader:
    """Looks tensors up across one `model.safetensors` or a sharded set with an index."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            with safe_open(single, "np") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[str, object] = {}
        self.origin = index if os.path.exists(index) else single

    def find(self, key: str) -> str | None:
        """Return the stored name of `key`, tolerating a missing/extra model-class prefix."""
        candidates = [key, key.split(".", 1)[1]] if key.startswith("transformer.") else [key]
        return next((k for k in candidates if k in self.files), None)

    def get(self, key: str) -> np.ndarray:
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, "np")
        return self._open[file].get_tensor(key)


def resolve(path_or_repo: str) -> str:
    """A local folder as is; otherwise download the hub repo's config and safetensors."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_repo, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                           "*.model"])


def load_pretrained(path_or_repo: str, mesh=None, **config_overrides):
    """Read an HF folder/repo into (ModelConfig, params) placed on `mesh` (or the default device).

    Each tensor is read, converted to our layout on the host and handed to
    `jax.make_array_from_callback`, which copies only each device's own shard.
    """
    path = resolve(path_or_repo)
    cfg = config_from_hf(path, **config_overrides)
    reader = _SafetensorsReader(path)
    axes = M.param_axes(cfg)
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    else:
        shardings = logical_shardings(axes, mesh, shapes)
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16

    def place(path_, array):
        expected = _get(shapes, path_).shape
        if array.shape != expected:
            raise HFFormatError(f"{reader.origin}: tensor for {'/'.join(path_)} has shape "
                                f"{array.shape} after conversion, expected {expected}")
        array = array.astype(dtype)
        return jax.make_array_from_callback(expected, _get(shardings, path_),
                                            lambda idx: array[idx])

    params: dict = {}
    for m in _mappings(cfg):
        key = reader.find(m.hf)
        if key is None:
            raise HFFormatError(f"{reader.origin}: missing tensor {m.hf!r}")
        raw = reader.get(key)
        try:
            parts = m.to_ours(raw)
        except ValueError as e:  # a reshape of a tensor of the wrong size
            raise HFFormatError(f"{reader.files[key]}: tensor {key!r} has shape {raw.shape}, "
                                f"which does not fit the config: {e}") from e
        for p, arr in zip(m.ours, parts):
            _set(params, p, place(p, np.asarray(arr)))
    for head in ("reward_head", "value_head"):  # zero-initialised, as `M.init_params` does
        params[head] = jax.tree.map(lambda s, sh: jax.numpy.zeros(s.shape, s.dtype, device=sh),
                                    shapes[head], shardings[head])
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

def save_pretrained(params, cfg: M.ModelConfig, directory: str) -> None:
    """Write `config.json` + `model.safetensors` that transformers' PyTorch classes load."""
    hf_config = config_to_hf(cfg)
    tensors = {}
    for m in _mappings(cfg):
        parts = [np.asarray(to_host(_get(params, p)), np.float32) for p in m.ours]
        tensors[m.hf] = np.ascontiguousarray(m.to_hf(*parts))
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
