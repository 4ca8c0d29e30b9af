"""Measures this GPU's GEMM row-padding table (jaxserve.model.gemm_rows) and writes it.

For each decode row count, the model's decode step (random weights, every sequence at
--context tokens) runs under jax.profiler unpadded, then with each layer product padded by each
of gemm_rows.PAD_CANDIDATES rows in turn; a padding is kept when the step's summed kernel time
falls by more than gemm_rows.MIN_SAVING_S a layer. Kernel time, not wall time: it does not
move between runs of the same program, so small differences are real.

  python launch/tune_gemm_rows.py --config=configs/llama3_8b.py --rows=8,16,32,64,128
"""
from __future__ import annotations

import datetime
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama3_8b.py", "Model config file.")
_ROWS = flags.DEFINE_list("rows", "8,16,32,64,128", "Decode step row counts to tune.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Tokens of context of every sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Profiled steps per variant.")
_OUTPUT = flags.DEFINE_string("output", "", "Table file (default: the package's file for this GPU kind).")

from kernel_time import kernel_seconds  # noqa: E402 (launch/ is on sys.path when this runs as a script)



def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jaxserve.engine import model_runner
    from jaxserve.model import gemm_rows
    from jaxserve.model.config import model_config_from_dict
    from jaxserve.model.params import init_random_on_device
    from jaxserve.model.sharding import make_mesh

    config = _CONFIG.value
    cfg = model_config_from_dict(dict(config.model, max_seq_len=max(_CONTEXT.value + 1, 16)))
    rows_list = [int(r) for r in _ROWS.value]
    from jaxserve.scheduling.cost_model import MIN_TOKENS, bucket
    for r in rows_list:  # the table is keyed by a decode step's row count: its bucket
        if r != max(bucket(r), MIN_TOKENS):
            raise app.UsageError(f"--rows: {r} is not a decode step's row count (powers of two from {MIN_TOKENS})")
    mesh = make_mesh(1, 1)
    device = mesh.devices.flat[0]
    params = init_random_on_device(cfg, mesh)
    page = int(config.engine.page_size)
    pages_per_seq = -(-(_CONTEXT.value + 1) // page)
    num_pages = max(rows_list) * pages_per_seq + 1
    runner = model_runner.ModelRunner(cfg, params, mesh, num_pages, page, max(rows_list))

    def step_seconds(rows, pads):
        chunks = [model_runner.Chunk([5], _CONTEXT.value, list(range(i * pages_per_seq, (i + 1) * pages_per_seq)),
                                     0.0, 0, 1.0, 0, 1) for i in range(rows)]
        shape, step, sample, _ = runner.pack(chunks)
        step = jax.tree.map(jnp.asarray, step)
        kwargs = dict(runner.step_kwargs(shape), gemm_rows=pads)

        def run():
            logits, runner.cache = model_runner.forward_step(runner.params, runner.cache, runner.prev_tokens, step, **kwargs)
            return logits

        s = kernel_seconds(run, _STEPS.value)
        print(f"rows {rows:4d} {str(pads):28s} {s * 1e3:8.3f} ms", flush=True)
        return s

    table = gemm_rows.tune(cfg, rows_list, step_seconds)
    print("table:", table, flush=True)
    path = _OUTPUT.value or gemm_rows.table_path(device.device_kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device_kind": device.device_kind, "jax": jax.__version__,
                   "date": datetime.date.today().isoformat(), "context": _CONTEXT.value,
                   "command": " ".join(sys.argv), "entries": gemm_rows.to_entries(cfg, table)}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    app.run(main)
