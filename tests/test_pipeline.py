"""End to end: every stage and algorithm on a tiny toy config, plus config errors."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from p3o_jax import config as C
from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax import hf
from p3o_jax import model as M
from p3o_jax.cli import export
from p3o_jax.cli.train import main
from p3o_jax.pipeline import run_experiment


def tiny(tmp_path, **over) -> C.ExperimentConfig:
    cfg = config_args.load_experiment("toy")
    cfg = dataclasses.replace(
        cfg, out_dir=str(tmp_path), eval_prompts=128, log_every=1,
        mesh=C.MeshConfig(data=2, fsdp=2, tensor=2),
        policy=cfg.policy.rebased(d_model=32, n_layers=1, d_ff=64),
        sft=dataclasses.replace(cfg.sft, steps=60, batch_size=32,
                                optim=C.OptimConfig(lr=1e-2, warmup_steps=5)),
        rm=dataclasses.replace(cfg.rm, n_pairs=256, steps=40, batch_size=32,
                               optim=C.OptimConfig(lr=3e-3, warmup_steps=5)),
        rl=dataclasses.replace(cfg.rl, iterations=12, prompts_per_iter=32, epochs=2,
                               minibatches=2, beta=0.01,
                               optim=C.OptimConfig(lr=3e-3, warmup_steps=0)),
        p3o=dataclasses.replace(cfg.p3o, delta_norm="batch_std"))
    for k, v in over.items():
        cfg = config_args.override(cfg, k, str(v))
    return cfg


def metrics(tmp_path, stage):
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT + RM + P3O once; other algorithms reuse its SFT and RM stages."""
    path = tmp_path_factory.mktemp("toy")
    return path, run_experiment(tiny(path))


def _check_rl(path, summary, algo):
    rl = metrics(path, f"rl:{algo}")
    assert rl, "no RL metrics logged"
    for r in rl:
        assert all(np.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
    rows = {r["policy"]: r for r in summary["rows"]}
    # the RL policy optimises the reward model it is given: its RM score beats the SFT policy's
    # on most held-out prompts (a scale-free check: the tiny RM's scores span a small range)
    assert rows[algo]["rm"] > rows["sft"]["rm"], rows
    assert rows[algo]["win_rm"] > 0.6, rows
    return rl


def test_p3o_end_to_end(trained):
    path, summary = trained
    sft = metrics(path, "sft")
    assert sft[-1]["loss"] < sft[0]["loss"] - 1.0
    rm = metrics(path, "rm")
    assert rm[-1]["val_gold_agreement"] > 0.6   # the RM learned the gold ordering
    rl = _check_rl(path, summary, "p3o")
    for key in ("reward", "rm_reward", "kl_k1", "kl_k3", "clip_frac", "entropy", "response_length",
                "delta_abs_mean", "grad_norm", "time_generate", "time_score", "time_update"):
        assert key in rl[-1], key
    assert rl[-1]["kl_k1"] > 0                   # moved away from the reference
    for name in ("sft", "rm", "p3o", "config.json", "summary.json", "tb", "preferences.npz"):
        assert os.path.exists(os.path.join(path, name)), name


@pytest.mark.parametrize("algo", ["ppo", "dpo", "dpo_offline", "rloo", "grpo", "gspo"])
def test_baselines_end_to_end(trained, algo):
    """Each baseline runs beside P3O in the same out_dir, on its SFT and RM stages (README's
    `make train ARGS="stages=rl algo=ppo"` after `make train`): RL checkpoints, params and
    metrics belong to their algorithm."""
    path, _ = trained
    summary = run_experiment(tiny(path, algo=algo, stages="rl"))
    assert os.path.isdir(os.path.join(path, algo)) and os.path.isdir(path / "ckpt" / algo)
    if algo == "dpo_offline":  # offline DPO optimises the preference data, not the RM: just finite
        rows = {r["policy"]: r for r in summary["rows"]}
        assert np.isfinite(rows[algo]["gold"]) and metrics(path, "rl:dpo_offline")
    else:
        rl = _check_rl(path, summary, algo)
        if algo == "ppo":
            assert "value_loss" in rl[-1] and "policy_clip_frac" in rl[-1]
        if algo in ("rloo", "grpo", "gspo"):
            assert "advantage_abs_mean" in rl[-1] and "clip_frac" in rl[-1]


@pytest.mark.parametrize("algo, rollout_is", [("p3o", "token"), ("p3o", "sequence"),
                                              ("grpo", "token"), ("rloo", "sequence"),
                                              ("ppo", "token")])
def test_stale_rollouts_train_with_importance_weights(trained, tmp_path, algo, rollout_is):
    """`rl.max_staleness=2`: each batch is learned from 2 updates after it was sampled (the
    first two with fewer), the update weighs it by pi_prox / pi_behav, and the run logs its
    staleness, the weights and the sampler's gap; the RL policy still beats the SFT one."""
    path, _ = trained
    for stage in ("sft", "rm"):
        shutil.copytree(path / stage, tmp_path / stage)
    summary = run_experiment(tiny(tmp_path, algo=algo, stages="rl", **{
        "rl.max_staleness": 2, "rl.rollout_is": rollout_is, "rl.iterations": 8}))
    rl = _check_rl(tmp_path, summary, algo)
    assert [r["staleness"] for r in rl] == [0, 1, 2, 2, 2, 2, 2, 2]
    for r in rl:
        assert 0 < r["is_weight_mean"] <= r["is_weight_max"] <= 2.0 and 0 <= r["is_capped_frac"]
        assert r["logp_gap_max"] >= r["logp_gap_mean"] >= 0
    # stale batches are off-policy: weights away from 1 and a gap far above rounding
    assert all(r["is_weight_max"] > 1.001 and r["logp_gap_max"] > 1e-3 for r in rl[2:]), rl
    assert rl[0]["logp_gap_max"] < 1e-4       # staleness 0: the sampler's numerics only


def test_continuous_engine_trains_on_the_mesh(trained, tmp_path, monkeypatch):
    """`rl.engine=continuous` (8 slots for 64 responses, on the 2 x 2 x 2 mesh): the RL stage
    samples through the slots and the policy still beats the SFT one."""
    from p3o_jax import engine

    path, _ = trained
    for stage in ("sft", "rm"):
        shutil.copytree(path / stage, tmp_path / stage)
    traced, decode = [], engine.continuous_decode
    monkeypatch.setattr(engine, "continuous_decode",
                        lambda *a: traced.append(a[-1]) or decode(*a))
    summary = run_experiment(tiny(tmp_path, stages="rl", **{"rl.engine": "continuous",
                                                            "rl.slots": 8}))
    _check_rl(tmp_path, summary, "p3o")
    assert 8 in traced, traced             # the RL sampler ran through 8 slots


def test_rollout_devices_sample_on_their_own_mesh(trained, tmp_path, monkeypatch):
    """`rl.rollout_devices=4` of the 8: the RL sampler runs on the last 4 with the weights of
    the latest update (copied there after each), scoring and the update on the first 4; with
    staleness 1 the batch sampled there is learned from one update later."""
    import jax
    from p3o_jax import rl
    path, _ = trained
    for stage in ("sft", "rm"):
        shutil.copytree(path / stage, tmp_path / stage)
    seen = []

    def sample(params, *args, **kwargs):
        out = sampler(params, *args, **kwargs)
        seen.append(({d.id for x in jax.tree.leaves(params) for d in x.devices()},
                     {d.id for d in out.tokens.devices()}))
        return out
    sampler = rl.sample
    monkeypatch.setattr(rl, "sample", sample)
    summary = run_experiment(tiny(tmp_path, stages="rl", **{
        "rl.rollout_devices": 4, "mesh.data": 1, "rl.max_staleness": 1, "rl.iterations": 6}))
    rollout = {d.id for d in jax.devices()[4:]}
    assert len(seen) == 6 and all(p == o == rollout for p, o in seen), seen
    rl_rows = _check_rl(tmp_path, summary, "p3o")
    assert [r["staleness"] for r in rl_rows] == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("args, key", [
    (["rl.betta=0.1"], "rl.betta"),
    (["rl.beta=high"], "rl.beta"),
    (["sft.batch_size=30", "mesh.tensor=2"], "sft.batch_size"),
    (["mesh.fsdp=3"], "mesh"),
    (["algo=trpo"], "algo"),
    (["policy.n_heads=3", "mesh.tensor=2", "mesh.fsdp=4"], "policy"),
    (["rl"], "rl"),
    (["rl.rollout_devices=8"], "rl.rollout_devices"),
    (["rl.rollout_is=pair"], "rl.rollout_is"),
])
def test_config_errors_name_the_key(args, key, capsys):
    assert main(["exp=toy", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err


def test_model_overrides_rederive_defaulted_fields():
    """`policy.d_model=...` moves head_dim and d_ff with it unless they were set, in the
    experiment or on the command line, in either order."""
    base = config_args.load_experiment("toy").policy                       # d_model 128, d_ff derived
    p = config_args.from_args(["exp=toy", "policy.d_model=256"]).policy
    assert (p.d_model, p.head_dim, p.d_ff) == (256, 256 // base.n_heads, 1024)
    for args in (["policy.d_ff=300", "policy.d_model=256"], ["policy.d_model=256", "policy.d_ff=300"]):
        p = config_args.from_args(["exp=toy", *args]).policy
        assert (p.head_dim, p.d_ff) == (256 // base.n_heads, 300)
    p = config_args.from_args(["exp=toy", "policy.head_dim=16", "policy.d_model=256"]).policy
    assert (p.head_dim, p.d_ff) == (16, 1024)
    p = config_args.from_args(["exp=toy", "policy.n_heads=8", "policy.n_kv_heads=2", "policy.n_heads=4"]).policy
    assert (p.n_heads, p.n_kv_heads) == (4, 2)
    p = config_args.from_args(["exp=toy", "policy.family=llama"]).policy
    assert (p.activation, p.tie_embeddings, p.qkv_bias) == ("silu", False, False)


def test_every_trained_stage_exports_an_hf_folder(trained, tmp_path):
    """hf/sft and hf/p3o load as GPT-2 causal LMs with our logits, hf/rm as a GPT-2
    sequence classifier with our rewards; the export command writes any checkpoint."""
    import jax
    import torch
    import transformers

    from p3o_jax import model as M
    from p3o_jax.checkpoint import load_params
    from p3o_jax.cli import export
    from p3o_jax.sharding import make_mesh
    from tests.hf_fixtures import torch_logits

    path, _ = trained
    cfg = config_resolve.resolve(tiny(path), jax.device_count())
    ids = np.array([[2, 40, 41, 42, 43, 3, 10], [0, 0, 2, 44, 45, 3, 11]], np.int32)
    mask = (ids != 0).astype(np.int32)
    for stage in ("sft", "p3o"):
        ours = load_params(os.path.join(path, stage), cfg.policy, make_mesh())
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path / "hf" / stage)
        np.testing.assert_allclose(torch_logits(theirs, ids, mask)[mask == 1],
                                   np.asarray(M.logits(ours, cfg.policy, ids, mask))[mask == 1],
                                   atol=1e-4)
    rm = load_params(os.path.join(path, "rm"), cfg.rm_model, make_mesh())
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(path / "hf" / "rm")
    right = np.array([[2, 40, 41, 3, 0, 0]], np.int32)     # HF reads the last non-pad token
    with torch.no_grad():
        score = classifier(input_ids=torch.as_tensor(right, dtype=torch.long)).logits[0, 0]
    ours = M.sequence_reward(rm, cfg.rm_model, right, (right != 0).astype(np.int32))
    np.testing.assert_allclose(float(score), float(ours[0]) - float(rm["reward_head"]["b"]),
                               atol=1e-4)
    assert export.main([f"run={path}", "stage=p3o", "step=1", f"to={tmp_path}/p3o-1"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p3o-1") is not None
    from p3o_jax.toy_task import EOS_ID     # generate stops where the sampler does
    for folder in (path / "hf" / "p3o", tmp_path / "p3o-1"):
        assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == [EOS_ID]
    assert not (path / "hf" / "rm" / "generation_config.json").exists()
    assert export.main([f"run={path}", "stage=p3o", "step=5"]) == 2


@pytest.mark.parametrize("over", [{"rl.lora.rank": 4, "rl.lora.lr": 1e-2},
                                  {"rl.train_top_layers": 1}], ids=["lora", "top_layers"])
def test_rl_trains_a_part_of_the_policy_end_to_end(trained, tmp_path, over):
    """RL on the SFT and RM stages of `trained` with LoRA adapters or the top block only: it
    still beats the SFT policy on the RM, and saves and exports a plain (merged) policy."""
    path, _ = trained
    for name in ("sft", "rm"):
        shutil.copytree(path / name, tmp_path / name)
    summary = run_experiment(tiny(tmp_path, stages="rl", **over))
    _check_rl(tmp_path, summary, "p3o")
    assert os.path.isfile(tmp_path / "hf" / "p3o" / "model.safetensors")
    # a checkpoint (the trained part only) exports as the whole policy: the last one is the
    # finished policy
    last = max(int(d) for d in os.listdir(tmp_path / "ckpt" / "p3o") if d.isdigit())
    assert export.main([f"run={tmp_path}", "stage=p3o", f"step={last}",
                        f"to={tmp_path}/ckpt_export"]) == 0
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    logits = [M.logits(*hf.load_pretrained(str(d))[::-1], ids, np.ones_like(ids))
              for d in (tmp_path / "ckpt_export", tmp_path / "hf" / "p3o")]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
