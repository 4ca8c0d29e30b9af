"""jaxserve: a JAX/XLA library for serving large language models on TPUs and GPUs."""
from setuptools import find_packages, setup

setup(
    name="jaxserve",
    version="0.1.0",
    description="Iteration-level, preemptive, preemption-tolerant LLM serving in JAX",
    packages=find_packages(include=["jaxserve", "jaxserve.*"]),
    package_data={"jaxserve.model": ["gemm_tables/*.json"],  # measured GEMM row paddings per GPU kind
                  "jaxserve.bench.data": ["*.csv", "*.jsonl", "README.md", "LICENSE.*"]},  # the benchmarks' workload sample
    entry_points={"console_scripts": ["jaxserve=jaxserve.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "orbax-checkpoint>=0.12",
        "tensorstore>=0.1.70",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "gguf>=0.17",          # GGUF reader and dequantizer
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "jinja2>=3.1",         # chat templates, as Hugging Face renders them
        "scipy>=1.11",         # non-negative least squares (cost model), Kuhn-Munkres matching
        "fastapi>=0.165",      # the OpenAI-compatible server (jaxserve.server); fastapi.sse
        "uvicorn>=0.30",
        "prometheus-client>=0.20",
        "httpx>=0.27",         # launch/bench_serve.py's client
        "tqdm>=4.60",
        "etils[epath]>=1.5",   # jaxserve.paths: local, file:// and bucket paths
        "gcsfs>=2024.2",       # gs:// paths through etils.epath (checkpoints, tokenizers, journals)
    ],
    extras_require={
        # Reference implementation for correctness tests. torch is pinned to the CPU wheel:
        # an unpinned torch pulls a CUDA build of several GB.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0", "accelerate>=1.0", "gguf>=0.17",
                 "openai>=1.40", "httpx>=0.27",
                 "schemathesis>=4.0",  # tests/test_openapi_conformance.py: the server against its schema
                 "gcp-storage-emulator>=2024.8",  # tests/test_gcs.py: a GCS API on loopback
                 "matplotlib>=3.7"],  # tests/test_plots.py
        # The benchmarks' plots (jaxserve.bench.plots).
        "bench": ["matplotlib>=3.7"],
    },
)
