"""GEMM row padding (jaxserve.model.gemm_rows): which products get padded, from their timings."""
import json

from jaxserve.engine import model_runner
from jaxserve.model import gemm_rows
from jaxserve.model.config import model_config_from_dict
from jaxserve.model.sharding import make_mesh
from jaxserve.scheduling.cost_model import StepShape

CFG = model_config_from_dict(dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=16, mlp_dim=128, max_seq_len=128, dtype="bfloat16"))


def fake_step(cliffs, noise_s=0.0):
    """A decode step's seconds: 1 ms per 8 rows, plus (name, rows) -> extra seconds of a slow
    product, gone when that product runs padded; padding costs 10 us; noise up to noise_s."""
    def step_seconds(rows, pads):
        s = rows / 8 * 1e-3 + sum(cliffs.get((name, rows), 0.0) for name in gemm_rows.weight_matrices(CFG))
        for name, run in pads:
            s += 10e-6 - cliffs.get((name, rows), 0.0)
        return s + noise_s * ((rows + len(pads)) % 3) / 2
    return step_seconds


def test_only_the_slow_products_are_padded():
    table = gemm_rows.tune(CFG, (8, 16, 32), fake_step({("w_gate_up", 16): 1e-3}))
    assert table == {16: (("w_gate_up", 24),)}  # the first candidate that saves as much


def test_savings_under_the_threshold_pad_nothing():
    threshold = gemm_rows.MIN_SAVING_S * CFG.num_layers
    assert gemm_rows.tune(CFG, (8, 16, 32), fake_step({}, noise_s=0.9 * threshold)) == {}
    assert gemm_rows.tune(CFG, (8, 16), fake_step({("wo", 8): 0.5 * threshold})) == {}
    assert gemm_rows.choose({128: 1.0, 136: 1.0 - 2 * threshold}, 128, threshold) == 136


def test_tables_are_keyed_by_product_shape(tmp_path):
    table = {16: (("w_gate_up", 24),), 128: (("wo", 136), ("w_down", 144))}
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({"entries": gemm_rows.to_entries(CFG, table)}))
    assert gemm_rows.load(CFG, "any", str(path)) == table
    other = model_config_from_dict(dict(CFG.__dict__, mlp_dim=256))  # other gate|up and down shapes
    assert gemm_rows.load(other, "any", str(path)) == {128: (("wo", 136),)}
    assert gemm_rows.load(CFG, "a GPU without a table", str(tmp_path / "none.json")) == {}


def test_weight_matrices_are_the_layer_params_shapes():
    import math
    from jaxserve.model.params import abstract_params
    layers = abstract_params(CFG)["layers"]
    for name, (k, n) in gemm_rows.weight_matrices(CFG).items():
        shape = layers[name].shape[1:]  # [layers, ...]
        assert math.prod(shape) == k * n and shape[0] == (k if name != "wo" else CFG.num_heads)


def test_decode_steps_take_their_row_count_padding_and_prefill_none():
    mesh = make_mesh(1, 1)
    table = {16: (("w_gate_up", 24),)}
    kw = lambda shape: model_runner.forward_kwargs(CFG, mesh, shape, "reference", False, table)["gemm_rows"]
    assert kw(StepShape(16, 16, 8, False)) == (("w_gate_up", 24),)
    assert kw(StepShape(8, 8, 8, False)) == ()
    assert kw(StepShape(16, 16, 8, True)) == ()
    # CPU meshes are never timed: their steps run unpadded
    assert model_runner.step_settings(CFG, mesh)["row_table"] == {}


def test_shipped_tables_parse_and_pad_only_upward():
    import glob
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("c", os.path.join(os.path.dirname(__file__), "..", "configs", "llama3_8b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg_8b = model_config_from_dict(dict(module.get_config().model))
    files = glob.glob(os.path.join(gemm_rows.TABLE_DIR, "*.json"))
    assert files, "the package ships at least the H200 table"
    for path in files:
        doc = json.load(open(path))
        assert gemm_rows.table_path(doc["device_kind"]) == path
        assert all(e["run_rows"] > e["rows"] for e in doc["entries"])
    # the H200's 8B decode steps of 128 rows run gate|up at more rows (docs/benchmarks.md)
    table = gemm_rows.load(cfg_8b, "NVIDIA H200")
    assert [name for name, _ in table[128]] == ["w_gate_up"]
