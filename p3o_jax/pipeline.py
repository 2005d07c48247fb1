"""The RLHF pipeline: SFT -> reward model -> RL (any algorithm of `p3o_jax.algos`), then the
evaluation table. `run_experiment(cfg)` is the library's entry point; `p3o_jax.cli.train` its
command line.

Stages run in order (`stages=sft,rm,rl`); a stage left out is loaded from `<out_dir>/<stage>`
(RL's from `<out_dir>/<algo>`). The reward is the reward model's score and/or the reward
functions' (`reward_fns`, p3o_jax/reward_calls.py); with reward functions alone no reward
model is read or trained (`ExperimentConfig.uses_reward_model`). Each stage writes its params there, metrics go to
`<out_dir>/metrics.jsonl` and TensorBoard (`<out_dir>/tb`), the config to
`<out_dir>/config.json`, and the final table to `<out_dir>/summary.json` and stdout.
Checkpoints go to `<out_dir>/ckpt/<stage>` (RL: `ckpt/<algo>`); running the same command again
continues where the last run stopped (p3o_jax/checkpoint.py).

Several processes (TPU pod hosts, SLURM tasks, `scripts/launch_local.py`) run the same command
as one run: each builds only its rows of every batch (`Run.batch`), and process 0 alone writes
the files above (p3o_jax/distributed.py).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import sys

import jax
import numpy as np

from p3o_jax import checkpoint, hf, memory_plan, reward_calls, storage
from p3o_jax import model as M
from p3o_jax.algos import ALGORITHMS, dpo, reward_model, sft
from p3o_jax.checkpoint import load_params, save_params
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_resolve import resolve
from p3o_jax.data import fixtures
from p3o_jax.distributed import concat_rows, is_main_process, to_host
from p3o_jax.evaluate import compare, evaluate_policy, win_rate
from p3o_jax.logger import MetricsLogger, format_table
from p3o_jax import preflight, run_lock
from p3o_jax.retokenize import RetokenizedReward
from p3o_jax.rl import (LoopState, RLIteration, final_policy, frozen_policy, initial_params,
                        rl_optimizer)
from p3o_jax.rollout import response_logprobs, response_reward
from p3o_jax.engine import sample
from p3o_jax.sharding import make_mesh
from p3o_jax.compile_check import check_run, table
from p3o_jax.stage import Run, stage_loop, supervised_step
from p3o_jax.reward_calls import FunctionRewards
from p3o_jax.tasks import DatasetRLHF, Task, TextRLHF, ToyRLHF, UnusableData
from p3o_jax.train_state import create_state, param_shardings


def init_sharded(model_cfg: M.ModelConfig, key, mesh):
    return jax.jit(lambda k: M.init_params(model_cfg, k),
                   out_shardings=param_shardings(model_cfg, mesh))(key)


# ---------------------------------------------------------------------------------------------
# SFT and the reward model

def train_supervised(run: Run, stage: str, params, model_cfg, loss_fn, batches, steps, optim):
    """SFT and reward modelling: `steps` optimizer steps of `loss_fn(params, batch, cfg)`,
    `batches(i)` giving step i's batch on the mesh."""
    update, tx, shardings = supervised_step(model_cfg, loss_fn, optim, steps, run.mesh,
                                            batches(0))
    state = create_state(params, tx, shardings)

    def step(i, state, carry):
        return *update(state, batches(i)), carry
    return stage_loop(run, stage, stage, state, steps, step).params


def initial_policy(run: Run):
    """SFT's starting params: `base_model`'s weights (its architecture is already
    `cfg.policy`, see `config_resolve.resolve`), or `cfg.policy` initialised at random."""
    cfg = run.cfg
    if not cfg.base_model:
        return init_sharded(cfg.policy, run.key(1), run.mesh)
    _, params = hf.load_pretrained(cfg.base_model, run.mesh, dtype=cfg.policy.dtype,
                                   param_dtype=cfg.policy.param_dtype)
    return params


def sft_rows(task: Task, batch_size: int, step: int, start: int, stop: int) -> dict:
    """Rows `start .. stop - 1` of SFT step `step`'s batch. `sft_batch(n, k)` is rows
    `k * n .. (k + 1) * n - 1` of one stream, so the rows are read in blocks whose size
    divides their offset: one block, `sft_batch(batch_size, step)` itself, in a single
    process."""
    first, count = step * batch_size + start, stop - start
    size = math.gcd(first, count)
    return concat_rows([task.sft_batch(size, (first + k) // size) for k in range(0, count, size)])


def stage_sft(run: Run):
    c = run.cfg.sft
    batches = lambda i: run.batch(c.batch_size, functools.partial(sft_rows, run.task,
                                                                  c.batch_size, i))
    return train_supervised(run, "sft", initial_policy(run), run.cfg.policy, sft.loss, batches,
                            c.steps, c.optim)


def response_pairs(run: Run, params, prompts, prompt_mask):
    """Two responses per prompt from `params`, in chunks of `rl.prompts_per_iter` prompts:
    numpy [n, 2, N] tokens and mask (n rounded down to whole chunks)."""
    chunk, out = run.cfg.rl.prompts_per_iter, []
    n = len(prompts) // chunk * chunk
    for start in range(0, n, chunk):
        p = run.batch(chunk, lambda a, b: {"ids": prompts[start + a:start + b],
                                           "mask": prompt_mask[start + a:start + b]})
        s = sample(params, run.cfg.policy, run.sampling, p["ids"], p["mask"], run.key(2, start),
                   n=2)
        out.append(to_host((s.tokens, s.mask)))
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def stage_rm(run: Run, sft_params):
    cfg, c = run.cfg, run.cfg.rm
    n_pairs = c.n_pairs // cfg.rl.prompts_per_iter * cfg.rl.prompts_per_iter
    data = run.task.preference_data(
        n_pairs, lambda p, m: response_pairs(run, sft_params, p, m), cfg.seed)
    if is_main_process():  # atomically: offline DPO and the frontier's runs read it later
        storage.write_atomically(run.path("preferences.npz"), lambda f: np.savez(f, **data), "wb")
    n_val = max(len(data["tokens"]) // 10 // c.batch_size, 1) * c.batch_size  # splits evenly
    train = {k: v[n_val:] for k, v in data.items()}
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(train["tokens"]))
                            for _ in range(c.steps * c.batch_size // len(train["tokens"]) + 1)])

    def batches(i):
        idx = order[i * c.batch_size:(i + 1) * c.batch_size]
        return run.batch(c.batch_size, lambda a, b: {
            k: train[k][idx[a:b]] for k in ("tokens", "mask", "resp_mask")})
    init = (sft_params if cfg.rm_model == cfg.policy
            else init_sharded(cfg.rm_model, run.key(3), run.mesh))
    params = train_supervised(run, "rm", init, cfg.rm_model, reward_model.loss, batches,
                              c.steps, c.optim)
    P = data["tokens"].shape[-1] - data["resp_mask"].shape[-1]
    reward = jax.jit(lambda p, t, m: response_reward(p, cfg.rm_model, t, m, P))
    r = np.concatenate([  # the held-out pairs, a training batch at a time
        to_host(reward(params, *run.batch(c.batch_size, lambda a, b: (
            data["tokens"][s + a:s + b], data["mask"][s + a:s + b]))))
        for s in range(0, n_val, c.batch_size)])
    metrics = {"val_accuracy": win_rate(r[:, 0], r[:, 1])[0]}  # agreement with the labels
    if "gold" in data:  # and with the gold ordering (the annotator is noisy, gold is not)
        gold = data["gold"][:n_val]
        metrics["val_gold_agreement"] = win_rate(
            np.sign(r[:, 0] - r[:, 1]) * np.sign(gold[:, 0] - gold[:, 1]), 0.0)[0]
    run.logger.log("rm", c.steps, metrics)
    return params


# ---------------------------------------------------------------------------------------------
# RL

def retokenized_rm(run: Run, rm_params):
    """How the reward model scores the policy's samples: None (inside the scoring program)
    when it reads the policy's tokens or there is none, else a `RetokenizedReward` (a
    pretrained reward model with its own tokenizer: decoded and re-encoded into prompts of
    `prompt_len` and responses of up to twice `response_len` tokens, on the host)."""
    if rm_params is None or run.rm_tokenizer is None:
        return None
    place = lambda n, *arrays: run.batch(n, lambda a, b: tuple(x[a:b] for x in arrays))
    return RetokenizedReward(run.task.tokenizer, run.rm_tokenizer, rm_params, run.cfg.rm_model,
                             run.cfg.prompt_len, 2 * run.cfg.response_len, place,
                             run.task.eos_ids)


def function_rewards(run: Run, split: str) -> FunctionRewards | None:
    """The reward functions scoring responses to the prompts of `split` ("rl", "eval"); None
    without any."""
    if not run.reward_functions:
        return None
    return FunctionRewards(run.reward_functions, run.task, split, run.mesh,
                           run.cfg.reward_workers, run.cfg.data.reward_column_paths)


def policy_evaluator(run: Run, sft_params, rm_params):
    """The eval prompts and `evaluate(policy_params, step)`, the per-prompt results of a
    policy trained for `step` iterations on them (the same prompts and sampling key for every
    policy): `final_table` and `rl.eval_every`."""
    p = run.prompts(run.cfg.eval_prompts, "eval")
    rm_fn, fn_scorer = retokenized_rm(run, rm_params), function_rewards(run, "eval")
    return p, lambda params, step: evaluate_policy(
        params, sft_params, rm_params, run.cfg.policy, run.cfg.rm_model, p["ids"], p["mask"],
        run.key(5), run.sampling, run.task.gold_reward, rm_fn,
        fn_scorer and fn_scorer.at(run.trainer_state(step)), p.get("row"), run.rm_weight)


def eval_along(run: Run, sft_params, rm_params, total: int, frozen=None):
    """`evaluate(step, loop)` for `stage_loop`: every `rl.eval_every` steps and at the end,
    the policy (the `rl.LoopState`'s, joined to its `frozen` part) against the SFT policy on
    the eval prompts; None when not due or off."""
    every = run.cfg.rl.eval_every
    if not every:
        return None
    _, evaluate = policy_evaluator(run, sft_params, rm_params)
    sft_eval = evaluate(sft_params, 0)
    policy = lambda loop: final_policy(run.cfg, loop.train.params["policy"], frozen)
    return lambda step, loop: (compare(evaluate(policy(loop), step), sft_eval)
                                if step % every == 0 or step == total else None)


def gold_of_samples(run: Run, prompts, samples) -> float:
    """Mean gold reward of sampled responses [B, K, N] (tasks that know it)."""
    ids, mask, tokens, resp_mask = to_host((prompts["ids"], prompts["mask"], samples.tokens,
                                            samples.mask))
    return float(np.mean([run.task.gold_reward(ids, mask, tokens[:, k], resp_mask[:, k])
                          for k in range(tokens.shape[1])]))


def stage_rl(run: Run, sft_params, rm_params):
    """Online RL: `rl.iterations` of `RLIteration` (sample -> score -> prepare -> update),
    prompts and sampling keys addressed by the iteration, the algorithm's carry checkpointed.
    The state trains the policy or a part of it (`rl.split_policy`: LoRA adapters, the top
    layers); the SFT policy is the reference and, under those, also holds the frozen part.

    With `rl.max_staleness` = s > 0 the rollout side runs s iterations ahead: iteration i
    first sets the sampling of iteration i + s's prompts going with the current weights, then
    learns from its own batch, drawn s updates ago (at the start, with the first weights),
    while a thread computes the host's rewards of batch i + 1 (reward functions, a reward
    server, a reward model with another tokenizer): a slow verifier runs beside the device's
    scoring, update and sampling instead of before them. The batches in flight are part of
    the checkpoint (`rl.LoopState`); the rewards in flight are computed again on resume. Returns the plain policy (adapters merged)."""
    cfg, algo = run.cfg, ALGORITHMS[run.cfg.algo]
    if algo.offline:
        return stage_offline(run, sft_params, rm_params)
    iteration = RLIteration(cfg, run.mesh, run.sampling, rm_fn=retokenized_rm(run, rm_params),
                            fn_scorer=function_rewards(run, "rl"), rm_weight=run.rm_weight,
                            rollout_mesh=run.rollout_mesh)
    frozen = frozen_policy(cfg, sft_params)
    rl, ahead = cfg.rl, cfg.rl.max_staleness
    prompts = lambda it: run.prompts(rl.prompts_per_iter, "rl", start=it * rl.prompts_per_iter)

    def generate(state, it):
        """Iteration `it`'s samples from the state's weights (none past the last)."""
        if it >= rl.iterations:
            return iteration.no_samples()
        return iteration.generate(state, prompts(it), run.key(4, it), frozen)

    def ahead_of_time(state, it):
        """`generate` placed as a checkpoint restores batches in flight, so that an
        interrupted run goes on with the very programs an uninterrupted one runs."""
        return jax.device_put(generate(state, it), placement)

    # the host's rewards of the next batch, computed beside this one's update (one process:
    # with several, their collectives could interleave differently across processes)
    beside = (concurrent.futures.ThreadPoolExecutor(1, "host-rewards")
              if ahead and jax.process_count() == 1 else None)
    pending = {}

    def step(it, loop, carry):
        state, in_flight = loop.train, loop.in_flight
        if it == 0:
            in_flight = tuple(ahead_of_time(state, i) for i in range(ahead))
        if ahead:
            samples = in_flight[0]
            in_flight = in_flight[1:] + (ahead_of_time(state, it + ahead),)
        else:
            samples = generate(state, it)
        rewards = pending.pop(it, None)     # None after a restart: computed here
        if beside and it + 1 < rl.iterations:
            pending[it + 1] = beside.submit(iteration.host_rewards, prompts(it + 1),
                                            in_flight[0], run.trainer_state(it + 1))
        state, metrics = iteration.learn(state, carry, sft_params, rm_params, prompts(it),
                                         samples, frozen, trainer_state=run.trainer_state(it),
                                         rewards=rewards)
        metrics["staleness"] = min(it, ahead)
        if run.task.gold_reward is not None:  # the hidden gold reward of the rollouts
            metrics["gold_reward"] = gold_of_samples(run, prompts(it), samples)
        metrics = {k: float(v) for k, v in metrics.items()}
        return LoopState(state, in_flight), metrics, algo.next_carry(carry, metrics, cfg)

    start = LoopState(iteration.init_state(initial_params(cfg, sft_params, rm_params)),
                      tuple(iteration.no_samples() for _ in range(ahead)))
    placement = jax.tree.map(lambda x: x.sharding, start.in_flight[:1])[0] if ahead else None
    try:
        loop = stage_loop(run, "rl", f"rl:{algo.name}", start, rl.iterations, step,
                          carry=algo.init_carry(cfg), log_every=1, show=("reward", "kl_k1"),
                          evaluate=eval_along(run, sft_params, rm_params, rl.iterations, frozen))
    finally:
        if beside:
            beside.shutdown(wait=True, cancel_futures=True)
    return final_policy(cfg, loop.train.params["policy"], frozen)


def offline_steps(cfg: ExperimentConfig) -> int:
    """Steps of an offline algorithm: `dpo.epochs` passes of `rl.prompts_per_iter` pairs over
    the `rm.n_pairs` preference pairs."""
    chunk = cfg.rl.prompts_per_iter
    return cfg.dpo.epochs * (cfg.rm.n_pairs // chunk * chunk) // chunk


def stage_offline(run: Run, sft_params, rm_params):
    """Offline DPO on the reward model's preference data (chosen first): the reference's
    log-probs once, then `offline_steps` updates of `rl.prompts_per_iter` pairs."""
    cfg = run.cfg
    path = run.path("preferences.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: offline DPO needs the preference data the rm stage writes")
    data = dict(np.load(path))
    chunk = cfg.rl.prompts_per_iter
    n = len(data["tokens"]) // chunk * chunk
    data = {k: data[k][:n] for k in ("tokens", "mask", "resp_mask")}
    P = data["tokens"].shape[-1] - data["resp_mask"].shape[-1]
    ref_logp = jax.jit(lambda p, t, m: response_logprobs(p, cfg.policy, t, m, P,
                                                         cfg.rl.temperature))
    logp_ref = np.concatenate([
        to_host(ref_logp(sft_params, *run.batch(chunk, lambda a, b: (data["tokens"][s + a:s + b],
                                                                      data["mask"][s + a:s + b]))))
        for s in range(0, n, chunk)])
    buffer = dpo.preference_rollout(data, logp_ref)
    steps = offline_steps(cfg)
    # each chunk of pairs is used once (`dpo.epochs` passes over the data instead of epochs
    # over a rollout buffer): the update of `RLIteration` with rl.epochs = 1
    once = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, epochs=1))
    iteration = RLIteration(once, run.mesh, run.sampling,
                            rl_optimizer(once, steps * cfg.rl.minibatches))
    start = LoopState(iteration.init_state(initial_params(cfg, sft_params, rm_params)))
    frozen = frozen_policy(cfg, sft_params)
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(cfg.dpo.epochs)])

    def step(it, loop, carry):
        idx = order[it * chunk:(it + 1) * chunk]
        batch = run.batch(chunk, lambda a, b: jax.tree.map(lambda x: x[idx[a:b]], buffer))
        state, metrics = iteration.update(loop.train, batch, frozen)
        return LoopState(state), metrics, carry

    loop = stage_loop(run, "rl", "rl:dpo_offline", start, steps, step,
                      evaluate=eval_along(run, sft_params, rm_params, steps, frozen))
    return final_policy(cfg, loop.train.params["policy"], frozen)


# ---------------------------------------------------------------------------------------------
# evaluation and the final table

EVAL_SCALARS = ("reward", "rm", "gold", "kl_k1", "kl_k3", "length")


def eval_records(task: Task, prompts: dict, per_prompt: dict) -> list[dict]:
    """One policy's evaluation (`evaluate_policy`'s per-prompt arrays) on the eval `prompts`
    (numpy: "ids", "mask" [B, P], with reward functions "row" [B]) as one record per held-out
    prompt: `index` (its place among the eval prompts), `row` and `origin` (its record, for
    tasks with prompt records), the `prompt` and `response` texts, and its scalar results:
    reward, rm, gold, kl_k1, kl_k3, length (those the run has) and `rewards`, each reward
    function's value (None: no opinion). The final table's means are theirs (`summarize`): a
    reward function's over its non-None values, `<name>_acc` the fraction of those equal to 1."""
    ids, mask = prompts["ids"], prompts["mask"]
    rows = prompts.get("row")
    if rows is None and hasattr(task, "prompt_rows"):
        rows = task.prompt_rows(len(ids), "eval")
    origins = (task.prompt_records("eval", rows).origin if rows is not None
               and hasattr(task, "prompt_records") else None)
    texts = zip(task.decode(ids, mask), task.decode(per_prompt["tokens"], per_prompt["mask"]))
    value = lambda x: None if np.isnan(x) else float(x)
    names = [k for k in per_prompt if k.startswith("reward/")]
    records = []
    for i, (prompt, response) in enumerate(texts):
        r = {"index": i}
        if rows is not None:
            r["row"] = int(rows[i])
        if origins is not None:
            r["origin"] = origins[i]
        r |= {"prompt": prompt, "response": response}
        r |= {k: value(per_prompt[k][i]) for k in EVAL_SCALARS if k in per_prompt}
        if names:
            r["rewards"] = {k.partition("/")[2]: value(per_prompt[k][i]) for k in names}
        records.append(r)
    return records


def eval_file(policy: str) -> str:
    """The per-prompt records of `policy`'s final evaluation, beside summary.json."""
    return f"eval_{policy}.jsonl"


def final_table(run: Run, sft_params, rl_params, rm_params) -> dict:
    """The final evaluation of the SFT policy and, if trained, the RL policy on the same eval
    prompts: its table on stdout and in `<out_dir>/summary.json` ("rows"; "samples", three
    responses of each policy; "eval_records", the name of each policy's per-prompt file
    beside it, `eval_<policy>.jsonl`, a JSON line of `eval_records` per prompt)."""
    p, ev = policy_evaluator(run, sft_params, rm_params)
    results = {"sft": ev(sft_params, 0)}
    if rl_params is not None:
        offline = ALGORITHMS[run.cfg.algo].offline
        results[run.cfg.algo] = ev(rl_params, offline_steps(run.cfg) if offline
                                   else run.cfg.rl.iterations)
    rows = [{"policy": name, **compare(r, results["sft"])} for name, r in results.items()]
    prompts = to_host(p)   # whole, on every process (a collective)
    # three held-out prompts with each policy's response (the same prompts for every policy)
    samples = {name: run.task.format_samples(prompts["ids"], prompts["mask"], r["tokens"],
                                             r["mask"], n=3)
               for name, r in results.items()}
    summary = {"rows": rows, "samples": samples,
               "eval_records": {name: eval_file(name) for name in results}}
    if not is_main_process():
        return summary
    components = [k for f in run.reward_functions for k in (f.name, f.name + "_acc")]
    columns = ["policy", "gold", "gold_se", "reward", "reward_se", "rm", "rm_se", *components,
               "kl_k1", "kl_k1_se", "kl_k3", "length", "win_gold", "win_gold_se", "win_reward",
               "win_reward_se", "win_rm", "win_rm_se"]
    print("\n" + format_table(rows, [c for c in columns if c in rows[0]]))
    print("\nsamples from the final policy:")
    print(samples[list(results)[-1]])
    for name, r in results.items():
        lines = "".join(json.dumps(x) + "\n" for x in eval_records(run.task, prompts, r))
        storage.write_atomically(run.path(eval_file(name)), lambda f: f.write(lines))
    storage.write_atomically(run.path("summary.json"), lambda f: json.dump(summary, f, indent=2))
    return summary


def make_task(cfg: ExperimentConfig) -> Task:
    """The task of `cfg.task`. Real data is built here, before anything compiles; with
    `smoke`, the data paths left empty are generated under `<out_dir>/smoke_data`. Data that
    cannot be read stops the run with `UnusableData` (exit 2), an OSError too, whatever its
    errno (a read that fails is not a full disk); a write of the tokenised-data cache that
    fails is `storage.WriteFailed` (exit 74)."""
    try:
        if cfg.task == "toy":
            return ToyRLHF(cfg.toy, cfg.rm.annotator_temperature)
        model = cfg.base_model or cfg.pretrained_sft    # the policy's origin, if any
        if cfg.task == "dataset":
            return DatasetRLHF(cfg.data, cfg.data.tokenizer or model, cfg.seed, cfg.eval_prompts,
                               os.path.join(cfg.data.data_dir or cfg.out_dir, "p3o_tokenized"),
                               model)
        data_cfg = cfg.data
        if cfg.smoke:
            smoke = os.path.join(cfg.out_dir, "smoke_data")
            with storage.writing(smoke):
                data_cfg = fixtures.smoke_data(cfg.data, cfg.task, smoke)
        return TextRLHF(cfg.task, data_cfg, data_cfg.tokenizer or model, cfg.seed, model)
    except OSError as e:
        raise UnusableData(f"reading the data of task={cfg.task} failed: {e}") from e


def load_reward_functions(cfg: ExperimentConfig, task: Task):
    """`reward_calls.load` of `cfg.reward_fns`, each function checked against the task's prompt
    columns: ([], 1.0) without any. ConfigError when the task cannot give them prompts."""
    if not cfg.reward_fns:
        return [], 1.0
    if not hasattr(task, "prompt_records"):
        raise ConfigError(f"config key 'reward_fns': task={cfg.task} has no prompt records for "
                          f"reward functions; use task=dataset (or toy)")
    fns, rm_weight = reward_calls.load(cfg.reward_fns, cfg.reward_weights, cfg.uses_reward_model,
                                       task.response_len, cfg.reward_remote)
    columns = reward_calls.path_columns(task.prompt_columns, cfg.data.reward_column_paths)
    reward_calls.check_columns(fns, columns, "the prompts")
    return fns, rm_weight


def eval_count(cfg: ExperimentConfig, available: int) -> int:
    """`eval_prompts`, at most the `available` held-out prompts, in whole batches over the mesh."""
    ways = cfg.mesh.data * cfg.mesh.fsdp
    n = min(cfg.eval_prompts, available) // ways * ways
    if not n:
        raise ConfigError(f"config key 'data.eval': {available} held-out prompts, fewer than one "
                          f"per batch device (data*fsdp={ways}); give more prompts or data.eval")
    return n


def check_memory(cfg: ExperimentConfig, mesh) -> None:
    """`dist.check_memory`: the run's programs compiled for `mesh`'s devices against the
    per-device budget (`compile_check.check_run`), their XLA memory printed; MemoryPlanError
    when one does not fit."""
    budget = memory_plan.device_budget(cfg.dist)
    rows = check_run(cfg, mesh, budget)
    if is_main_process():
        print(f"memory check: the run's programs fit {budget / memory_plan.GIB:.2f} GiB per "
              f"device (GiB per device):\n{table(rows)}", file=sys.stderr)


@run_lock.one_writer  # one run per out_dir at a time, before anything is written
def run_experiment(cfg: ExperimentConfig) -> dict:
    """Every stage of `cfg` (checked and resolved first), then the evaluation table."""
    cfg = resolve(cfg, jax.device_count())
    preflight.check(cfg)  # the earlier stages and pretrained folders it reads, before any work
    task = make_task(cfg)
    preflight.check_vocabularies(cfg, task)
    if cfg.policy.vocab_size < task.vocab_size:
        raise ConfigError(f"config key 'policy.vocab_size': {cfg.policy.vocab_size} < the task's "
                          f"vocabulary of {task.vocab_size}")
    fns, rm_weight = load_reward_functions(cfg, task)
    if cfg.task == "dataset":   # no more eval prompts than the held-out set has
        cfg = dataclasses.replace(cfg, eval_prompts=eval_count(cfg, task.prompt_count("eval")))
    training_devices = jax.devices()[:jax.device_count() - cfg.rl.rollout_devices]
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=training_devices)
    if cfg.dist.check_memory:
        check_memory(cfg, mesh)
    with storage.writing(cfg.out_dir):
        os.makedirs(cfg.out_dir, exist_ok=True)
    if is_main_process():
        storage.write_atomically(os.path.join(cfg.out_dir, "config.json"),
                                 lambda f: json.dump(dataclasses.asdict(cfg), f, indent=2))
    run = Run(cfg, mesh, task, MetricsLogger(cfg.out_dir, enabled=is_main_process(), log=cfg.log,
                                             config=dataclasses.asdict(cfg), name=cfg.name),
              fns, rm_weight)
    stages = cfg.stage_list
    if not cfg.resume:
        for name in stages:
            checkpoint.discard(cfg, name)

    def stage(name, output, model_cfg, train, pretrained="", role="policy"):
        """`train()` the stage and save its params to `<out_dir>/<output>` (and, with
        `export_hf`, an HF folder to `<out_dir>/hf/<output>`), or load them from there if the
        stage is left out or finished in an earlier run, or from the `pretrained` checkpoint."""
        if pretrained:
            print(f"{name}: {pretrained} (pretrained)", file=sys.stderr)
            return hf.load_pretrained(pretrained, mesh, role=role, dtype=model_cfg.dtype,
                                      param_dtype=model_cfg.param_dtype)[1]
        path = run.path(output)
        done = (name in stages and cfg.resume and checkpoint.finished(cfg, name)
                and os.path.isdir(path))
        if done:
            print(f"{name}: finished in an earlier run, loading {path}", file=sys.stderr)
        if name not in stages or done:
            return load_params(path, model_cfg, mesh)
        checkpoint.stop_if_preempted(f"before the {name} stage")
        params = train()
        save_params(path, params)
        if cfg.export_hf:
            hf.save_pretrained(params, model_cfg, run.path(os.path.join("hf", output)),
                               tokenizer=run.task.tokenizer, as_reward_model=role == "reward",
                               eos_ids=run.task.eos_ids)
        return params

    try:
        with jax.set_mesh(mesh), checkpoint.handle_preemption():
            sft_params = stage("sft", "sft", cfg.policy, lambda: stage_sft(run),
                               cfg.pretrained_sft)
            rm_params = (stage("rm", "rm", cfg.rm_model, lambda: stage_rm(run, sft_params),
                               cfg.pretrained_rm, role="reward")
                         if cfg.uses_reward_model else None)
            policy = (stage("rl", cfg.algo, cfg.policy,
                            lambda: stage_rl(run, sft_params, rm_params))
                      if "rl" in stages else None)
            checkpoint.stop_if_preempted("before the final evaluation")
            return final_table(run, sft_params, policy, rm_params)
    finally:
        run.logger.close()
