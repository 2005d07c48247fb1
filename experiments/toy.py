"""EXP=toy: the embedded offline default. Synthetic summarisation with a hidden gold reward
(p3o_jax/toy_task.py); a tiny GPT-2 trained from scratch; SFT -> RM -> P3O on a CPU in minutes."""
from p3o_jax.config import ExperimentConfig, OptimConfig, RLConfig, RMConfig, SFTConfig
from p3o_jax.model import ModelConfig
from p3o_jax.toy_task import ToyTaskConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="toy",
        task="toy",
        algo="p3o",
        out_dir="runs/toy",
        seed=0,
        eval_prompts=512,
        policy=ModelConfig(family="gpt2", vocab_size=132, d_model=128, n_layers=2, n_heads=4,
                           d_ff=512, max_len=64),
        toy=ToyTaskConfig(seed=0, prompt_len=24, response_len=10, demo_noise=0.5),
        sft=SFTConfig(steps=400, batch_size=64,
                      optim=OptimConfig(lr=1e-3, warmup_steps=20, decay="cosine")),
        rm=RMConfig(n_pairs=4096, steps=300, batch_size=64, annotator_temperature=1.0,
                    optim=OptimConfig(lr=3e-4, warmup_steps=20, decay="cosine")),
        rl=RLConfig(iterations=100, prompts_per_iter=64, n_samples=2, epochs=4, minibatches=1,
                    beta=0.05, clip="joint", eps=0.2, ratio_bound=10.0,
                    optim=OptimConfig(lr=1e-4, warmup_steps=5, decay="constant")),
    )
