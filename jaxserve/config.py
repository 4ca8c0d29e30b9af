"""The configuration schema: defaults shared by every file in configs/, as ml_collections data."""
from __future__ import annotations

from ml_collections import config_dict

from jaxserve.model.config import dtype_from_name


def default_config() -> config_dict.ConfigDict:
    """Every section's defaults; FIELD_HELP says what each field is."""
    c = config_dict.ConfigDict()
    c.checkpoint = dict(format="gguf", path="", tokenizer="", seed=0)
    c.model = dict(dtype="float32", max_seq_len=2048)
    c.mesh = dict(data=1, model=1)
    c.sampling = dict(max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    c.engine = dict(page_size=16, num_pages=512, max_batch=32, token_budget=256, max_chunk=256,
                    host_pages=0, attention_impl="auto", unroll_layers="auto", async_scheduling=True,
                    compile_cache_dir="", prefix_cache=True, prefix_host_tier=False)
    c.scheduler = dict(policy="fcfs", watermark_pages=0, prefetch=True, max_prefill_slowdown=0.1,
                       idle_prefill_slowdown=0.5,
                       mlfq=dict(num_levels=6, base_quantum_s=0.0, base_quantum_steps=3.0, quantum_growth=2.0,
                                 starvation_s=3.0),
                       gittins=dict(prior_max=2048, prior_weight=4.0))
    return c


# One line per config field, shown by `jaxserve COMMAND --help` (tests check every default field
# has one). model.* beyond dtype and max_seq_len are set by config files of random-weight models.
FIELD_HELP = {
    "checkpoint.format": "where the weights come from: gguf | hf | orbax | random",
    "checkpoint.path": "the checkpoint: a GGUF file, a directory, pkg:PACKAGE/FILE, or a gs:// URL",
    "checkpoint.tokenizer": "a tokenizer source (GGUF file or directory) other than the checkpoint itself",
    "checkpoint.seed": "seed of random weights (format=random)",
    "model.dtype": "dtype of the weights and KV cache: float32 | bfloat16 | float16",
    "model.max_seq_len": "longest sequence (prompt + output) served; loaded checkpoints may lower it",
    "model.arch": "decoder family: llama | qwen2",
    "model.vocab_size": "tokens in the vocabulary",
    "model.embed_dim": "width of the residual stream",
    "model.num_layers": "decoder layers",
    "model.num_heads": "query heads",
    "model.num_kv_heads": "key/value heads (grouped-query attention: a divisor of num_heads)",
    "model.head_dim": "width of one attention head",
    "model.mlp_dim": "hidden width of the SwiGLU MLP",
    "model.rms_eps": "epsilon of the RMS norms",
    "model.rope_theta": "RoPE base frequency",
    "model.rope_scaling": "Llama-3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original_max_position)",
    "model.tie_embeddings": "the LM head is the token embedding",
    "model.qkv_bias": "q, k and v projections have a bias (Qwen2)",
    "model.bos_token_id": "token that starts every prompt",
    "model.eos_token_ids": "tokens that end a generation",
    "mesh.data": "devices along the data (replica) axis",
    "mesh.model": "devices along the model (tensor-parallel) axis",
    "sampling.max_tokens": "default output length of a request (jaxserve generate's answer)",
    "sampling.temperature": "default sampling temperature (0 = greedy)",
    "sampling.top_p": "default nucleus (top-p) cut",
    "sampling.top_k": "default top-k cut (0 = none)",
    "sampling.seed": "default sampling seed",
    "engine.page_size": "tokens per KV page",
    "engine.num_pages": "KV pages on each device: the pool's size",
    "engine.max_batch": "most sequences in one step",
    "engine.token_budget": "most tokens in one step, prefill chunks and decodes together",
    "engine.max_chunk": "longest prefill chunk",
    "engine.host_pages": "host memory, in pages, for swapped-out and evicted KV (0 = none)",
    "engine.attention_impl": "auto (mgpu on Hopper, tpu on TPU, else reference) | reference | pallas (Triton) "
                             "| mgpu (Mosaic GPU decode) | tpu",
    "engine.unroll_layers": "decode steps run the layers unrolled: auto (off) | on | off",
    "engine.async_scheduling": "the host schedules step N+1 while step N runs",
    "engine.compile_cache_dir": "JAX's persistent compilation cache: a restart compiles nothing (\"\" = off)",
    "engine.prefix_cache": "requests share the KV pages of common prompt prefixes",
    "engine.prefix_host_tier": "pages evicted from the device stay in host memory and come back on a hit "
                               "(needs host_pages)",
    "scheduler.policy": "fcfs | mlfq | priority | gittins; all but fcfs preempt at token granularity",
    "scheduler.watermark_pages": "device pages preemptive policies keep free by swapping to host memory",
    "scheduler.prefetch": "swap preempted requests back in ahead of their turn",
    "scheduler.max_prefill_slowdown": "prefill throughput a step may give up for better-ranked decodes, "
                                      "with a backlog",
    "scheduler.idle_prefill_slowdown": "max_prefill_slowdown when all waiting prefill fits one step's budget",
    "scheduler.mlfq.num_levels": "MLFQ priority levels",
    "scheduler.mlfq.base_quantum_s": "MLFQ's first quantum in seconds (0: base_quantum_steps instead)",
    "scheduler.mlfq.base_quantum_steps": "MLFQ's first quantum in one-row decode steps",
    "scheduler.mlfq.quantum_growth": "factor between consecutive levels' quanta",
    "scheduler.mlfq.starvation_s": "wait after which a request moves to the top level",
    "scheduler.gittins.prior_max": "longest output the Gittins policy's prior allows",
    "scheduler.gittins.prior_weight": "weight of the prior against the output lengths seen",
}


def leaves(config, prefix: str = "") -> list:
    """(dotted name, value) of every field of a config, sections flattened, in order (a field
    FIELD_HELP describes is one, whatever its value, e.g. model.rope_scaling)."""
    out = []
    for key, value in config.items():
        name = prefix + key
        if isinstance(value, (config_dict.ConfigDict, dict)) and name not in FIELD_HELP:
            out += leaves(value, name + ".")
        else:
            out.append((name, value))
    return out


def describe(config) -> str:
    """--config.FIELD=VALUE and what it is, for every field of `config` (its values as defaults)."""
    return "\n".join(f"  --config.{name}={_shown(value)}" + (f"\n      {FIELD_HELP[name]}" if name in FIELD_HELP else "")
                     for name, value in leaves(config))


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "()"
    return '""' if value == "" else str(value)


def validate(config: config_dict.ConfigDict) -> None:
    """Checks fields whose mistakes would otherwise surface far from their cause (or only after
    the model has loaded): the model's dtype, the mesh, sampling, the policy, the engine."""
    from jaxserve.engine.engine import EngineConfig
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.scheduling import check_policy_name
    dtype_from_name(config.model.dtype, "model.dtype")
    try:
        SamplingParams(**config.sampling)
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None
    check_policy_name(config.scheduler.policy)
    EngineConfig(policy=config.scheduler.policy, **config.engine)
    for axis in ("data", "model"):
        if int(config.mesh[axis]) < 1:
            raise ValueError(f"mesh.{axis} must be >= 1, got {config.mesh[axis]}")
