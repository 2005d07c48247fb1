"""Reward functions the tests load by `reward_fns=tests/reward_functions.py:<name>`, as users
write them: TRL's keyword call, verl's `compute_score`."""
import os
import threading

import numpy as np

from p3o_jax.builtin_rewards import text_of
from p3o_jax.config_args import load_experiment
from p3o_jax.toy_task import ToyTask

TOY = ToyTask(load_experiment("toy").toy)


def toy_gold(completion_ids, prompt_ids, **kwargs):
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


def says_answer(prompts, completions, answer, **kwargs):
    """1 if the completion contains the answer; None where there is no answer."""
    return [None if a is None else float(str(a) in text_of(c)) for c, a in zip(completions, answer)]


async def async_length(completions, **kwargs):
    return [len(text_of(c)) / 10 for c in completions]


def seen(completions, **kwargs):
    """0, after keeping the names of the arguments it got (`seen.calls`)."""
    seen.calls.append({"completions": completions, **kwargs})
    return [0.0] * len(completions)


seen.calls = []


def named_only(completions, answer, trainer_state):
    """The training step, for a function that names what it wants (no **kwargs)."""
    return [float(trainer_state.global_step)] * len(completions)


def only_prompts(prompts):
    return [0.0] * len(prompts)


def positional_only(prompts, completions, /, **kwargs):
    return [0.0] * len(completions)


def needs_difficulty(completions, difficulty):
    return [0.0] * len(completions)


def short_list(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(completions, **kwargs):
    return [0.0] * (len(completions) - 1) + [float("nan")]


def raises(completions, **kwargs):
    raise RuntimeError("the grader is down")


def fails_from_row_4(completions, row, **kwargs):
    """Fails on a batch holding row 4 or later (of 8 in two processes: the second's rows)."""
    if max(row) >= 4:
        raise RuntimeError("the grader is down")
    return [0.0] * len(completions)


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature and dict result: the score, and extras verl logs beside it."""
    correct = ground_truth is not None and str(ground_truth) in solution_str
    return {"score": float(correct), "acc": correct, "pred": solution_str[-8:],
            "index": (extra_info or {}).get("index", -1)}


def toy_gold_logged(completion_ids, prompt_ids, trainer_state, **kwargs):
    """`toy_gold`, each call's thread and iteration appended to $TOY_GOLD_LOG."""
    with open(os.environ["TOY_GOLD_LOG"], "a") as f:
        f.write(f"{threading.current_thread().name} {trainer_state.global_step}\n")
    return toy_gold(completion_ids, prompt_ids)
