"""EXP=tldr: TL;DR summarisation with P3O (Wu et al. 2023, after Stiennon et al. 2020).

    make train ACCEL=cuda EXP=tldr                       # one GPU
    make train ACCEL=tpu EXP=tldr                        # TPU v4-8 / v5e-8 VM
    make train EXP=tldr ARGS="smoke=true"                # offline, tiny, a minute on a CPU

SFT of EleutherAI/pythia-410m-deduped (from the hub) on OpenAI's filtered TL;DR posts
(tldr_sft train, ~117k), a reward model initialised from the SFT model and trained on the
human comparisons (tldr_comparisons train, ~92k pairs; `rm.n_pairs` of them, 10% held out),
then P3O (V2, joint clipping) on the TL;DR train posts, evaluated on test posts. Prompts are
the OpenAI format cut to 512 tokens, responses at most 53 tokens (Stiennon et al.). RL uses
the paper's published settings: AdamW (b1 0.9, b2 0.95), a small constant learning rate,
4 epochs per rollout buffer, beta 0.05, eps 0.2, temperature 1, top-k 0, top-p 1.

Larger models: `base_model=EleutherAI/pythia-1b-deduped` (or -2.8b, -6.9b; any gpt2,
gpt_neox, llama or qwen2 checkpoint with safetensors); the tokenizer follows unless
`data.tokenizer=...`. Compute is bfloat16, params and optimizer state float32.

Sharding: the default mesh (data=1, fsdp=-1, tensor=1) puts every device on `fsdp` (ZeRO-3
style: batch and parameters split), which is right for one GPU (a 1x1x1 mesh), a TPU v4-8
(4 chips) and a v5e-8 (8 chips) alike; batch sizes are multiples of 8. For >= 6.9B models
add tensor parallelism, e.g. `mesh.fsdp=4 mesh.tensor=2` on a v5e-8. Memory is lowered by
smaller `sft.batch_size` / `rm.batch_size`, more `rl.minibatches`, fewer `eval_prompts`.
"""
from p3o_jax.algos.p3o import P3OConfig
from p3o_jax.config import DataConfig, ExperimentConfig, OptimConfig, RLConfig, RMConfig, SFTConfig
from p3o_jax.model import ModelConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tldr",
        task="tldr",
        algo="p3o",
        out_dir="runs/tldr",
        seed=0,
        eval_prompts=128,
        log_every=10,
        base_model="EleutherAI/pythia-410m-deduped",
        policy=ModelConfig(dtype="bfloat16"),       # the architecture comes from base_model
        data=DataConfig(prompt_len=512, response_len=53),
        # ~1 epoch of the 117k posts
        sft=SFTConfig(steps=3600, batch_size=32,
                      optim=OptimConfig(lr=1e-5, warmup_steps=100, decay="cosine")),
        # ~1 epoch of the 92k comparisons (n_pairs / 10 held out; multiples of 8 throughout)
        rm=RMConfig(n_pairs=92_160, steps=2592, batch_size=32,
                    optim=OptimConfig(lr=1e-5, warmup_steps=100, decay="cosine")),
        # 1000 rollouts of 64 prompts x 2 samples (~half an epoch of the posts)
        p3o=P3OConfig(clip="joint", eps=0.2, ratio_bound=10.0),
        rl=RLConfig(iterations=1000, prompts_per_iter=64, n_samples=2, epochs=4, minibatches=4,
                    beta=0.05, temperature=1.0, top_k=0, top_p=1.0,
                    optim=OptimConfig(lr=3e-6, warmup_steps=10, decay="constant", b1=0.9,
                                      b2=0.95)),
    )
