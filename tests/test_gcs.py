"""Checkpoints and tokenizers on a bucket: gs:// through a real GCS API (an emulator on loopback)."""
import numpy as np
import jax
import pytest

from jaxserve import paths
from jaxserve.checkpoint import load, store
from jaxserve.parallel.sharding import make_mesh


@pytest.fixture(scope="module")
def bucket_checkpoint(gcs_bucket, tiny_host):
    cfg, params, tokenizer = tiny_host
    path = f"{gcs_bucket}/ckpt/tiny"
    store.save(path, cfg, params, tokenizer)
    return path


def test_a_checkpoint_written_to_a_bucket_restores_onto_other_meshes(bucket_checkpoint, tiny_host):
    cfg, params, tokenizer = tiny_host
    assert store.is_checkpoint(bucket_checkpoint) and not store.is_checkpoint(bucket_checkpoint + "-none")
    section = {"format": "orbax", "path": bucket_checkpoint}
    for mesh in (make_mesh(1, 1), make_mesh(2, 2)):
        got_cfg, got, got_tok = load.load(section, {}, mesh)
        assert got_cfg == cfg
        for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(k))
        text = "The capital of France is"
        assert got_tok.encode(text) == tokenizer.encode(text)
    assert len(got["layers"]["wqkv"].sharding.device_set) == 4


def test_missing_bucket_paths_name_what_is_missing(gcs_bucket):
    with pytest.raises(FileNotFoundError, match="model.json"):
        store.load_config(f"{gcs_bucket}/no/such/ckpt")


def test_file_urls_and_local_paths_are_the_same_checkpoint(tmp_path, tiny_host):
    cfg, params, tokenizer = tiny_host
    store.save(f"file://{tmp_path}/c", cfg, params, tokenizer)
    assert store.is_checkpoint(str(tmp_path / "c")) and store.load_config(f"file://{tmp_path}/c") == cfg


def test_remote_files_are_copied_once_for_readers_that_need_local_files(gcs_bucket, tmp_path):
    src = paths.as_path(f"{gcs_bucket}/hf/model")
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01\x02")
    local = paths.local_copy(str(src), cache_dir=str(tmp_path))
    assert open(f"{local}/config.json").read() == '{"a": 1}'
    assert open(f"{local}/sub/w.bin", "rb").read() == b"\x00\x01\x02"
    (src / "config.json").write_text('{"a": 2}')  # the copy is not refreshed: one download per URL
    assert paths.local_copy(str(src), cache_dir=str(tmp_path)) == local
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # local paths are used in place


def test_an_llm_serves_from_the_bucket_what_it_serves_from_the_original(bucket_checkpoint, tiny_config):
    import jaxserve
    from jaxserve.sampling_params import SamplingParams
    served = tiny_config.copy_and_resolve_references()
    served.checkpoint.format, served.checkpoint.path, served.checkpoint.tokenizer = "orbax", bucket_checkpoint, ""
    served.model = dict(dtype="float32", max_seq_len=512)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    want = [o.token_ids for o in jaxserve.LLM(tiny_config).generate(prompts, greedy)]
    got = [o.token_ids for o in jaxserve.LLM(served).generate(prompts, greedy)]
    assert got == want and all(len(t) == 6 for t in got)
