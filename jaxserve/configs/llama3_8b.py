"""A Llama-3-8B-shaped model with random bf16 weights, for GPU speed work."""
from jaxserve.config import default_config


def get_config():
    c = default_config()
    c.checkpoint.format = "random"
    c.model = dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, mlp_dim=14336, max_seq_len=8192, rms_eps=1e-5, rope_theta=500000.0,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position=8192),
                   tie_embeddings=False, qkv_bias=False, arch="llama", dtype="bfloat16",
                   bos_token_id=128000, eos_token_ids=(128001, 128009))
    return c
