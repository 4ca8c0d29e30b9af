"""jaxserve's orbax/tensorstore checkpoint: save once, restore into any mesh and dtype."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxserve.checkpoint import store
from jaxserve.checkpoint.load import load, load_host
from jaxserve.model.sharding import make_mesh

from conftest import REPO


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    path = str(tmp_path_factory.mktemp("ckpt"))
    cfg, params, tokenizer = load_host(tiny_config.checkpoint, tiny_config.model)
    store.save(path, cfg, params, tokenizer)
    return path, cfg, params


@pytest.mark.parametrize("shape", [(1, 1), (2, 4), (1, 8), (8, 1), (4, 2)])
def test_restore_into_any_mesh(tiny_checkpoint, shape):
    path, cfg, params = tiny_checkpoint
    mesh = make_mesh(*shape)
    restored = store.restore(path, store.load_config(path), mesh)
    for (kp, want), got in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(kp))
        assert got.sharding.mesh.shape == mesh.shape
    # q, k and v are split by kv head (2) over `model` where it divides them
    expect = "model" if cfg.num_kv_heads % shape[1] == 0 else None
    assert restored["layers"]["wqkv"].sharding.spec[2] == expect


def test_restore_casts_dtype_and_keeps_tokenizer(tiny_checkpoint):
    path, cfg, params = tiny_checkpoint
    ckpt = {"format": "orbax", "path": path}
    cfg16, p16, tok = load(ckpt, {"dtype": "bfloat16"}, make_mesh(1, 2))
    assert cfg16.dtype == "bfloat16" and p16["embed"].dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(p16["embed"], np.float32), params["embed"], rtol=1e-2, atol=1e-3)
    assert tok is not None and tok.encode("hello world") == tok.encode("hello world") and tok.chat_template



def test_random_weights_are_drawn_on_the_mesh(tiny_config, tiny_host, monkeypatch):
    """checkpoint.format=random (the serving path: LLM, serve.py) draws the weights on the devices,
    in their shardings and dtype, never as host arrays; the numbers are load_host's, whatever the mesh."""
    from jaxserve.checkpoint import load as load_module
    from jaxserve.model.sharding import param_shardings

    def through_the_host(*args, **kwargs):
        raise AssertionError("random weights were made on the host")
    monkeypatch.setattr(load_module, "load_host", through_the_host)
    monkeypatch.setattr(load_module, "shard_params", through_the_host)
    _, host, _ = tiny_host
    for shape, dtype in (((1, 1), "float32"), ((2, 4), "float32"), ((1, 8), "bfloat16")):
        mesh = make_mesh(*shape)
        cfg, params, tok = load(tiny_config.checkpoint, dict(tiny_config.model, dtype=dtype), mesh)
        assert cfg.dtype == dtype and tok is not None and tok.encode("hi")
        want = jax.tree.leaves(param_shardings(cfg, mesh))
        for (kp, got), sharding, expect in zip(jax.tree.flatten_with_path(params)[0], want, jax.tree.leaves(host)):
            name = jax.tree_util.keystr(kp)
            assert isinstance(got, jax.Array) and got.dtype == cfg.jnp_dtype, name
            assert got.sharding.is_equivalent_to(sharding, got.ndim), name
            expect = np.asarray(jax.numpy.asarray(expect, cfg.jnp_dtype), np.float32)
            np.testing.assert_array_equal(np.asarray(got, np.float32), expect, err_msg=name)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        load({"format": "orbax", "path": str(tmp_path)}, {}, make_mesh(1, 1))


def test_corrupt_params_are_named(tiny_checkpoint, tmp_path):
    path, cfg, params = tiny_checkpoint
    bad = tmp_path / "bad"
    store.save(str(bad), cfg, params)
    for root, _, files in os.walk(bad / "params"):
        for f in files:
            if f.endswith(".ocdbt") or root.endswith("d"):
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"corrupt")
    with pytest.raises(ValueError, match="params"):
        store.restore(str(bad), cfg, make_mesh(1, 1))


def test_convert_launcher_writes_a_servable_checkpoint(tmp_path):
    out = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "launch/convert.py", "--config=configs/tiny.py",
                           f"--output={out}", "--config.model.dtype=bfloat16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = store.load_config(str(out))
    assert cfg.dtype == "bfloat16" and cfg.num_layers == 2
    params = store.restore(str(out), cfg, make_mesh(1, 1))
    assert params["layers"]["wqkv"].dtype == jax.numpy.bfloat16
