"""Issue 15's checkpoints: the families beyond GPT-2/Pythia/Llama-2/Qwen2 (parity with
transformers, greedy generation, export), published reward models of every family, and
one-line errors for bad checkpoint folders."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from hf_fixtures import CONFIGS, NEW_CONFIGS, VOCAB, build_torch_model, save_torch_model, torch_logits
from p3o_jax import hf
from p3o_jax import model as M
from p3o_jax import sampler as S
from p3o_jax.checks import ConfigError


def _padded_batch(seed=0, B=4, T=12):
    """Random tokens (never the pad id 0): row 1 and 2 left-padded, row 3 right-padded."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    mask[2, :7] = 0
    mask[3, 9:] = 0
    return np.where(mask == 1, rng.integers(1, VOCAB, (B, T)), 0), mask


@pytest.fixture(scope="session", params=list(NEW_CONFIGS))
def saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = save_torch_model(request.param, d)
    cfg, params = hf.load_pretrained(str(d))
    return request.param, d, torch_model, cfg, params


def test_logit_parity_and_round_trip(saved, tmp_path):
    name, _, torch_model, cfg, params = saved
    tokens, mask = _padded_batch()
    tokens, mask = tokens[:3], mask[:3]          # causal LMs see left padding only
    real = mask.astype(bool)
    ours = np.asarray(M.logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    ref = torch_logits(torch_model, tokens, mask)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4, name
    hf.save_pretrained(params, cfg, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                                 attn_implementation="eager")
    assert type(reloaded) is type(torch_model)
    np.testing.assert_allclose(torch_logits(reloaded, tokens, mask)[real], ref[real], atol=1e-5)
    assert hf.config_from_hf(str(tmp_path)) == cfg


def test_greedy_generation_matches_transformers(saved):
    """Prompt + response (16 slots) run past every sliding window, in prefill and decode."""
    name, _, torch_model, cfg, params = saved
    B, P, N = 3, 6, 10
    rng = np.random.default_rng(3)
    mask = (np.arange(P)[None] >= P - np.array([[6], [3], [1]])).astype(np.int32)
    prompts = np.where(mask == 1, rng.integers(1, VOCAB, (B, P)), 0)
    scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, pad_id=0)
    out = S.generate(params, cfg, scfg, jnp.asarray(prompts, jnp.int32), jnp.asarray(mask),
                     jax.random.split(jax.random.key(0), B))
    with torch.no_grad():
        seqs = torch_model.generate(input_ids=torch.tensor(prompts), do_sample=False,
                                    attention_mask=torch.tensor(mask), max_new_tokens=N,
                                    min_new_tokens=N, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), seqs[:, P:].numpy(), err_msg=name)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(CONFIGS) + list(NEW_CONFIGS))
def test_reward_model_parity_and_export(name, tied, tmp_path):
    """A `*ForSequenceClassification` folder loads with `score` as our reward head, scores a
    left- and right-padded batch as transformers does, and exports back to that class."""
    torch_rm = save_torch_model(name, tmp_path / "in", reward=True, tied=tied)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg, params = hf.load_pretrained(str(tmp_path / "in"), role="reward")
    assert not [w for w in record if "ignored" in str(w.message)]   # every tensor is used
    tokens, mask = _padded_batch(1)
    ours = np.asarray(M.sequence_reward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    inputs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)))
    with torch.no_grad():  # transformers reads the score at the last token that is not pad
        ref = torch_rm(**inputs).logits
    np.testing.assert_allclose(ours, ref[:, 0].numpy(), atol=1e-4, err_msg=name)
    hf.save_pretrained(params, cfg, str(tmp_path / "out"), as_reward_model=True, pad_token_id=0)
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager")
    assert type(exported) is type(torch_rm) and exported.config.num_labels == 1
    with torch.no_grad():
        theirs = exported(**inputs).logits
    np.testing.assert_allclose(theirs[:, 0].numpy(), ref[:, 0].numpy(), atol=1e-5)


def test_policy_role_needs_an_lm_head(tmp_path):
    save_torch_model("llama", tmp_path, reward=True, tied=False)
    with pytest.raises(hf.HFFormatError, match=r"missing tensor 'lm_head\.weight'.*"
                       r"LlamaForSequenceClassification.*role='reward'"):
        hf.load_pretrained(str(tmp_path))


def test_reward_role_needs_a_score(tmp_path):
    save_torch_model("qwen3", tmp_path)
    with pytest.raises(hf.HFFormatError, match=r"no tensor 'score\.weight'.*Qwen3ForCausalLM"):
        hf.load_pretrained(str(tmp_path), role="reward")


def test_param_axes_of_new_families():
    for family, qk_norm in (("gptj", False), ("gemma", True)):
        cfg = M.ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                            qk_norm=qk_norm, sliding_window=4)
        params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
        jax.tree.map(lambda p, a: np.testing.assert_equal(p.ndim, len(a)), params,
                     M.param_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert M.param_axes(cfg)["layer_0"]["attn"]["q_norm"]["scale"] == P("head_dim")


# --- bad input: one line naming the file and the tensor or key, a ConfigError (exit 2) ---------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_bad")
    save_torch_model("llama", d)
    return d


def _copy(src, dst, tensors=None, config=None):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**raw, **(config or {})}, f)
    if tensors is not None:
        save_file(tensors, os.path.join(dst, "model.safetensors"))


def _one_line_error(path, match, **kw):
    with pytest.raises(hf.HFFormatError, match=match) as e:
        hf.load_pretrained(str(path), **kw)
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_lfs_pointer_and_truncated_file(llama_dir, tmp_path):
    _copy(llama_dir, tmp_path / "lfs")
    (tmp_path / "lfs" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    _one_line_error(tmp_path / "lfs", r"lfs/model\.safetensors: is a Git LFS pointer")
    _copy(llama_dir, tmp_path / "cut")
    data = (llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut", r"cut/model\.safetensors: .*truncated")


def test_num_labels_and_score_shape(tmp_path):
    save_torch_model("llama", tmp_path / "rm", reward=True)
    tensors = load_file(str(tmp_path / "rm" / "model.safetensors"))
    _copy(tmp_path / "rm", tmp_path / "two", {**tensors, "score.weight": np.zeros((2, 32), np.float32)},
          config={"id2label": {"0": "A", "1": "B"}})
    _one_line_error(tmp_path / "two", r"two/config\.json: num_labels=2", role="reward")
    _copy(tmp_path / "rm", tmp_path / "wide", {**tensors, "score.weight": np.zeros((1, 33), np.float32)})
    _one_line_error(tmp_path / "wide", r"wide/model\.safetensors: tensor 'score\.weight' has shape "
                    r"\(1, 33\)", role="reward")


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     r"config\.json: rope_parameters\.rope_type 'dynamic' is not supported"),
    ({"num_local_experts": 8}, r"config\.json: num_local_experts=8: mixture-of-experts"),
    ({"vision_config": {"hidden_size": 8}}, r"config\.json: vision_config=.*multimodal"),
])
def test_unsupported_options_name_the_key(llama_dir, tmp_path, change, match):
    _copy(llama_dir, tmp_path, config=change)
    with pytest.raises(hf.HFFormatError, match=match) as e:
        hf.config_from_hf(str(tmp_path))
    assert "\n" not in str(e.value)


def test_ignored_tensors_are_named(llama_dir, tmp_path):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    _copy(llama_dir, tmp_path, {**tensors, "model.layers.0.mlp.extra.weight": np.ones(3, np.float32)})
    with pytest.warns(UserWarning, match=r"ignored 1 tensor.*model\.layers\.0\.mlp\.extra\.weight"):
        hf.load_pretrained(str(tmp_path))


def test_reward_export_takes_the_tokenizer_pad_id(tmp_path):
    from p3o_jax.data.fixtures import tiny_tokenizer
    save_torch_model("gpt_neox", tmp_path / "rm", reward=True)
    cfg, params = hf.load_pretrained(str(tmp_path / "rm"), role="reward")
    with pytest.raises(ValueError, match="pad_token_id"):
        hf.save_pretrained(params, cfg, str(tmp_path / "nopad"), as_reward_model=True)
    params["reward_head"]["b"] = jnp.asarray(0.5)
    tokenizer = tiny_tokenizer(300)
    with pytest.warns(UserWarning, match="reward head bias 0.5"):
        hf.save_pretrained(params, cfg, str(tmp_path / "out"), tokenizer=tokenizer,
                           as_reward_model=True)
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).pad_token_id == \
        tokenizer.pad_token_id
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).vocab_size == \
        tokenizer.vocab_size


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.rope_scaling: rope_type 'llama3' needs "
                                         r"'low_freq_factor'"):
        M.ModelConfig(family="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"model\.rope_scaling: rope_type 'dynamic'"):
        M.ModelConfig(family="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"model\.sliding_layers"):
        M.ModelConfig(family="gemma", sliding_layers=[0])
    # JSON (lists, dicts) and tuples give one hashable config
    a = M.ModelConfig(family="gemma", sliding_window=4, sliding_layers=[0],
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    b = M.ModelConfig(family="gemma", sliding_window=4, sliding_layers=(0,),
                      rope_scaling=[["factor", 2.0], ["rope_type", "linear"]])
    assert a == b and hash(a) == hash(b)


def test_pytorch_bin_only_folder_is_named(llama_dir, tmp_path):
    _copy(llama_dir, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    _one_line_error(tmp_path, r"no model\.safetensors.*found pytorch_model\.bin: only safetensors")
