"""LoRA adapters (`rl.lora`, p3o_jax/lora.py): fresh adapters are the base model, the merged
export is the adapted model, an RL update trains the adapters only, and the config refuses
what it cannot run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax.checks import ConfigError
from p3o_jax import hf, lora
from p3o_jax import model as M
from p3o_jax.pipeline import init_sharded
from p3o_jax.rl import RLIteration, initial_params, split_policy
from p3o_jax.sampler import SamplingConfig
from p3o_jax.sharding import make_mesh

LLAMA = M.ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, max_len=64)
GPT2 = M.ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                     max_len=64)
ALL = lora.LoraConfig(rank=4, alpha=8.0)


def tokens(B=3, T=12, seed=0):
    ids = np.random.default_rng(seed).integers(1, 64, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0                                   # a left-padded row
    return jnp.asarray(ids), jnp.asarray(mask)


def random_b(adapters, seed=1):
    """Adapters with B drawn too (fresh ones have B = 0), so that they change the model."""
    leaves, tree = jax.tree.flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [
        0.05 * jax.random.normal(k, x.shape, x.dtype) if "lora_b_" in jax.tree_util.keystr(p)
        else x for (p, x), k in zip(leaves, keys)])


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, dataclasses.replace(LLAMA, remat="block")],
                         ids=["llama", "gpt2", "llama-remat"])
def test_fresh_adapters_reproduce_the_base(cfg):
    base = M.init_params(cfg, jax.random.key(0))
    adapters = lora.init(ALL, base, jax.random.key(1))
    weights = {(layer, w) for layer, _, w, _ in lora.adapted_weights(ALL, base)}
    expected = {"wq", "wk", "wv", "wo", "w_in", "w_out"} | ({"w_up"} if cfg.gated_mlp else set())
    assert weights == {(f"layer_{i}", w) for i in range(cfg.n_layers) for w in expected}
    ids, mask = tokens()
    adapted = M.logits(lora.join(ALL, adapters, base), cfg, ids, mask)
    np.testing.assert_array_equal(adapted, M.logits(base, cfg, ids, mask))
    # and they do change it once B moves
    moved = M.logits(lora.join(ALL, random_b(adapters), base), cfg, ids, mask)
    assert np.abs(np.asarray(moved - adapted)).max() > 1e-3


def test_adapter_shapes_and_scale():
    base = M.init_params(LLAMA, jax.random.key(0))
    a = lora.init(ALL, base, jax.random.key(1))["layer_0"]
    H, K, E, D, F = 4, 2, 8, 32, LLAMA.d_ff
    assert a["attn"]["lora_a_wq"].shape == (D, 4) and a["attn"]["lora_b_wq"].shape == (4, H, E)
    assert a["attn"]["lora_b_wk"].shape == (4, K, E)
    assert a["attn"]["lora_a_wo"].shape == (H, E, 4) and a["attn"]["lora_b_wo"].shape == (4, D)
    assert a["mlp"]["lora_a_w_out"].shape == (F, 4)
    only_q = lora.LoraConfig(rank=4, alpha=8.0, targets="q")
    adapters = random_b(lora.init(only_q, base, jax.random.key(1)))
    joined = lora.join(only_q, adapters, base)
    assert set(joined["layer_1"]["attn"]) == set(base["layer_1"]["attn"]) | {"lora_a_wq",
                                                                             "lora_b_wq"}
    np.testing.assert_allclose(joined["layer_1"]["attn"]["lora_b_wq"],
                               2.0 * adapters["layer_1"]["attn"]["lora_b_wq"])
    assert joined["embed"] is base["embed"]                 # the base is shared, not copied


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_merged_export_reloads_as_the_adapted_model(cfg, tmp_path):
    base = M.init_params(cfg, jax.random.key(0))
    joined = lora.join(ALL, random_b(lora.init(ALL, base, jax.random.key(1))), base)
    ids, mask = tokens()
    adapted = M.logits(joined, cfg, ids, mask)
    merged = lora.merge(joined)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(M.logits(merged, cfg, ids, mask), adapted, atol=2e-5)
    hf.save_pretrained(joined, cfg, str(tmp_path))         # merges on its way out
    cfg2, reloaded = hf.load_pretrained(str(tmp_path), dtype=cfg.dtype)
    np.testing.assert_allclose(M.logits(reloaded, cfg2, ids, mask), adapted, atol=2e-5)


def rl_config(devices=None, **rl):
    """A tiny llama's RL config, resolved over `devices` (default: all)."""
    return config_resolve.resolve(config_args.from_args([
        "exp=toy", "policy.family=llama", "policy.vocab_size=132", "policy.d_model=32",
        "policy.n_heads=4", "policy.n_layers=3", "rl.prompts_per_iter=8", "rl.epochs=2",
        "rl.optim.warmup_steps=0", *[f"rl.{k}={v}" for k, v in rl.items()]]), devices or jax.device_count())


def one_rl_iteration(cfg):
    """(state before, state after one RL iteration, frozen part, sft params) on a tiny
    llama whose SFT policy is random and is also the reference and the reward model."""
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        sft = init_sharded(cfg.policy, jax.random.key(0), mesh)
        sft["reward_head"] = jax.tree.map(lambda x: x + 0.1, sft["reward_head"])
        it = RLIteration(cfg, mesh, SamplingConfig(max_new_tokens=cfg.response_len))
        state = it.init_state(initial_params(cfg, sft, sft))
        before = jax.tree.map(np.asarray, state)
        frozen = split_policy(cfg, sft)[1]
        prompts = {"ids": jnp.ones((8, cfg.prompt_len), jnp.int32),
                   "mask": jnp.ones((8, cfg.prompt_len), jnp.int32)}
        after, _, metrics = it(state, {"beta": cfg.rl.beta}, sft, sft, prompts,
                               jax.random.key(2), frozen)
    assert np.isfinite(metrics["loss"])
    return before, after, frozen, sft


def test_rl_update_trains_the_adapters_only():
    cfg = rl_config(**{"lora.rank": 2})
    before, after, frozen, sft = one_rl_iteration(cfg)
    base_leaves = len(jax.tree.leaves(sft))
    adapters = after.params["policy"]
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
    assert names and all("lora_" in n for n in names), names
    # the optimizer's moments cover the adapters only: leaves of adapter shapes, nothing else
    shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    moments = sorted(x.shape for x in jax.tree.leaves(after.opt_state) if x.ndim)
    assert moments == sorted(shapes * 2), (moments, shapes)
    # B moved off zero; the frozen base (the SFT arrays, also the reference) did not move
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
         if "lora_b_" in jax.tree_util.keystr(p)]
    assert all(np.abs(np.asarray(x)).max() > 0 for x in b)
    assert frozen is sft and len(jax.tree.leaves(frozen)) == base_leaves
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), frozen,
                 jax.tree.map(np.asarray, sft))
    # the lr: adapters use rl.lora.lr (default 1e-3), not rl.optim.lr
    assert cfg.rl.lora.lr == 1e-3 and cfg.rl.optim.lr == 1e-4


@pytest.mark.parametrize("args, key, words", [
    (["rl.lora.rank=-1"], "rl.lora.rank", ">= 0"),
    (["rl.lora.alpha=0"], "rl.lora.alpha", "> 0"),
    (["rl.lora.targets=q,x"], "rl.lora.targets", "comma-separated"),
    (["rl.lora.lr=0"], "rl.lora.lr", "> 0"),
    (["rl.lora.rank=4", "rl.lora.targets=mlp_up"], "rl.lora.targets", "has none of"),
    (["rl.lora.rank=4", "rl.train_top_layers=1"], "rl.train_top_layers", "not both"),
])
def test_config_names_the_bad_key(args, key, words):
    with pytest.raises(ConfigError) as e:
        config_resolve.resolve(config_args.from_args(["exp=toy", *args]), 1)      # toy: a gpt2, no gated MLP
    assert f"'{key}'" in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("rl", [{"lora.rank": 2}, {"train_top_layers": 1}],
                         ids=["lora", "top_layers"])
def test_memory_plan_counts_the_trained_part_only(rl):
    """`memory_plan`'s RL stage: params, gradients and AdamW moments of what the state
    trains, the SFT policy (reference and frozen part) and the RM held once beside it."""
    from p3o_jax import memory_plan
    cfg, full = rl_config(1, **rl), rl_config(1)           # one device: whole arrays
    plan, full_plan = (memory_plan.make_plan(c, 1, ("rl",)).stages[0] for c in (cfg, full))
    trained = jax.eval_shape(lambda p: split_policy(cfg, p)[0],
                             jax.eval_shape(lambda: M.init_params(cfg.policy, jax.random.key(0))))
    assert plan.params == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trained))
    assert 2 * plan.params <= plan.opt_state <= 2 * plan.params + 64   # + AdamW step counts
    assert plan.frozen == full_plan.frozen
    assert plan.params < full_plan.params
