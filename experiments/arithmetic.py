"""EXP=arithmetic: your own data and rewards, end to end and offline (docs/own_data.md).
Conversational prompts with an `answer` column (experiments/data/arithmetic, made by
`python scripts/arithmetic_prompts.py experiments/data/arithmetic --kind larger --n 3000
--max 99`: "Which is larger, 37 or 52?"), a chat template (ChatML, the tokenizer in
experiments/data/arithmetic/tokenizer), SFT on demonstrations of which 30% are wrong, then RL
with the built-in reward functions `math_answer` (1 if the final answer is right) and
`final_answer_format` (1 for a "#### x" answer): no reward model. A tiny GPT-NeoX from scratch;
about 7 minutes on a 2-core CPU. prompt_len is the longest rendered prompt of the files (35
tokens: `<|im_start|>user\nWhich is larger, 85 or 63?<|im_end|>\n<|im_start|>assistant\n`), so
that no prompt is cut (tests/test_own_data.py checks it). Measured (seed 0): held-out accuracy
0.555 +- 0.031 after SFT, 0.699 +- 0.029 after P3O (256 held-out prompts, one response each;
KL 0.65); the run's summary.json and per-prompt records are in experiments/results/arithmetic/.

    make train EXP=arithmetic                      (P3O)
    make train EXP=arithmetic ARGS="algo=grpo"     (any algorithm; algo=ppo: critic from the policy)
"""
import os

from p3o_jax.config import DataConfig, ExperimentConfig, OptimConfig, RLConfig, SFTConfig
from p3o_jax.model import ModelConfig

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arithmetic")


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="arithmetic",
        task="dataset",
        algo="p3o",
        stages="sft,rl",
        out_dir="runs/arithmetic",
        eval_prompts=256,
        log_every=20,
        data=DataConfig(sft=os.path.join(DATA, "sft.jsonl"),
                        prompts=os.path.join(DATA, "prompts.jsonl"),
                        eval=os.path.join(DATA, "eval.jsonl"),
                        tokenizer=os.path.join(DATA, "tokenizer"),
                        prompt_len=35, response_len=8),
        reward_fns="math_answer,final_answer_format",
        reward_weights=(1.0, 0.2),
        policy=ModelConfig(family="gpt_neox", vocab_size=384, d_model=128, n_layers=2, n_heads=4,
                           d_ff=256, max_len=48, rotary_pct=0.5),
        sft=SFTConfig(steps=800, batch_size=32,
                      optim=OptimConfig(lr=2e-3, warmup_steps=20, decay="cosine")),
        rl=RLConfig(iterations=60, prompts_per_iter=32, n_samples=2, epochs=2, minibatches=1,
                    beta=0.02, eval_every=20,
                    optim=OptimConfig(lr=5e-4, warmup_steps=0, decay="constant")),
    )
