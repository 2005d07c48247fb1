"""What every stage shares: the run's context (`Run`), the SFT and RM optimizer step
(`supervised_step`) and the one stage loop,
restore -> step -> log -> checkpoint -> finish, that SFT, the reward model, online RL and
offline DPO all run (`stage_loop`)."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import numpy as np
import transformers
from tqdm.auto import tqdm

from p3o_jax import hf

from p3o_jax.checkpoint import StageCheckpoints, skip_nonfinite
from p3o_jax.config import ExperimentConfig
from p3o_jax.distributed import is_main_process, local_rows
from p3o_jax.logger import MetricsLogger
from p3o_jax.retokenize import same_vocabulary
from p3o_jax.reward_calls import TrainerState
from p3o_jax.sampler import SamplingConfig
from p3o_jax.sharding import make_mesh, shard_batch
from p3o_jax.tasks import Task
from p3o_jax.train_state import gradient_step, jit_step, make_optimizer, state_shardings


def sampling_config(rl, response_len: int, eos_ids: tuple[int, ...], pad_id: int = 0,
                    stop_sequences=()) -> SamplingConfig:
    """Sampling of RL, the reward model's pairs and evaluation: `rl.temperature / top_k /
    top_p / sampler_gather_once / engine / slots`, responses of up to `response_len` tokens,
    the task's stop ids (EOS, end of turn), padding and stop sequences."""
    return SamplingConfig(max_new_tokens=response_len, temperature=rl.temperature,
                          top_k=rl.top_k, top_p=rl.top_p, eos_ids=eos_ids, pad_id=pad_id,
                          stop_sequences=stop_sequences, gather_once=rl.sampler_gather_once,
                          engine=rl.engine, slots=rl.slots)


def supervised_step(model_cfg, loss_fn, optim, steps: int, mesh, batch_example):
    """The compiled optimizer step of SFT and reward modelling, `(state, batch) -> (state,
    metrics)` (`jit_step`: state donated, batch over the batch devices), with its optimizer and
    state shardings: (update, tx, shardings). `batch_example`: arrays or ShapeDtypeStructs of
    the batch's shapes (SFT: input_ids, attention_mask, loss_mask [B, L]; reward model: tokens,
    mask [B, 2, L] and resp_mask [B, 2, N]). p3o_jax/compile_check.py compiles the same step."""
    tx = make_optimizer(optim, steps)
    shardings = state_shardings(model_cfg, tx, mesh)
    loss = functools.partial(loss_fn, cfg=model_cfg)
    update = jit_step(skip_nonfinite(gradient_step(loss)), shardings, batch_example, mesh)
    return update, tx, shardings


@dataclasses.dataclass
class Run:
    """What every stage needs: the resolved config, mesh, task, logger, and the reward
    functions with the reward model's weight (`reward_calls.load`)."""
    cfg: ExperimentConfig
    mesh: jax.sharding.Mesh
    task: Task
    logger: MetricsLogger
    reward_functions: list = dataclasses.field(default_factory=list)
    rm_weight: float = 1.0

    def path(self, name: str) -> str:
        return os.path.abspath(os.path.join(self.cfg.out_dir, name))

    @functools.cached_property
    def rollout_mesh(self) -> jax.sharding.Mesh | None:
        """The RL sampler's own mesh, fsdp over the last `rl.rollout_devices` devices (the
        other programs' `mesh` is over the rest); None when it shares `mesh`."""
        n = self.cfg.rl.rollout_devices
        return make_mesh(1, -1, 1, devices=jax.devices()[-n:]) if n else None

    @functools.cached_property
    def sampling(self) -> SamplingConfig:
        """How RL, the reward model's pairs and evaluation sample (`rl.*` and the task's)."""
        return sampling_config(self.cfg.rl, self.task.response_len, self.task.eos_ids,
                               self.task.pad_id, self.task.stop_sequences)

    def trainer_state(self, step: int) -> TrainerState:
        """What reward functions get as `trainer_state` for the responses of RL iteration
        `step` (or of a policy trained for `step` iterations)."""
        rl = self.cfg.rl
        count = getattr(self.task, "prompt_count", None)   # the toy task's never repeat
        epoch = step * rl.prompts_per_iter / count("rl") if count else 0.0
        return TrainerState(step, rl.iterations, epoch)

    @functools.cached_property
    def rm_tokenizer(self):
        """`pretrained_rm`'s own tokenizer when it differs from the task's (its samples are
        then re-tokenised for it), read once; None when it reads the policy's tokens."""
        if not self.cfg.pretrained_rm:
            return None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                hf.resolve(self.cfg.pretrained_rm))
        except (OSError, ValueError):   # a folder without tokenizer files: the policy's
            return None
        if same_vocabulary(tokenizer, self.task.tokenizer):
            return None
        print(f"rm: {self.cfg.pretrained_rm} has its own tokenizer: responses are re-tokenised "
              f"for it", file=sys.stderr)
        return tokenizer

    def key(self, *tags: int) -> jax.Array:
        key = jax.random.key(self.cfg.seed)
        for t in tags:
            key = jax.random.fold_in(key, t)
        return key

    def batch(self, n: int, read):
        """A global batch of `n` rows on the mesh, of which this process builds only the rows
        its devices hold: `read(start, stop)` gives rows `start .. stop - 1` as numpy."""
        return shard_batch(local_rows(self.mesh, n, read), self.mesh)

    def prompts(self, n: int, split: str, start: int = 0) -> dict:
        """Prompts `start .. start + n - 1` of `split`: {"ids", "mask"} [n, P] on the mesh, and
        with reward functions "row" [n], each prompt's row in `task.prompt_records(split)`."""
        def read(a, b):
            ids, mask = self.task.prompts(b - a, split, start + a)
            if not self.reward_functions:
                return {"ids": ids, "mask": mask}
            rows = self.task.prompt_rows(b - a, split, start + a).astype(np.int32)
            return {"ids": ids, "mask": mask, "row": rows}
        return self.batch(n, read)


def progress(desc: str, start: int, total: int):
    """Steps `start .. total - 1` behind a progress bar (process 0's only)."""
    return tqdm(range(start, total), desc=desc, initial=start, total=total, dynamic_ncols=True,
                disable=not is_main_process())


def stage_loop(run: Run, stage: str, label: str, state, total: int, step, *, carry=None,
               log_every: int | None = None, evaluate=None, show=("loss",)):
    """Run `step(i, state, carry) -> (state, metrics, carry)` for i in 0 .. total - 1 from the
    stage's newest checkpoint, log metrics under `label` (every `log_every` steps, the last, and
    any skipped update; default `cfg.log_every`), checkpoint with the carry, and finish.

    `carry`: JSON-able scalars the loop threads through and checkpoints (PPO's `kl_coef`).
    `evaluate(step, state) -> metrics or None`: asked at step 0 of a fresh start and after
    every step (None: not due); its rows are logged as `eval:<label's algorithm>`.
    Returns the final state.
    """
    log_every = log_every or run.cfg.log_every
    eval_label = "eval:" + label.partition(":")[2] if evaluate is not None else None

    def log_eval(i, state):
        if evaluate is not None and (metrics := evaluate(i, state)) is not None:
            run.logger.log(eval_label, i, metrics)

    with StageCheckpoints(run.cfg, stage, total) as ckpt:
        state, meta = ckpt.restore(state, **(carry or {}))
        carry = {k: meta[k] for k in carry or {}}
        run.logger.rewind(label, meta["step"], eval_label)
        if meta["step"] == 0:
            log_eval(0, state)
        with progress(label, meta["step"], total) as bar:   # closed (its line ended) on errors too
            for i in bar:
                state, metrics, carry = step(i, state, carry)
                if i % log_every == 0 or i == total - 1 or metrics["skipped_nonfinite"]:
                    m = run.logger.log(label, i, metrics)
                    bar.set_postfix({k: f"{m[k]:.3f}" for k in show if k in m})
                log_eval(i + 1, state)
                ckpt.end_step(i + 1, state, metrics, **carry)
        ckpt.finish(state, **carry)
    return state
