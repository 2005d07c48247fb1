"""EXP=smollm2_steps: SmolLM2-135M-Instruct reasons at length. The model and reward of
EXP=smollm2 (experiments/smollm2.py), on multi-step sums that it works through before answering
("What is 17 + 4 - 9? Think step by step, then give the final answer after ####."),
with responses of up to 256 tokens: long and uneven, the regime of the continuous-batching
engine (`rl.engine=continuous`, p3o_jax/engine.py) and of responses packed as trees
(`rl.pack_responses`). `math_answer` reads the answer after the last `####` (else the last
number) and checks it.

The prompts were made by `python scripts/arithmetic_prompts.py experiments/data/smollm2_steps
--kind steps --terms 3 --max 20 --n 1200 --n-eval 200 --no-sft --suffix " Think step by step,
then give the final answer after ####."` (1000 RL prompts, 200 held out; 54-57 tokens with
SmolLM2's chat template, prompt_len 80). 16 prompts x 4 responses an iteration, 16 decode slots.

    make train EXP=smollm2_steps                               (continuous engine)
    make train EXP=smollm2_steps ARGS="rl.engine=static out_dir=runs/smollm2_steps_static"
"""
import os

from p3o_jax.config import DataConfig, ExperimentConfig, OptimConfig, RLConfig, ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "smollm2_steps")
MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")    # as EXP=smollm2 writes it


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_steps",
        task="dataset",
        algo="p3o",
        stages="rl",
        pretrained_sft=MODEL,
        out_dir="runs/smollm2_steps",
        eval_prompts=64,
        log_every=1,
        data=DataConfig(prompts=os.path.join(DATA, "prompts.jsonl"),
                        eval=os.path.join(DATA, "eval.jsonl"),
                        prompt_len=80, response_len=256),
        reward_fns="math_answer",
        rl=RLConfig(iterations=12, prompts_per_iter=16, n_samples=4, epochs=1, minibatches=1,
                    beta=0.02, temperature=0.7, eval_every=12, train_top_layers=4,
                    engine="continuous", slots=16, pack_responses=True,
                    optim=OptimConfig(lr=5e-5, warmup_steps=0, decay="constant")),
    )
