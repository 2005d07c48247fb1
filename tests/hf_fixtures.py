"""Tiny random HF models of each family, built with transformers' PyTorch classes and saved
locally (nothing is downloaded). Shared by the model, HF and sampler tests."""
import torch
import transformers

VOCAB = 97

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        tie_word_embeddings=True),
}

# The families added for issue 15. Windows of 4-5 slots and original context lengths of 16 make
# the sliding window and the RoPE scaling bite on the tests' 12-token rows.
NEW_CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
    "qwen2_yarn_window": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16),
        use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "mistral_linear": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        sliding_window=5, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=64,
        tie_word_embeddings=True),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=64,
        query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=1.5,
        final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=64,
        query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2,
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6, factor=2.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
}


def build_torch_model(name: str, seed: int = 0, reward: bool = False, tied: bool | None = None):
    """A random model whose every weight (norms and biases too) is perturbed, in eval mode: the
    causal LM, or with `reward` its `*ForSequenceClassification` (one label, pad id 0)."""
    torch.manual_seed(seed)
    cfg = {**CONFIGS, **NEW_CONFIGS}[name]()
    cfg._attn_implementation = "eager"
    if tied is not None:
        cfg.tie_word_embeddings = tied
    if reward:
        cfg.num_labels, cfg.pad_token_id = 1, 0
        model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_torch_model(name: str, directory, seed: int = 0, **kw):
    model = build_torch_model(name, seed, **kw)
    model.save_pretrained(directory)
    return model


def torch_logits(model, tokens, mask):
    """Logits of a PyTorch model with explicit positions counting real tokens."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    mask = torch.as_tensor(mask, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()
