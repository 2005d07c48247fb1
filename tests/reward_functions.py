"""Reward functions the tests load by `reward_fns=tests/reward_functions.py:<name>`, as users
write them (TRL's signature)."""
import numpy as np

from p3o_jax.config_args import load_experiment
from p3o_jax.rewards import text_of
from p3o_jax.toy_task import ToyTask

TOY = ToyTask(load_experiment("toy").toy)


def toy_gold(prompts, completions, completion_ids, prompt_ids, **_):
    """The toy task's gold reward, from the prompt's and the completion's token ids."""
    P, N = TOY.config.prompt_len, TOY.config.response_len
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        ids, mask = np.zeros((2, 1, P), np.int32)
        ids[0, P - len(p):], mask[0, P - len(p):] = p, 1
        resp, resp_mask = np.zeros((2, 1, N), np.int32)
        resp[0, :len(c)], resp_mask[0, :len(c)] = c, 1
        out.append(float(TOY.gold_reward(ids, mask, resp, resp_mask)[0]))
    return out


def says_answer(prompts, completions, answer, **_):
    """1 if the completion contains the answer; None where there is no answer."""
    return [None if a is None else float(str(a) in text_of(c)) for c, a in zip(completions, answer)]


async def async_length(prompts, completions, **_):
    return [len(text_of(c)) / 10 for c in completions]


def only_prompts(prompts):
    return [0.0] * len(prompts)


def needs_difficulty(prompts, completions, difficulty):
    return [0.0] * len(completions)


def short_list(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **_):
    return [0.0] * (len(completions) - 1) + [float("nan")]


def raises(prompts, completions, **_):
    raise RuntimeError("the grader is down")


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(ground_truth is not None and ground_truth in solution_str)}
