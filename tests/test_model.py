"""Model layer: parity with transformers' PyTorch classes, HF round trip, sharding, bad input."""
import json
import os
import unittest.mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from hf_fixtures import CONFIGS, VOCAB, save_torch_model, torch_logits
from p3o_jax import hf
from p3o_jax import model as M
from p3o_jax.sharding import logical_shardings, logical_to_spec, make_mesh, shard_batch

FAMILIES = list(CONFIGS)


def _batch(seed=0, B=3, T=12):
    """Random tokens with rows 1 and 2 left-padded (pad id 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (B, T))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return np.where(mask == 1, tokens, 0), mask


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = save_torch_model(request.param, d)
    return request.param, d, torch_model


def test_logit_parity_with_transformers(saved):
    _, d, torch_model = saved
    cfg, params = hf.load_pretrained(str(d))
    tokens, mask = _batch()
    ours = M.logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    chex.assert_shape(ours, tokens.shape + (VOCAB,))
    chex.assert_type(ours, jnp.float32)
    ref = torch_logits(torch_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - ref[real]).max() < 1e-4


def test_left_padding_matches_unpadded(saved):
    _, d, _ = saved
    cfg, params = hf.load_pretrained(str(d))
    tokens, mask = _batch()
    padded = M.logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    for row in (1, 2):
        real = mask[row].astype(bool)
        alone = M.logits(params, cfg, jnp.asarray(tokens[row][real][None]),
                         jnp.ones((1, real.sum()), jnp.int32))
        np.testing.assert_allclose(padded[row][real], alone[0], atol=1e-5)


def test_round_trip_through_transformers(saved, tmp_path):
    _, d, torch_model = saved
    cfg, params = hf.load_pretrained(str(d))
    hf.save_pretrained(params, cfg, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                                 attn_implementation="eager")
    assert type(reloaded) is type(torch_model)
    tokens, mask = _batch(1)
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, tokens, mask)[real],
                               torch_logits(torch_model, tokens, mask)[real], atol=1e-5)
    assert hf.config_from_hf(str(tmp_path)) == cfg


def test_sharded_index_is_read(saved, tmp_path):
    """A checkpoint split over two safetensors files with an index loads the same params."""
    _, d, _ = saved
    tensors = load_file(os.path.join(d, "model.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for file, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(tmp_path, file))
        weight_map.update({k: file for k in ks})
    with open(os.path.join(tmp_path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(d, "config.json")) as src, open(os.path.join(tmp_path, "config.json"), "w") as dst:
        dst.write(src.read())
    _, a = hf.load_pretrained(str(d))
    _, b = hf.load_pretrained(str(tmp_path))
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_sharded_forward_equals_single_device(family, tmp_path):
    assert jax.device_count() == 8
    save_torch_model(family, tmp_path)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = hf.load_pretrained(str(tmp_path), mesh=mesh)
    _, single = hf.load_pretrained(str(tmp_path))
    expected = logical_shardings(M.param_axes(cfg), mesh, params)
    # the shardings are the ones the rule table says, leaf by leaf (vocab 97 is indivisible by
    # tensor=2, so the embedding keeps only its fsdp sharding)
    jax.tree.map(lambda x, s: chex.assert_equal(x.sharding.spec, s.spec), params, expected)
    assert params["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    wq = params["layer_0"]["attn"]["wq"]
    assert wq.sharding.spec == logical_to_spec(("embed", "heads", "head_dim"))
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(cfg.d_model // 4, cfg.n_heads // 2,
                                                              cfg.head_dim)}
    tokens, mask = _batch(2, B=4)
    batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
    fn = jax.jit(lambda p, b: M.logits(p, cfg, b["tokens"], b["mask"]))
    with jax.set_mesh(mesh):
        sharded = fn(params, batch)
    reference = M.logits(single, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES + ["gptj", "gemma3"])
def test_bfloat16_compute_is_close(family, tmp_path):
    save_torch_model(family, tmp_path)
    cfg, params = hf.load_pretrained(str(tmp_path))
    cfg16, _ = hf.load_pretrained(str(tmp_path), dtype="bfloat16")
    tokens, mask = _batch()
    f32 = M.logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    b16 = M.logits(params, cfg16, jnp.asarray(tokens), jnp.asarray(mask))
    chex.assert_type(b16, jnp.float32)  # logits come back in float32
    chex.assert_tree_all_finite(b16)
    real = mask.astype(bool)
    assert np.abs(np.asarray(b16 - f32)[real]).max() < 0.1
    assert np.abs(np.asarray(b16 - f32)[real]).max() > 0  # it really ran in bfloat16


def test_heads_read_at_last_real_token():
    cfg = M.ModelConfig(family="gpt2", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4)
    params = M.init_params(cfg, jax.random.key(0))
    params["reward_head"]["w"] = jax.random.normal(jax.random.key(1), (cfg.d_model,))
    # prompt left-padded, response right-padded: last real token is in the middle
    tokens = jnp.array([[0, 0, 5, 6, 7, 0], [3, 4, 5, 6, 7, 8]])
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    hidden, _ = M.forward(params, cfg, tokens, mask)
    scores = M.reward_scores(params, cfg, hidden)
    values = M.value_scores(params, cfg, hidden)
    chex.assert_shape([scores, values], (2, 6))
    r = M.sequence_reward(params, cfg, tokens, mask)
    np.testing.assert_allclose(r, jnp.stack([scores[0, 4], scores[1, 5]]), rtol=1e-6)
    np.testing.assert_array_equal(M.last_token_index(mask), [4, 5])


class FetchedAfterTest(chex.TestCase):
    # the weight/activation tie (M.fetched_after, every block's weights, on accelerators)
    # changes no value: the forward and the gradient equal those of the model without it
    @chex.variants(with_jit=True, without_jit=True)
    def test_values_and_gradients_are_the_untied_models(self):
        cfg = M.ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4,
                            n_kv_heads=2)
        params = M.init_params(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, VOCAB)
        mask = jnp.ones_like(tokens)

        def loss(p):
            return jnp.mean(M.logits(p, cfg, tokens, mask) ** 2)

        with unittest.mock.patch.object(M, "on_cpu", lambda: False):   # the accelerator path
            tied = self.variant(jax.value_and_grad(loss))(params)
        untied = self.variant(jax.value_and_grad(loss))(params)           # CPUs: no tie
        chex.assert_trees_all_close(tied, untied, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_equal_shapes_and_dtypes(tied[1], params)


def test_param_axes_cover_every_param():
    for family in ("gpt2", "gpt_neox", "llama"):
        cfg = M.ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                            n_kv_heads=2 if family == "llama" else None)
        params = M.init_params(cfg, jax.random.key(0))
        axes = M.param_axes(cfg)
        jax.tree.map(lambda p, a: chex.assert_equal(p.ndim, len(a)), params, axes,
                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        chex.assert_tree_all_finite(params)


# --- bad input -------------------------------------------------------------------------------

def test_unsupported_architecture_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(hf.HFFormatError, match=r"config\.json.*unsupported model_type 'bert'"):
        hf.load_pretrained(str(tmp_path))


def test_missing_tensor_names_file_and_tensor(tmp_path):
    save_torch_model("gpt_neox", tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, file)
    with pytest.raises(hf.HFFormatError,
                       match=r"model\.safetensors.*missing tensor 'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight'"):
        hf.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("key, shape", [
    ("model.layers.0.self_attn.k_proj.weight", (24, 32)),      # fused-free reshape fails
    ("model.layers.0.mlp.up_proj.weight", (40, 32)),           # plain transpose, wrong size
])
def test_shape_mismatch_names_file_and_tensor(tmp_path, key, shape):
    save_torch_model("llama", tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    tensors[key] = np.zeros(shape, np.float32)
    save_file(tensors, file)
    with pytest.raises(hf.HFFormatError, match=r"model\.safetensors.*(" + key.replace(".", r"\.")
                       + r"|layer_0/mlp/w_up).*shape"):
        hf.load_pretrained(str(tmp_path))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.family"):
        M.ModelConfig(family="t5")
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelConfig(family="llama", n_heads=4, n_kv_heads=3)
