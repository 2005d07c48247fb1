"""Partial-layer training (`rl.train_top_layers`, p3o_jax/top_layers.py): an RL update moves the
top blocks and the head only, the optimizer holds moments for them alone, and the reference,
which shares the frozen trunk, gives the logits of a full copy."""
import jax
import numpy as np
import pytest
from test_lora import one_rl_iteration, rl_config, tokens

from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax.checks import ConfigError
from p3o_jax import model as M
from p3o_jax import top_layers
from p3o_jax.rl import join_policy, split_policy


def test_split_and_join():
    cfg = M.ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=4, n_heads=4)
    params = M.init_params(cfg, jax.random.key(0))
    trained, frozen = top_layers.split(params, 2)
    assert set(trained) == {"layer_2", "layer_3", "final_norm", "lm_head"}
    assert {"embed", "layer_0", "layer_1"} <= set(frozen) and not set(trained) & set(frozen)
    joined = top_layers.join(trained, frozen)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))
    tied = M.init_params(cfg.rebased(tie_embeddings=True), jax.random.key(0))
    assert set(top_layers.split(tied, 1)[0]) == {"layer_3", "final_norm"}  # head = embedding


def test_rl_update_trains_the_top_layers_only():
    cfg = rl_config(train_top_layers=2)
    before, after, frozen, sft = one_rl_iteration(cfg)
    top = after.params["policy"]
    assert set(top) == {"layer_1", "layer_2", "final_norm", "lm_head"}
    # moments (Adam's mu and nu) for the top only
    shapes = sorted(x.shape for x in jax.tree.leaves(top))
    moments = sorted(x.shape for x in jax.tree.leaves(after.opt_state) if x.ndim)
    assert moments == sorted(shapes * 2)
    # the top moved, the frozen trunk (the SFT arrays themselves) did not
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), top,
                         before.params["policy"])
    assert all(m > 0 for m in jax.tree.leaves(moved["layer_2"]))
    assert set(frozen) == set(sft) - set(top)
    assert all(frozen[k] is sft[k] for k in frozen)
    sft_trunk = jax.tree.map(np.asarray, {k: sft[k] for k in frozen})
    jax.tree.map(np.testing.assert_array_equal, frozen, sft_trunk)
    # the reference (the initial top on the shared trunk) = a full copy of the SFT policy
    ids, mask = tokens(T=cfg.prompt_len)
    ref = join_policy(cfg, split_policy(cfg, sft)[0], frozen)
    copy = jax.tree.map(jax.numpy.copy, sft)
    np.testing.assert_allclose(M.logits(ref, cfg.policy, ids, mask),
                               M.logits(copy, cfg.policy, ids, mask), atol=1e-6)
    policy = join_policy(cfg, top, frozen)
    assert np.abs(np.asarray(M.logits(policy, cfg.policy, ids, mask)
                             - M.logits(ref, cfg.policy, ids, mask))).max() > 0


def test_more_layers_than_the_policy_has():
    with pytest.raises(ConfigError, match="'rl.train_top_layers'.*n_layers=2"):
        config_resolve.resolve(config_args.from_args(["exp=toy", "rl.train_top_layers=3"]), 1)
