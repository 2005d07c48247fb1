"""EXP=toy: the embedded offline default. Synthetic summarisation with a hidden gold reward
(p3o_jax/toy_task.py); a tiny GPT-2 trained from scratch; SFT -> RM -> P3O on a CPU in minutes.

Posts have a fixed length (16 words) and exactly 3 keywords: the reward model reads its score at
the summary's last token, and a fixed prompt length lets its position embedding carry the summary
length, so a 2-layer reward model can tell a full summary from a one-keyword one. With variable
posts it learned "shorter is better" and P3O exploited that (see README, "The embedded task").
"""
from p3o_jax.algos.p3o import P3OConfig
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
                           max_len=64),
        toy=ToyTaskConfig(seed=0, post_len_min=16, post_len_max=16, keywords_per_post_min=3,
                          keywords_per_post_max=3, prompt_len=20, response_len=10,
                          demo_noise=0.5),
        sft=SFTConfig(steps=1000, batch_size=64,
                      optim=OptimConfig(lr=1e-3, warmup_steps=20, decay="cosine")),
        rm=RMConfig(n_pairs=8192, steps=500, batch_size=64, annotator_temperature=0.5,
                    optim=OptimConfig(lr=3e-4, warmup_steps=20, decay="cosine")),
        p3o=P3OConfig(clip="joint", eps=0.2, ratio_bound=10.0),
        rl=RLConfig(iterations=80, prompts_per_iter=64, n_samples=2, epochs=4, minibatches=1,
                    beta=0.1, optim=OptimConfig(lr=1e-4, warmup_steps=5, decay="constant")),
    )
