"""Bring your own checkpoints: the paper's HH setting (RL from a published SFT policy, scored by
a published reward model of another family and tokenizer) end to end, offline, on tiny
stand-ins built here with transformers' PyTorch classes."""
import json

import numpy as np
import pytest
import torch
import transformers

from p3o_jax.cli.train import main
from p3o_jax.data.fixtures import tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny GPT-NeoX SFT policy on the smoke data's tokenizer, and a tiny GPT-J reward model
    (`GPTJForSequenceClassification`) with a tokenizer of its own."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    policy_tok, reward_tok = tiny_tokenizer(), tiny_tokenizer(420)
    assert policy_tok.get_vocab() != reward_tok.get_vocab()
    policy = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=len(policy_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, eos_token_id=policy_tok.eos_token_id,
        bos_token_id=policy_tok.bos_token_id, pad_token_id=policy_tok.pad_token_id))
    policy.save_pretrained(root / "sft")
    policy_tok.save_pretrained(root / "sft")
    reward = transformers.GPTJForSequenceClassification(transformers.GPTJConfig(
        vocab_size=len(reward_tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
        n_positions=160, num_labels=1, pad_token_id=reward_tok.pad_token_id))
    with torch.no_grad():
        reward.score.weight.normal_(0, 1.0)
    reward.save_pretrained(root / "rm")
    reward_tok.save_pretrained(root / "rm")
    return root


def test_hh_paper_setting_runs_offline(checkpoints, tmp_path, capsys):
    """`make train EXP=hh ARGS="pretrained_sft=... pretrained_rm=... stages=rl"` on the smoke
    data: RL starts from the SFT checkpoint, the GPT-J reward model scores re-tokenised
    responses (timed), the table is printed and the trained policy exported."""
    out = tmp_path / "run"
    args = ["exp=hh", "smoke=true", f"out_dir={out}", "stages=rl",
            f"pretrained_sft={checkpoints / 'sft'}", f"pretrained_rm={checkpoints / 'rm'}",
            f"data.tokenizer={checkpoints / 'sft'}", "rl.iterations=2", "eval_prompts=8"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "has its own tokenizer" in captured.err
    assert "| p3o |" in captured.out
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rl = [r for r in rows if r["stage"] == "rl:p3o"]
    assert len(rl) == 2 and all(r["time_retokenized_reward"] > 0 for r in rl)
    assert all(np.isfinite(r["rm_reward"]) and r["rm_reward"] != 0 for r in rl)
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["policy"]["family"] == "gpt_neox" and saved["reward_model"]["family"] == "gptj"
    assert not (out / "sft").exists() and not (out / "rm").exists()   # nothing trained there
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "hf" / "p3o")
    assert type(exported).__name__ == "GPTNeoXForCausalLM"


def test_pretrained_sft_and_base_model_conflict(checkpoints, capsys):
    assert main(["exp=hh", "smoke=true", f"pretrained_sft={checkpoints / 'sft'}",
                 f"base_model={checkpoints / 'sft'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'pretrained_sft'" in err[0], err


def test_a_missing_checkpoint_folder_is_one_line(capsys):
    assert main(["exp=hh", "smoke=true", "pretrained_rm=./no/such/rm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'pretrained_rm'" in err[0] and "no such folder" in err[0], err
