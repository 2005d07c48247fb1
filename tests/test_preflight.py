"""Everything knowable before compute is checked before compute (p3o_jax/preflight.py): each
case is one `error:` line naming the key, exit 2, and nothing trained or checkpointed."""
import dataclasses
import os
import warnings

import jax
import pytest

from p3o_jax import config_args
from p3o_jax import config_resolve
from p3o_jax import preflight
from p3o_jax.cli.train import main
from tests.hf_fixtures import save_torch_model

TOY = ["exp=toy", "policy.d_model=32", "policy.n_layers=1", "policy.d_ff=64"]


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny GPT-2 causal LM folder (no reward head)."""
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    save_torch_model("gpt2", path)
    return path


def one_error(capsys, args) -> str:
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def nothing_computed(out) -> bool:
    return not any(os.path.exists(os.path.join(out, d)) for d in ("ckpt", "sft", "rm", "tb",
                                                                  "metrics.jsonl"))


def test_missing_earlier_stages_name_where_and_how(tmp_path, capsys):
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "stages=rl"])
    assert "'stages'" in err and f"{tmp_path}/sft" in err and f"{tmp_path}/rm" in err, err
    assert "stages=sft,rm,rl" in err and "pretrained_sft=" in err, err
    assert nothing_computed(tmp_path)


def test_pretrained_sft_without_a_reward_model(tmp_path, capsys, causal_lm):
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "stages=rl",
                             f"pretrained_sft={causal_lm}"])
    assert f"{tmp_path}/rm" in err and "stages=rm,rl" in err and "pretrained_rm=" in err, err
    assert f"{tmp_path}/sft" not in err, err
    assert nothing_computed(tmp_path)


def test_offline_dpo_needs_the_preference_data(tmp_path, capsys):
    for stage in ("sft", "rm"):
        (tmp_path / stage).mkdir()
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "stages=rl", "algo=dpo_offline"])
    assert f"{tmp_path}/preferences.npz" in err and "stages=rm,rl" in err, err


def test_a_causal_lm_as_the_reward_model_stops_before_sft(tmp_path, capsys, causal_lm):
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", f"pretrained_rm={causal_lm}"])
    assert "'pretrained_rm'" in err and "no tensor 'score.weight'" in err, err
    assert nothing_computed(tmp_path)


def test_sequences_past_a_learned_position_table(tmp_path, capsys):
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "policy.max_len=24"])
    assert "'toy.response_len'" in err and "20 + 10 = 30" in err and "max_len=24" in err, err
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "reward_model.max_len=24"])
    assert "reward_model's max_len=24" in err, err
    assert nothing_computed(tmp_path)


def test_rope_models_past_their_trained_context_warn():
    cfg = config_args.from_args([*TOY, "policy.family=llama", "policy.max_len=24"])
    with pytest.warns(RuntimeWarning, match="past the policy's trained context of 24"):
        config_resolve.resolve(cfg, jax.device_count())
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 30 positions fit
        preflight.check_lengths(dataclasses.replace(cfg, policy=cfg.policy.rebased(max_len=30)))


def test_reward_model_vocabulary_smaller_than_the_tokenizer(tmp_path, capsys):
    err = one_error(capsys, [*TOY, f"out_dir={tmp_path}", "reward_model.vocab_size=100"])
    assert "'reward_model.vocab_size'" in err and "vocab_size=100 < the 132 ids" in err, err
    assert nothing_computed(tmp_path)
