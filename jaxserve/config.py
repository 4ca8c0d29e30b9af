"""The configuration schema: defaults shared by every file in configs/, as ml_collections data."""
from __future__ import annotations

from ml_collections import config_dict

from jaxserve.model.config import dtype_from_name


def default_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    # Where the weights come from: gguf | hf | orbax | random. `tokenizer` optionally names a
    # tokenizer source (GGUF file or directory) other than the checkpoint itself.
    c.checkpoint = dict(format="gguf", path="", tokenizer="", seed=0)
    # For loaded checkpoints only dtype and max_seq_len may be set; `random` needs every field.
    c.model = dict(dtype="float32", max_seq_len=2048)
    c.mesh = dict(data=1, model=1)
    c.sampling = dict(max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    # Paged KV cache and per-step limits of the iteration-level engine.
    # attention_impl: auto (mgpu on GPU, tpu on TPU, else reference) | reference | pallas (the
    # Triton kernels) | mgpu (pallas, but decode by the Mosaic GPU kernel on Hopper) | tpu.
    # unroll_layers: decode steps run the layers unrolled, auto (model_runner.UNROLL_LAYERS_GPU:
    # off) | on | off. async_scheduling: the host schedules step
    # N+1 while step N runs. compile_cache_dir: JAX's persistent compilation cache ("" = off).
    # prefix_cache: requests share the KV pages of common prompt prefixes. prefix_host_tier (needs
    # host_pages): pages evicted from the device are kept in host memory too and come back on a hit.
    c.engine = dict(page_size=16, num_pages=512, max_batch=32, token_budget=256, max_chunk=256,
                    host_pages=0, attention_impl="auto", unroll_layers="auto", async_scheduling=True,
                    compile_cache_dir="", prefix_cache=True, prefix_host_tier=False)
    # fcfs | mlfq | priority | gittins. The others preempt at token granularity and keep preempted
    # jobs' KV, swapping it to host memory (engine.host_pages) to keep `watermark_pages` free.
    # max_prefill_slowdown / idle_prefill_slowdown: how much prefill throughput a step may give up
    # to finish better-ranked decodes sooner, with a backlog / with all waiting prefill in one budget.
    c.scheduler = dict(policy="fcfs", watermark_pages=0, prefetch=True, max_prefill_slowdown=0.1,
                       idle_prefill_slowdown=0.5,
                       # mlfq's base quantum: base_quantum_s, or (0) base_quantum_steps one-row decode steps
                       mlfq=dict(num_levels=6, base_quantum_s=0.0, base_quantum_steps=3.0, quantum_growth=2.0,
                                 starvation_s=3.0),
                       gittins=dict(prior_max=2048, prior_weight=4.0))
    return c


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
