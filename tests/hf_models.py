"""Tiny random Hugging Face models that transformers builds in the test (nothing is downloaded):
one per family sleepscale converts, with values away from the initialisation everywhere."""

import torch

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_config(family: str, **extra):
    """`extra` overrides COMMON (vocab_size, token ids)."""
    import transformers

    common = {**COMMON, **extra}
    if family == "llama":  # biases on all four projections, Llama 3 RoPE scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return transformers.LlamaConfig(**common, attention_bias=True, rope_parameters=rope)
    if family == "qwen2":  # q/k/v biases, tied embeddings
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # per-head q/k norms, head_dim not hidden / heads
        return transformers.Qwen3Config(**common, head_dim=16)
    if family == "qwen3_5":  # GDN with grouped value heads, gated partial-rotary attention, zero-centred norms
        return transformers.Qwen3_5TextConfig(
            **common,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=12,
            layer_types=["linear_attention", "full_attention"] * 2,
        )
    raise ValueError(family)


def torch_gdn_path():
    """transformers picks fla's Triton kernels when fla is importable; use its PyTorch reference."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        function = getattr(qwen3_5, name)
        setattr(qwen3_5, name, getattr(function, "__wrapped__", function))


def hf_model(family: str, **extra):
    import transformers

    torch_gdn_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **extra)).eval()
    with torch.no_grad():  # values away from the initialisation everywhere, norms and biases included
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model
