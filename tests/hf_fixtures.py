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


def build_torch_model(name: str, seed: int = 0):
    """A random model whose every weight (norms and biases too) is perturbed, in eval mode."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_torch_model(name: str, directory, seed: int = 0):
    model = build_torch_model(name, seed)
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
