"""Reward functions called as TRL's GRPOTrainer and verl's reward manager call them (TRL's and
verl's own functions among them), the start-up checks of their signatures and columns, the
built-ins (math-verify's `math_answer`, DAPO's soft overlong punishment), truncation and
`rl.mask_truncated`, and a reward function failing on one process stopping every process with
the same line. The end-to-end runs are in tests/test_own_data.py."""
import concurrent.futures
import os
import subprocess
import threading
import time
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p3o_jax import builtin_rewards as B
from p3o_jax import reward_calls as R
from p3o_jax.algos import gspo, grpo, p3o, ppo, rloo
from p3o_jax.checks import ConfigError, parse_reward_specs
from p3o_jax.data import own
from p3o_jax.rollout import Rollout, drop_truncated, truncated
from data_fixtures import verl_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FNS = os.path.join(HERE, "reward_functions.py")
LAUNCH = os.path.join(os.path.dirname(HERE), "scripts", "launch_local.py")
GSM8K = [("Natalia sold 48 clips, then half as many. Total?", "72"), ("What is 7 + 3?", "10")]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def batch(completions, **columns):
    """The inputs of a call on `completions`: what TRL passes besides the columns."""
    n = len(completions)
    return {"prompts": [[{"role": "user", "content": f"question {i}"}] for i in range(n)],
            "completions": completions, "completion_ids": [[7] * (i + 1) for i in range(n)],
            "truncated": [False] * n, **columns}


def origin(n):
    return [f"prompts.jsonl row {i}" for i in range(n)]


def load_one(spec):
    (f,), _ = R.load(spec, (), has_rm=False, response_len=10)
    return f


# ---------------------------------------------------------------------------------------------
# calls

def test_functions_get_by_keyword_what_trl_passes():
    f = load_one(f"{FNS}:seen")
    state = R.TrainerState(global_step=3, max_steps=10, epoch=0.5)
    inputs = batch([assistant("1"), assistant("2")], answer=["1", None], level=[0, 1])
    np.testing.assert_array_equal(R.call(f, inputs, origin(2), 1, state)[0], [0, 0])
    got = f.fn.calls[-1]
    assert set(got) == {"prompts", "completions", "completion_ids", "truncated",
                        "trainer_state", "answer", "level"}
    assert got["trainer_state"] is state and got["level"] == [0, 1]
    # without **kwargs: only what it names (a column, trainer_state), by keyword
    g = load_one(f"{FNS}:named_only")
    np.testing.assert_array_equal(R.call(g, inputs, origin(2), 2, state)[0], [3, 3])


def test_trl_own_reward_functions():
    """TRL's accuracy_reward (conversational completions `completion[0]["content"]`, a
    `solution` column, None for a gold it cannot parse) and soft overlong punishment
    (completion_ids' lengths), called as TRL calls them."""
    from trl.rewards import get_soft_overlong_punishment

    f = load_one("trl.rewards:accuracy_reward")
    R.check_columns([f], {"solution"}, "the prompts")
    with pytest.raises(ConfigError, match=r"needs the column\(s\) \['solution'\]"):
        R.check_columns([f], {"answer"}, "the prompts")
    completions = [assistant(r"so \boxed{\frac{1}{3}}"), assistant(r"\boxed{\frac{1}{2}}"),
                   assistant(r"\boxed{2}")]
    inputs = batch(completions, solution=[r"$\frac{1}{3}$", r"$\frac{1}{3}$", "no answer here"])
    for workers in (1, 3):      # in threads TRL's own function turns math-verify's timeouts off
        np.testing.assert_array_equal(R.call(f, inputs, origin(3), workers)[0], [1, 0, np.nan])
    theirs = R.RewardFunction("overlong", parse_reward_specs("length_penalty")[0],
                              get_soft_overlong_punishment(10, 4))
    R.check_signature(theirs.fn, theirs.spec)
    ours = B.make_soft_overlong_punishment(10, 4)
    ids = [[1] * n for n in range(13)]
    np.testing.assert_allclose(R.call(theirs, batch([""] * 13) | {"completion_ids": ids},
                                      origin(13))[0], ours(completion_ids=ids))


def test_verl_default_compute_score_on_a_verl_dataset(tmp_path, verl_path):
    """verl's own `default_compute_score`, called per response by keyword on a parquet file in
    verl's layout (the ground truth in `reward_model.ground_truth`), and math_answer reading
    that ground truth through data.answer_key."""
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(GSM8K)), path)
    records = own.load_records(str(path), "data.prompts", "prompt", own.Keys(), seed=0)
    assert set(records.columns) == {"data_source", "ability", "reward_model", "extra_info"}
    columns = R.with_paths(records.columns, {"answer": "reward_model.ground_truth"})
    assert columns["answer"] == ["72", "10"]
    inputs = batch(["... #### 72", "#### 11"], **columns)
    verl = load_one("verl:verl.utils.reward_score:default_compute_score")
    assert verl.name == "verl_default_compute_score"
    np.testing.assert_array_equal(R.call(verl, inputs, origin(2))[0], [1, 0])
    R.check_columns([verl, load_one("math_answer")],
                    R.path_columns(set(records.columns), {"answer": "reward_model.ground_truth"}), "x")
    np.testing.assert_array_equal(R.call(load_one("math_answer"), inputs, origin(2))[0], [1, 0])


def test_verl_dicts_give_the_score_and_numeric_extras():
    f = load_one(f"verl:{FNS}:verl_compute_score")
    rows = verl_rows(GSM8K)
    inputs = batch(["#### 72", "#### 11", "#### 3"],
                   reward_model=[r["reward_model"] for r in rows] + [None],
                   extra_info=[r["extra_info"] for r in rows] + [None],
                   data_source=["openai/gsm8k"] * 3)
    scores, extras = R.call(f, inputs, origin(3))
    np.testing.assert_array_equal(scores, [1, 0, np.nan])   # row 3: no ground truth anywhere
    assert set(extras) == {"acc", "index"}                  # "pred" is no number
    np.testing.assert_array_equal(extras["acc"], [1, 0, np.nan])
    np.testing.assert_array_equal(extras["index"], [0, 1, np.nan])
    # the ground truth's other places, in verl's order
    inputs = batch(["#### 5", "#### 6"], ground_truth=["5", None], answer=["0", "6"])
    np.testing.assert_array_equal(R.call(f, inputs, origin(2))[0], [1, 1])


# ---------------------------------------------------------------------------------------------
# start-up checks

def test_the_start_up_check_reads_names_not_counts(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def reward(completions, **kwargs):\n    return [1.0] * len(completions)\n"
        "def by_state(completions, trainer_state, completion_ids):\n"
        "    return [float(trainer_state.max_steps)] * len(completions)\n"
        "def verl_like(data_source, solution_str, ground_truth, extra_info, /):\n    return 0.0\n"
        "def not_verl(solution_str, ground_truth, extra_info=None):\n    return 0.0\n")
    fns, _ = R.load(f"{tmp_path}/mine.py:reward,{tmp_path}/mine.py:by_state", (), False, 10)
    R.check_columns(fns, set(), "the prompts")
    state = R.TrainerState(global_step=0, max_steps=4)
    assert [R.call(f, batch(["a"]), origin(1), 1, state)[0][0] for f in fns] == [1, 4]
    for spec, message in [
            (f"{FNS}:positional_only", r"positional-only parameters \['prompts', 'completions'\]"),
            (f"{FNS}:only_prompts", r"must accept completions= \(it is called as f\(prompts=, "
                                    r"completions=, completion_ids=, \*\*columns, trainer_state="
                                    r"\)\); it is only_prompts\(prompts\)"),
            (f"verl:{tmp_path}/mine.py:verl_like", r"positional-only"),
            (f"verl:{tmp_path}/mine.py:not_verl", r"must take verl's compute_score\(data_source, "
                                                  r"solution_str, ground_truth, extra_info\)")]:
        with pytest.raises(ConfigError, match=message):
            R.load(spec, (), False, 10)
    with pytest.raises(ConfigError, match=r"needs the column\(s\) \['answer'\]"):
        R.check_columns([load_one(f"{FNS}:named_only")], {"level"}, "the prompts")
    with pytest.raises(ConfigError, match=r"verl_compute_score needs a ground truth: a "
                                          r"reward_model column with ground_truth, a "
                                          r"ground_truth column or data.answer_key's column"):
        R.check_columns([load_one(f"verl:{FNS}:verl_compute_score")], {"data_source"}, "x")


def test_one_parser_for_reward_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.py").write_text("def f(completions, **kwargs):\n    return [2.0]\n")
    spec, = parse_reward_specs("verl:~/mine.py:f")
    assert (spec.where, spec.function, spec.verl, spec.name) == (f"{tmp_path}/mine.py", "f", True,
                                                                "verl_f")
    assert R.call(load_one("~/mine.py:f"), batch(["a"]), origin(1))[0][0] == 2
    for text, message in [("~/nope.py:f", r"~/nope.py: no such file"),
                          ("./mine:f", r"'./mine:f': expected module:function or file.py:f"),
                          ("exact_match", r"'exact_match' is no built-in reward \(math_answer, ")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_specs(text)


def test_column_value_reads_dotted_paths():
    record = {"reward_model": {"style": "rule", "ground_truth": "72"}, "a.b": 1, "n": None}
    assert own.column_value(record, "reward_model.ground_truth") == "72"
    assert own.column_value(record, "a.b") == 1                # a flat column with a dot
    assert own.column_value(record, "reward_model.missing") is None
    assert own.column_value(record, "n.x") is None and own.column_value(record, "n") is None


# ---------------------------------------------------------------------------------------------
# built-ins

def test_math_answer_compares_symbolically():
    cases = [("3/4", r"the answer is \frac{3}{4}", 1), (r"\frac{3}{4}", "so it is 3/4", 1),
             ("3/4", "first 3/4 of it, then 4", 0),              # a last number is no gold
             ("72", "#### 72 dollars", 1), ("Natalia ... 48 + 24 = 72\n#### 72", "#### 72", 1),
             ("-5", "\u22125", 1), ("\u22125", "#### -5", 1), ("0.5", r"\boxed{\frac{1}{2}}", 1),
             ("1,250", "It costs $1250.", 1), (r"x^2 + 1", r"\boxed{1 + x^2}", 1),
             ("12", "no number", 0), ("12", r"\boxed{13}", 0),
             # the question restated is no answer (SmolLM2 learned this under RL when the
             # completion's expressions were read: "15 + 19" is 34 symbolically)
             ("34", "To find 15 + 19, we need", 0), ("34", "15 + 19 = 34", 1),
             ("34", "15 + 19 = 34, so", 1), ("3/4", r"it is $\dfrac{3}{4}$.", 1),
             ("1250", "1,250 in all", 1)]
    got = B.math_answer([assistant(c) for _, c, _ in cases] + ["7"], [g for g, _, _ in cases]
                        + [None])
    assert got == [float(want) for _, _, want in cases] + [None]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:   # reward_workers' threads
        assert list(pool.map(lambda c: B.math_answer([c[1]], [c[0]])[0], cases)) == got[:-1]


def test_math_answer_stops_a_grading_that_hangs():
    grader = B.MathGrader(processes=1, wait_s=2)     # math-verify's own limit is 5 s
    assert grader([("1", r"\boxed{10^{10^{10}}}"), ("3/4", "3/4")]) == [0.0, 1.0]


def test_a_caller_waiting_for_a_grading_process_gets_the_hung_ones_place():
    """Callers share the processes (each reward worker's thread runs a pool): one waits for
    the only process while it hangs on another caller's grading, and gets a new one once that
    is stopped (it waited forever before)."""
    grader = B.MathGrader(processes=1, wait_s=2)
    got = {}

    def grade(name, pair):
        got[name] = grader([pair])
    hung = threading.Thread(target=grade, args=("hung", ("1", r"\boxed{10^{10^{10}}}")))
    hung.start()
    while not grader.started:                        # the hung grading holds the process
        time.sleep(0.01)
    waiting = threading.Thread(target=grade, args=("waiting", ("3/4", "3/4")), daemon=True)
    waiting.start()
    hung.join()
    waiting.join(timeout=60)
    assert not waiting.is_alive(), "a caller waited forever for a stopped grading's process"
    assert got == {"hung": [0.0], "waiting": [1.0]} and grader.started == 1


def test_format_length_and_overlong_rewards():
    assert B.final_answer("so 3 + 4 = 7. #### 7") == "7"
    assert B.final_answer(r"the answer is \boxed{\frac{1}{2}} indeed") == r"\frac{1}{2}"
    assert B.final_answer_format(completions=["#### 4", "4", assistant(r"\boxed{4} ")]) == [1, 0, 1]
    assert B.length_penalty(completion_ids=[[1, 2], [3]]) == [-0.002, -0.001]
    overlong = B.make_soft_overlong_punishment(max_len=10, cache_len=4)
    lengths = [0, 5, 6, 7, 8, 9, 10, 11]          # 0 up to 6, linear to -1 at 10, -1 beyond
    assert overlong(completion_ids=[[1] * n for n in lengths]) == [0, 0, 0, -0.25, -0.5, -0.75,
                                                                    -1, -1]
    built_in = B.builtin("soft_overlong_punishment", response_len=20)   # cache: a fifth
    assert built_in(completion_ids=[[1] * 16, [1] * 18]) == [0, -0.5]
    assert all(B.builtin(name, 20) for name in B.BUILTINS)


# ---------------------------------------------------------------------------------------------
# truncation

def test_truncated_is_cut_at_the_length_without_a_stop_token():
    tokens = np.array([[5, 6, 2], [5, 2, 0], [5, 6, 7], [5, 6, 9]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(truncated(tokens, mask, (2, 9)), [False, False, True, False])
    np.testing.assert_array_equal(jax.jit(lambda t, m: truncated(t, m, (2,)))(tokens, mask),
                                  [False, False, True, True])


def test_mask_truncated_gives_the_gradient_of_the_batch_without_them():
    """Every loss after `drop_truncated`, as a function of the log-probs [B, K, T], has the
    gradient of the same loss on the kept responses alone (P3O: on the pairs whose responses
    are both kept), and none on the dropped ones."""
    rng = np.random.default_rng(0)
    Bn, K, T = 3, 3, 5
    logp_old = jnp.asarray(rng.normal(-1, 0.3, (Bn, K, T)), jnp.float32)
    logp = logp_old + jnp.asarray(rng.normal(0, 0.1, (Bn, K, T)), jnp.float32)
    logp_ref = logp_old + 0.05
    mask = (np.arange(T) < rng.integers(1, T + 1, (Bn, K, 1))).astype(np.int32)
    adv = jnp.asarray(rng.normal(size=(Bn, K)), jnp.float32)
    cut = np.zeros((Bn, K), bool)
    cut[0, 1] = cut[2, 0] = cut[2, 2] = True
    keep = ~cut
    buffer = Rollout(tokens=jnp.zeros((Bn, K, T + 2), jnp.int32), mask=jnp.ones((Bn, K, T + 2)),
                     resp_mask=jnp.asarray(mask), logp_ref=logp_ref, rewards=adv)
    dropped = drop_truncated(buffer, jnp.asarray(cut)).resp_mask
    np.testing.assert_array_equal(dropped, mask * keep[..., None])
    row = lambda x: x[keep][None]          # the kept responses as one group [1, M, ...]
    flat = lambda x: x.reshape(-1, T)
    delta = p3o.pairwise_delta(adv, 0.1 * adv, 0.1)
    pairs = p3o.to_pairs(jnp.asarray(keep), K).all(-1)
    to_pairs = lambda x: p3o.to_pairs(x, K)[pairs]
    losses = {
        "grpo sequence": (lambda lp, m, pick: grpo.grpo_loss(
            pick(lp), pick(logp_old), pick(logp_ref), pick(m), pick(adv), kl_coef=0.1)),
        "grpo token": (lambda lp, m, pick: grpo.grpo_loss(
            pick(lp), pick(logp_old), pick(logp_ref), pick(m), pick(adv), aggregation="token")),
        "rloo": lambda lp, m, pick: rloo.rloo_loss(pick(lp), pick(logp_old), pick(m), pick(adv)),
        "gspo": lambda lp, m, pick: gspo.gspo_loss(pick(lp), pick(logp_old), pick(m), pick(adv)),
        "ppo": lambda lp, m, pick: ppo.policy_loss(
            flat(pick(lp)), flat(pick(logp_old)),
            flat(jnp.broadcast_to(pick(adv)[..., None], pick(lp).shape)), flat(pick(m))),
    }
    for name, loss in losses.items():
        got = jax.jit(jax.grad(lambda lp: loss(lp, dropped, lambda x: x)[0]))(logp)
        want = jax.jit(jax.grad(lambda lp: loss(lp, mask, row)[0]))(logp)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=name)
        assert np.all(np.asarray(got)[cut] == 0) and np.any(np.asarray(got)[keep] != 0), name
    for clip in p3o.CLIP_MODES:
        got = jax.jit(jax.grad(lambda lp: p3o.p3o_loss_k(lp, logp_old, dropped, delta,
                                                         clip=clip)[0]))(logp)
        want = jax.jit(jax.grad(lambda lp: p3o.p3o_loss(
            to_pairs(lp), to_pairs(logp_old), to_pairs(mask), delta.reshape(-1)[pairs],
            clip=clip)[0]))(logp)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=clip)
        assert np.all(np.asarray(got)[cut] == 0)


# ---------------------------------------------------------------------------------------------
# several processes

SCRIPT = """
import sys, types
import numpy as np
from p3o_jax.config import DistConfig
from p3o_jax.distributed import initialize, local_rows
initialize(DistConfig())
from p3o_jax import reward_calls as R
from p3o_jax.data import own
from p3o_jax.sharding import make_mesh, shard_batch

class Task:
    tokenizer = types.SimpleNamespace(batch_decode=lambda ids, **_: [str(i) for i in ids])
    eos_ids = (7,)
    def prompt_records(self, split, rows):
        rows = [int(r) for r in rows]
        return own.Records("prompt", [f"q{r}" for r in rows], {}, {"row": rows},
                           [f"prompts.jsonl row {r}" for r in rows], "")

mesh = make_mesh(2, 1, 1)
place = lambda x: shard_batch(local_rows(mesh, len(x), lambda a, b: x[a:b]), mesh)
ones = np.ones((8, 2, 3), np.int32)
fns, _ = R.load(sys.argv[1] + ":fails_from_row_4", (), False, 3)
try:
    R.FunctionRewards(fns, Task(), "rl", mesh)({"row": place(np.arange(8))},
                                              types.SimpleNamespace(tokens=place(ones),
                                                                    mask=place(ones)))
    print("no error")
except R.RewardError as e:
    print(f"error: {e}")
"""


def test_a_failure_on_one_process_stops_every_process_with_its_line(tmp_path):
    """Process 1 holds rows 4-7, where the function fails; process 0's rows score fine, and
    it raises the same RewardError instead of going on to the next collective."""
    (tmp_path / "score.py").write_text(SCRIPT)
    logs = tmp_path / "logs"
    subprocess.run([sys.executable, LAUNCH, "-n", "2", "--devices-per-process", "1",
                    "--timeout", "120", "--log-dir", str(logs), "--", sys.executable,
                    str(tmp_path / "score.py"), FNS], check=True, timeout=150,
                   cwd=os.path.dirname(HERE))
    lines = [[line for line in (logs / f"process_{i}.log").read_text().splitlines()
              if line.startswith(("error:", "no error"))] for i in range(2)]
    assert lines[0] == lines[1] == [
        f"error: reward function {FNS}:fails_from_row_4 raised RuntimeError: the grader is "
        f"down (on the batch of prompts from prompts.jsonl row 4 on)"], lines
