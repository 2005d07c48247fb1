"""EXP=hh: Anthropic HH-RLHF dialogue with P3O (Wu et al. 2023; Bai et al. 2022 data).

    make train ACCEL=cuda EXP=hh                         # one GPU
    make train ACCEL=tpu EXP=hh                          # TPU v4-8 / v5e-8 VM
    make train EXP=hh ARGS="smoke=true"                  # offline, tiny, a minute on a CPU

All four subsets (helpful-base, helpful-online, helpful-rejection-sampled, harmless-base;
~161k train pairs, ~8.6k test) read as one dataset (`data.hh_subsets=...` picks fewer). SFT
of EleutherAI/pythia-410m-deduped (from the hub) on the chosen replies, a reward model
initialised from the SFT model and trained on chosen vs rejected (`rm.n_pairs` of them, 10%
held out), then P3O (V2) on the train dialogues, evaluated on test dialogues. Prompts keep
the last 512 tokens of the dialogue (ending in "Assistant:"), responses at most 128 tokens;
sampling stops at the end of the Assistant's turn (`data.stop_sequences`).
RL uses the paper's published settings: AdamW (b1 0.9, b2 0.95), a small constant learning
rate, 4 epochs per rollout buffer, beta 0.05, eps 0.2, temperature 1, top-k 0, top-p 1.

Larger models and sharding: as in experiments/tldr.py (`base_model=...`; the default mesh
puts all devices on fsdp for one GPU, a TPU v4-8 or a v5e-8; `mesh.tensor=2` for >= 6.9B).
"""
from p3o_jax.algos.p3o import P3OConfig
from p3o_jax.config import DataConfig, ExperimentConfig, OptimConfig, RLConfig, RMConfig, SFTConfig
from p3o_jax.model import ModelConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="hh",
        task="hh",
        algo="p3o",
        out_dir="runs/hh",
        seed=0,
        eval_prompts=128,
        log_every=10,
        base_model="EleutherAI/pythia-410m-deduped",
        policy=ModelConfig(dtype="bfloat16"),       # the architecture comes from base_model
        # the policy's turn ends where it starts the next Human turn (cut there, EOS appended)
        data=DataConfig(prompt_len=512, response_len=128, stop_sequences='["\\n\\nHuman:"]'),
        # ~1 epoch of the 161k chosen dialogues
        sft=SFTConfig(steps=5000, batch_size=32,
                      optim=OptimConfig(lr=1e-5, warmup_steps=100, decay="cosine")),
        # ~1 epoch of 160k pairs (n_pairs / 10 held out; multiples of 8 throughout)
        rm=RMConfig(n_pairs=160_000, steps=4500, batch_size=32,
                    optim=OptimConfig(lr=1e-5, warmup_steps=100, decay="cosine")),
        p3o=P3OConfig(clip="joint", eps=0.2, ratio_bound=10.0),
        rl=RLConfig(iterations=1000, prompts_per_iter=64, n_samples=2, epochs=4, minibatches=4,
                    beta=0.05, temperature=1.0, top_k=0, top_p=1.0,
                    optim=OptimConfig(lr=3e-6, warmup_steps=10, decay="constant", b1=0.9,
                                      b2=0.95)),
    )
