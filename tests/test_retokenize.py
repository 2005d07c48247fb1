"""Re-tokenising a policy's samples for a reward model with another tokenizer."""
import numpy as np
import pytest

from p3o_jax.data.fixtures import tiny_tokenizer
from p3o_jax.retokenize import decode_rows, encode_rows, retokenize

PROMPTS = ["Human: how do I bake bread?\n\nAssistant:", "TL;DR of the post:", "Hi"]
RESPONSES = [" Mix flour, water and yeast.", " I moved to a new city and", ""]


@pytest.fixture(scope="module")
def tokenizers():
    policy, reward = tiny_tokenizer(300), tiny_tokenizer(420)
    assert policy(PROMPTS[0])["input_ids"] != reward(PROMPTS[0])["input_ids"]
    return policy, reward


def test_round_trip_to_the_reward_tokenizer(tokenizers):
    policy, reward = tokenizers
    prompts, prompt_mask = encode_rows(policy, PROMPTS, 40, left=True)
    finished = np.array([True, False, True])         # row 1 ran out of length, row 2 is empty
    responses, response_mask = encode_rows(policy, RESPONSES, 30, left=False, append=finished)
    # row 0 ends with another stop id (as a chat model's end of turn): finished too
    end_of_turn = policy.bos_token_id
    responses[0, response_mask[0].sum() - 1] = end_of_turn
    out = retokenize(policy, reward, prompts, prompt_mask, responses, response_mask, 48, 36,
                     eos_ids=(policy.eos_token_id, end_of_turn))
    assert out.prompts.shape == (3, 48) and out.responses.shape == (3, 36)
    assert decode_rows(reward, out.prompts, out.prompt_mask) == PROMPTS
    assert decode_rows(reward, out.responses, out.response_mask) == RESPONSES
    # layout: prompts left-padded, responses right-padded, pads are the reward model's pad id
    assert (np.diff(out.prompt_mask, axis=1) >= 0).all()
    assert (np.diff(out.response_mask, axis=1) <= 0).all()
    assert (out.prompts[out.prompt_mask == 0] == reward.pad_token_id).all()
    last = out.responses[np.arange(3), out.response_mask.sum(1) - 1]
    np.testing.assert_array_equal(last == reward.eos_token_id, finished)
    np.testing.assert_array_equal(out.response_mask.sum(1)[2], 1)   # the empty one: EOS alone


def test_truncation_keeps_the_prompt_end_and_the_eos(tokenizers):
    policy, reward = tokenizers
    prompts, prompt_mask = encode_rows(policy, PROMPTS[:1], 40, left=True)
    responses, response_mask = encode_rows(policy, RESPONSES[:1], 30, left=False,
                                           append=np.array([True]))
    out = retokenize(policy, reward, prompts, prompt_mask, responses, response_mask, 4, 3,
                     eos_ids=(policy.eos_token_id,))
    full = reward(PROMPTS[0], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(out.prompts[0], full[-4:])
    first = reward(RESPONSES[0], add_special_tokens=False)["input_ids"][:2]
    np.testing.assert_array_equal(out.responses[0], first + [reward.eos_token_id])
