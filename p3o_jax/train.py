"""The RLHF pipeline: SFT -> reward model -> RL (P3O, PPO, online/offline DPO).

    python -m p3o_jax.train exp=toy [key=value ...]       (`make train EXP=toy ARGS="..."`)

Stages run in order (`stages=sft,rm,rl`); a stage left out is loaded from `<out_dir>/<stage>`.
Each stage writes its params there, metrics go to `<out_dir>/metrics.jsonl` and TensorBoard
(`<out_dir>/tb`), the config to `<out_dir>/config.json`, and the final table to
`<out_dir>/summary.json` and stdout.

Checkpoints go to `<out_dir>/ckpt/<stage>`; running the same command again continues where the
last run stopped (p3o_jax/checkpoint.py). Exit codes: 0 done, 1 too many non-finite updates in
a row, 2 bad config (or a checkpoint written with another one), 75 stopped by SIGTERM/SIGINT with
a checkpoint saved (run again to continue), 143/130 a second SIGTERM/SIGINT (immediate exit).

Several processes (TPU pod hosts, SLURM tasks, `scripts/launch_local.py`) run the same command
as one run: `main` joins them first (`distributed.initialize`), each builds only its rows of
every batch (`Run.batch`), and process 0 alone writes the files above (p3o_jax/distributed.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from p3o_jax import checkpoint, distributed, hf, learners, memory_plan
from p3o_jax import model as M
from p3o_jax.checkpoint import StageCheckpoints, load_params, save_params, skip_nonfinite
from p3o_jax.config import ConfigError, ExperimentConfig, from_args, validate, validate_models
from p3o_jax.data import fixtures
from p3o_jax.distributed import concat_rows, is_main_process, local_rows, to_host
from p3o_jax.evaluate import compare, evaluate_policy, win_rate
from p3o_jax.logger import MetricsLogger, format_table
from p3o_jax.rollout import (response_logprobs, response_reward, response_values,
                             rollout_metrics, score)
from p3o_jax.sampler import SamplingConfig, sample_pairs
from p3o_jax.sharding import make_mesh, shard_batch
from p3o_jax.tasks import Task, TextRLHF, ToyRLHF
from p3o_jax.train_state import (create_state, jit_step, make_optimizer, param_shardings,
                                 state_shardings)


@dataclasses.dataclass
class Run:
    """What every stage needs: config, mesh, task, logger, output folder."""
    cfg: ExperimentConfig
    mesh: jax.sharding.Mesh
    task: Task
    logger: MetricsLogger

    @property
    def policy_cfg(self) -> M.ModelConfig:
        return self.cfg.policy

    @property
    def rm_cfg(self) -> M.ModelConfig:
        return self.cfg.rm_model

    def path(self, name: str) -> str:
        return os.path.abspath(os.path.join(self.cfg.out_dir, name))

    def sampling(self, greedy: bool = False) -> SamplingConfig:
        rl = self.cfg.rl
        return SamplingConfig(max_new_tokens=self.task.response_len,
                              temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                              greedy=greedy, eos_id=self.task.eos_id, pad_id=self.task.pad_id)

    def key(self, *tags: int) -> jax.Array:
        key = jax.random.key(self.cfg.seed)
        for t in tags:
            key = jax.random.fold_in(key, t)
        return key

    def batch(self, n: int, read) -> dict:
        """A global batch of `n` rows on the mesh, of which this process builds only the rows
        its devices hold: `read(start, stop)` gives rows `start .. stop - 1` as numpy."""
        return shard_batch(local_rows(self.mesh, n, read), self.mesh)

    def prompts(self, n: int, split: str, start: int = 0):
        def read(a, b):
            ids, mask = self.task.prompts(b - a, split, start + a)
            return {"ids": ids, "mask": mask}
        return self.batch(n, read)


def progress(desc: str, start: int, total: int):
    """Steps `start .. total - 1` behind a progress bar (process 0's only)."""
    return tqdm(range(start, total), desc=desc, initial=start, total=total, dynamic_ncols=True,
                disable=not is_main_process())


def init_sharded(model_cfg: M.ModelConfig, key, mesh):
    return jax.jit(lambda k: M.init_params(model_cfg, k),
                   out_shardings=param_shardings(model_cfg, mesh))(key)


# ---------------------------------------------------------------------------------------------
# stages

def train_supervised(run: Run, stage: str, params, model_cfg, loss_fn, batches, steps, optim):
    """Shared loop of SFT and reward modelling: `batches(i)` gives step i's batch on the mesh."""
    tx = make_optimizer(optim, steps)
    shardings = state_shardings(model_cfg, tx, run.mesh)
    state = create_state(params, tx, shardings)
    loss = functools.partial(loss_fn, cfg=model_cfg)
    step = jit_step(skip_nonfinite(learners.gradient_step(loss)), shardings, batches(0), run.mesh)
    with StageCheckpoints(run.cfg, stage, steps, run.task) as ckpt:
        state, meta = ckpt.restore(state)
        run.logger.rewind(stage, meta["step"])
        bar = progress(stage, meta["step"], steps)
        for i in bar:
            state, metrics = step(state, batches(i))
            if i % run.cfg.log_every == 0 or i == steps - 1 or metrics["skipped_nonfinite"]:
                m = run.logger.log(stage, i, metrics)
                bar.set_postfix(loss=f"{m['loss']:.3f}")
            ckpt.end_step(i + 1, state, metrics)
        ckpt.finish(state)
    return state.params


def initial_policy(run: Run):
    """SFT's starting params: `base_model`'s weights (its architecture is already
    `run.policy_cfg`, see `with_base_model`), or `cfg.policy` initialised at random."""
    if not run.cfg.base_model:
        return init_sharded(run.policy_cfg, run.key(1), run.mesh)
    p = run.policy_cfg
    _, params = hf.load_pretrained(run.cfg.base_model, run.mesh, dtype=p.dtype,
                                   param_dtype=p.param_dtype)
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
    params = initial_policy(run)
    batches = lambda i: run.batch(c.batch_size, functools.partial(sft_rows, run.task,
                                                                  c.batch_size, i))
    return train_supervised(run, "sft", params, run.policy_cfg, learners.sft_loss, batches,
                            c.steps, c.optim)


def sample_responses(run: Run, params, prompts, prompt_mask):
    """Two responses per prompt from `params`, in chunks of `rl.prompts_per_iter` prompts:
    numpy [n, 2, N] tokens and mask (n rounded down to whole chunks)."""
    chunk, out = run.cfg.rl.prompts_per_iter, []
    n = len(prompts) // chunk * chunk
    for start in range(0, n, chunk):
        p = run.batch(chunk, lambda a, b: {"ids": prompts[start + a:start + b],
                                           "mask": prompt_mask[start + a:start + b]})
        s = sample_pairs(params, run.policy_cfg, run.sampling(), p["ids"], p["mask"],
                         run.key(2, start), n=2)
        out.append(to_host((s.tokens, s.mask)))
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def stage_rm(run: Run, sft_params):
    c = run.cfg.rm
    n_pairs = c.n_pairs // run.cfg.rl.prompts_per_iter * run.cfg.rl.prompts_per_iter
    data = run.task.preference_data(
        n_pairs, lambda p, m: sample_responses(run, sft_params, p, m), run.cfg.seed)
    if is_main_process():  # atomically: offline DPO and the frontier's runs read it later
        np.savez(run.path("preferences.tmp.npz"), **data)
        os.replace(run.path("preferences.tmp.npz"), run.path("preferences.npz"))
    n_val = max(len(data["tokens"]) // 10 // c.batch_size, 1) * c.batch_size  # splits evenly
    train = {k: v[n_val:] for k, v in data.items()}
    rng = np.random.default_rng(run.cfg.seed)
    order = np.concatenate([rng.permutation(len(train["tokens"]))
                            for _ in range(c.steps * c.batch_size // len(train["tokens"]) + 1)])

    def batches(i):
        idx = order[i * c.batch_size:(i + 1) * c.batch_size]
        return run.batch(c.batch_size, lambda a, b: {
            k: train[k][idx[a:b]] for k in ("tokens", "mask", "resp_mask")})
    init = sft_params if run.rm_cfg == run.policy_cfg else init_sharded(run.rm_cfg, run.key(3), run.mesh)
    params = train_supervised(run, "rm", init, run.rm_cfg, learners.reward_loss, batches,
                              c.steps, c.optim)
    P = data["tokens"].shape[-1] - data["resp_mask"].shape[-1]
    reward = jax.jit(lambda p, t, m: response_reward(p, run.rm_cfg, t, m, P))
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


def _loss_for(run: Run):
    rl, pc = run.cfg.rl, run.policy_cfg
    if run.cfg.algo == "p3o":
        return functools.partial(learners.p3o_loss, cfg=pc, rl=rl)
    if run.cfg.algo == "ppo":
        return functools.partial(learners.ppo_loss, cfg=pc, critic_cfg=run.rm_cfg, rl=rl)
    return functools.partial(learners.dpo_loss, cfg=pc, rl=rl)


def _scale_delta(buffer: dict, rl) -> dict:
    """Optionally divide rewards and KLs by the batch std of Delta (keeps shift invariance)."""
    if rl.delta_norm == "none":
        return buffer
    r, l = buffer["rewards"], buffer["seq_kl"]
    delta = (r[:, :, None] - r[:, None, :]) - rl.beta * (l[:, :, None] - l[:, None, :])
    scale = jnp.sqrt(jnp.mean(delta ** 2) * r.shape[1] / max(r.shape[1] - 1, 1)) + 1e-6
    return dict(buffer, rewards=r / scale, seq_kl=l / scale)


def prompt_offset(prompts, prompt_mask):
    """delta(x): a fixed N(0, 1) draw per prompt [B, P] -> [B], keyed by a hash of its tokens
    (weights per position counted from the right, so left padding does not change it)."""
    weights = jax.random.bits(jax.random.key(0), prompts.shape[-1:], jnp.uint32)
    h = jnp.sum(prompts.astype(jnp.uint32) * prompt_mask.astype(jnp.uint32) * weights, -1)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.key(1), k)))(h)


def policy_evaluator(run: Run, sft_params, rm_params):
    """The eval prompts and `evaluate(params)`, the per-prompt results of `params` on them
    (the same prompts and sampling key for every policy): `final_table` and `rl.eval_every`."""
    p = run.prompts(run.cfg.eval_prompts, "eval")
    return p, lambda params: evaluate_policy(params, sft_params, rm_params, run.policy_cfg,
                                             run.rm_cfg, p["ids"], p["mask"], run.key(5),
                                             run.sampling(), run.task.gold_reward)


def eval_due(rl, step: int, total: int) -> bool:
    """`rl.eval_every` says to evaluate after `step` of `total` steps (and at the start)."""
    return rl.eval_every > 0 and (step % rl.eval_every == 0 or step == total)


def stage_rl(run: Run, sft_params, rm_params):
    cfg, rl, mesh = run.cfg, run.cfg.rl, run.mesh
    _, evaluate = policy_evaluator(run, sft_params, rm_params)
    sft_eval = evaluate(sft_params) if rl.eval_every else None
    log_eval = lambda step, params: run.logger.log("eval", step, compare(evaluate(params), sft_eval))
    if cfg.algo == "dpo_offline":
        return stage_dpo_offline(run, sft_params, log_eval)
    ppo = cfg.algo == "ppo"
    ref = sft_params
    if ppo:  # separate critic initialised from the reward model, value head <- reward head
        critic = dict(rm_params, value_head=rm_params["reward_head"])
        params, model_cfgs = {"policy": sft_params, "critic": critic}, {
            "policy": run.policy_cfg, "critic": run.rm_cfg}
    else:
        params, model_cfgs = sft_params, run.policy_cfg
    params = jax.tree.map(jnp.copy, params)  # the update donates its state; keep ref intact
    tx = make_optimizer(rl.optim, rl.iterations * rl.epochs * rl.minibatches)
    shardings = state_shardings(model_cfgs, tx, mesh)
    state = create_state(params, tx, shardings)
    update = skip_nonfinite(learners.make_update(_loss_for(run), rl.epochs, rl.minibatches,
                                                 cfg.seed))
    scfg = run.sampling()
    recompute_old = (run.policy_cfg.dtype != "float32" if rl.recompute_logp_old is None
                     else rl.recompute_logp_old)

    @jax.jit  # every model is an argument: a jit may not close over arrays of other processes
    def make_buffer(policy, critic, ref, rm_params, prompts, pmask, samples, kl_coef):
        buf = score(policy, ref, rm_params, run.policy_cfg, run.rm_cfg, prompts, pmask, samples,
                    rl.temperature, recompute_old)
        if rl.reward_offset:  # the same delta(x) for every response of a prompt
            offset = rl.reward_offset * prompt_offset(prompts, pmask)
            buf = dict(buf, rewards=buf["rewards"] + offset[:, None])
        if ppo:
            values = response_values(critic, run.rm_cfg, buf["tokens"], buf["mask"],
                                     prompts.shape[-1])
            buf = learners.ppo_advantages(buf, values, kl_coef, rl)
        return buf, rollout_metrics(buf)

    update_jit = None
    policy_of = (lambda p: p["policy"]) if ppo else (lambda p: p)
    # Prompts and sampling keys are addressed by the iteration, the update's shuffles by the
    # optimizer step: the iteration (and PPO's KL coefficient) is all a checkpoint adds to state.
    with StageCheckpoints(cfg, "rl", rl.iterations, run.task) as ckpt:
        state, meta = ckpt.restore(state, kl_coef=rl.beta)
        run.logger.rewind("rl", meta["step"])
        kl_coef = meta["kl_coef"]
        if rl.eval_every and meta["step"] == 0:
            log_eval(0, policy_of(state.params))
        bar = progress(f"rl:{cfg.algo}", meta["step"], rl.iterations)
        for it in bar:
            p = run.prompts(rl.prompts_per_iter, "rl", start=it * rl.prompts_per_iter)
            t0 = time.perf_counter()
            samples = sample_pairs(policy_of(state.params), run.policy_cfg, scfg, p["ids"],
                                   p["mask"], run.key(4, it), n=rl.n_samples)
            jax.block_until_ready(samples)
            t1 = time.perf_counter()
            buffer, roll = make_buffer(policy_of(state.params),
                                       state.params["critic"] if ppo else None, ref,
                                       rm_params, p["ids"], p["mask"], samples, kl_coef)
            buffer = _scale_delta(buffer, rl) if cfg.algo == "p3o" else buffer
            buffer.pop("entropy")
            jax.block_until_ready(buffer)
            t2 = time.perf_counter()
            if update_jit is None:
                update_jit = jit_step(update, shardings, buffer, mesh)
            state, metrics = update_jit(state, buffer)
            jax.block_until_ready(state)
            t3 = time.perf_counter()
            metrics = {**roll, **metrics, "kl_coef": kl_coef, "time_generate": t1 - t0,
                       "time_score": t2 - t1, "time_update": t3 - t2}
            if run.task.gold_reward is not None:  # the hidden gold reward of the rollouts
                metrics["gold_reward"] = gold_of_samples(run, p, samples)
            m = run.logger.log("rl", it, metrics)
            bar.set_postfix(rm=f"{m['rm_reward']:.2f}", kl=f"{m['kl_k1']:.2f}")
            if ppo and rl.target_kl > 0:  # adaptive KL controller (Ziegler et al. 2019)
                err = float(np.clip(m["kl_k1"] / rl.target_kl - 1, -0.2, 0.2))
                kl_coef *= 1 + err * rl.prompts_per_iter * rl.n_samples / rl.kl_horizon
            if eval_due(rl, it + 1, rl.iterations):
                log_eval(it + 1, policy_of(state.params))
            ckpt.end_step(it + 1, state, m, kl_coef=kl_coef)
        ckpt.finish(state, kl_coef=kl_coef)
    return policy_of(state.params)


def gold_of_samples(run: Run, prompts, samples) -> float:
    """Mean gold reward of sampled responses [B, K, N] (tasks that know it)."""
    ids, mask, tokens, resp_mask = to_host((prompts["ids"], prompts["mask"], samples.tokens,
                                            samples.mask))
    return float(np.mean([run.task.gold_reward(ids, mask, tokens[:, k], resp_mask[:, k])
                          for k in range(tokens.shape[1])]))


def stage_dpo_offline(run: Run, sft_params, log_eval):
    """DPO on the reward model's preference data (chosen first), `rl.dpo_epochs` passes;
    `log_eval(step, params)` as `rl.eval_every` says, counting steps (prompt batches)."""
    rl, mesh = run.cfg.rl, run.mesh
    path = run.path("preferences.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: offline DPO needs the preference data the rm stage writes")
    data = dict(np.load(path))
    n, N = len(data["tokens"]), data["resp_mask"].shape[-1]
    L = data["tokens"].shape[-1]
    ref_logp = jax.jit(lambda p, t, m: response_logprobs(p, run.policy_cfg, t, m, L - N,
                                                         rl.temperature))
    chunk = rl.prompts_per_iter
    n = n // chunk * chunk
    logp_ref = np.concatenate([
        to_host(ref_logp(sft_params, *run.batch(chunk, lambda a, b: (data["tokens"][s + a:s + b],
                                                                      data["mask"][s + a:s + b]))))
        for s in range(0, n, chunk)])
    data = {"tokens": data["tokens"][:n], "mask": data["mask"][:n], "resp_mask": data["resp_mask"][:n],
            "logp_ref": logp_ref * data["resp_mask"][:n],
            "rewards": np.tile(np.array([[1.0, 0.0]], np.float32), (n, 1))}
    steps = rl.dpo_epochs * n // chunk
    tx = make_optimizer(rl.optim, steps * rl.minibatches)
    shardings = state_shardings(run.policy_cfg, tx, mesh)
    state = create_state(jax.tree.map(jnp.copy, sft_params), tx, shardings)
    update = skip_nonfinite(learners.make_update(_loss_for(run), 1, rl.minibatches, run.cfg.seed))
    rng = np.random.default_rng(run.cfg.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(rl.dpo_epochs)])
    update_jit = None
    with StageCheckpoints(run.cfg, "rl", steps, run.task) as ckpt:
        state, meta = ckpt.restore(state)
        run.logger.rewind("rl", meta["step"])
        if rl.eval_every and meta["step"] == 0:
            log_eval(0, state.params)
        for it in progress("rl:dpo_offline", meta["step"], steps):
            idx = order[it * chunk:(it + 1) * chunk]
            batch = run.batch(chunk, lambda a, b: {k: v[idx[a:b]] for k, v in data.items()})
            if update_jit is None:
                update_jit = jit_step(update, shardings, batch, mesh)
            state, metrics = update_jit(state, batch)
            if it % run.cfg.log_every == 0 or it == steps - 1 or metrics["skipped_nonfinite"]:
                run.logger.log("rl", it, metrics)
            if eval_due(rl, it + 1, steps):
                log_eval(it + 1, state.params)
            ckpt.end_step(it + 1, state, metrics)
        ckpt.finish(state)
    return state.params


# ---------------------------------------------------------------------------------------------
# evaluation and the final table

def final_table(run: Run, sft_params, rl_params, rm_params) -> dict:
    p, ev = policy_evaluator(run, sft_params, rm_params)
    results = {"sft": ev(sft_params)}
    if rl_params is not None:
        results[run.cfg.algo] = ev(rl_params)
    rows = [{"policy": name, **compare(r, results["sft"])} for name, r in results.items()]
    summary = {"rows": rows}
    ids, mask = to_host((p["ids"], p["mask"]))
    if not is_main_process():
        return summary
    columns = ["policy", "gold", "gold_se", "rm", "rm_se", "kl_k1", "kl_k1_se", "kl_k3", "length",
               "win_gold", "win_gold_se", "win_rm", "win_rm_se"]
    print("\n" + format_table(rows, [c for c in columns if c in rows[0]]))
    print("\nsamples from the final policy:")
    last = results[list(results)[-1]]
    print(run.task.format_samples(ids, mask, last["tokens"], last["mask"], n=3))
    with open(run.path("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def make_task(cfg: ExperimentConfig) -> Task:
    """The task of `cfg.task`. Real data is built here, before anything compiles; with
    `smoke`, the data paths left empty are generated under `<out_dir>/smoke_data`."""
    if cfg.task == "toy":
        return ToyRLHF(cfg.toy, cfg.rm.annotator_temperature)
    data_cfg = (fixtures.smoke_data(cfg.data, cfg.task, os.path.join(cfg.out_dir, "smoke_data"))
                if cfg.smoke else cfg.data)
    return TextRLHF(cfg.task, data_cfg, data_cfg.tokenizer or cfg.base_model, cfg.seed)


def with_base_model(cfg: ExperimentConfig) -> ExperimentConfig:
    """With `base_model` set, the policy's architecture is the checkpoint's (`cfg.policy` keeps
    its say on dtype and param_dtype only), validated as a configured one would be."""
    if not cfg.base_model:
        return cfg
    p = cfg.policy
    policy = hf.config_from_hf(hf.resolve(cfg.base_model), dtype=p.dtype,
                               param_dtype=p.param_dtype)
    cfg = dataclasses.replace(cfg, policy=policy)
    validate_models(cfg)
    return cfg


def run_experiment(cfg: ExperimentConfig) -> dict:
    validate(cfg, jax.device_count())
    task = make_task(cfg)
    cfg = with_base_model(cfg)
    if cfg.policy.vocab_size < task.vocab_size:
        raise ConfigError(f"config key 'policy.vocab_size': {cfg.policy.vocab_size} < the task's "
                          f"vocabulary of {task.vocab_size}")
    if cfg.dist.check_memory:
        memory_plan.check_config(cfg, jax.device_count(), memory_plan.device_budget(cfg.dist))
    os.makedirs(cfg.out_dir, exist_ok=True)
    if is_main_process():
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    run = Run(cfg, mesh, task, MetricsLogger(cfg.out_dir, enabled=is_main_process()))
    stages = cfg.stage_list
    if not cfg.resume:
        for name in stages:
            checkpoint.discard(cfg, name)

    def stage(name, output, model_cfg, train):
        """`train()` the stage and save its params to `<out_dir>/<output>`, or load them from
        there if the stage is left out or finished in an earlier run."""
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
        return params

    try:
        with jax.set_mesh(mesh), checkpoint.handle_preemption():
            sft = stage("sft", "sft", run.policy_cfg, lambda: stage_sft(run))
            rm = stage("rm", "rm", run.rm_cfg, lambda: stage_rm(run, sft))
            policy = (stage("rl", cfg.algo, run.policy_cfg, lambda: stage_rl(run, sft, rm))
                      if "rl" in stages else None)
            checkpoint.stop_if_preempted("before the final evaluation")
            return final_table(run, sft, policy, rm)
    finally:
        run.logger.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = from_args(argv)
        distributed.initialize(cfg.dist)  # before anything touches a device
        validate(cfg, jax.device_count())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_experiment(cfg)
    except ConfigError as e:  # also: a checkpoint written with an incompatible config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except checkpoint.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except checkpoint.Preempted as e:
        print(e, file=sys.stderr)
        return checkpoint.EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
