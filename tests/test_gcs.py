"""Checkpoints and tokenizers on a bucket: gs:// through a real GCS API (an emulator on loopback)."""
import numpy as np
import jax
import pytest

from jaxserve import paths
from jaxserve.checkpoint import load, store
from jaxserve.model.sharding import make_mesh


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


def _request(rid, arrival):
    from jaxserve.engine.request import Request
    from jaxserve.sampling_params import SamplingParams
    return Request(rid, [5, 6, 7], SamplingParams(max_tokens=8), 1, arrival)


def test_a_bucket_journal_is_numbered_segments_replayed_in_order_and_compacted(gcs_bucket, monkeypatch):
    from jaxserve.engine.journal import SegmentLog, TokenJournal, replay
    monkeypatch.setattr(SegmentLog, "TOKEN_SYNC_INTERVAL_S", 0.0)  # every second token record uploads
    path = f"{gcs_bucket}/journals/unit"
    j = TokenJournal(path, fsync_every=2, compact_bytes=1 << 20)
    for i in range(3):
        j.added(_request(f"r{i}", float(i)))
    j.committed("r0", [11, 12], [-0.1, -0.2])
    j.committed("r1", [21], [-0.3])  # the second token record: a sync
    j.committed("r0", [13], [-0.4])  # not synced: lost in a crash, regenerated identically later
    got = {r.request_id: r.output_ids for r in replay(path)}  # what a crash now would leave
    assert got == {"r0": [11, 12], "r1": [21], "r2": []}
    segments = sorted(p.name for p in paths.as_path(path).iterdir())
    assert segments == [f"seg-{n:09d}.jsonl" for n in range(len(segments))] and len(segments) == 4
    j.finished("r2", "stop")
    j.close()
    reopened = TokenJournal(path)  # a request ended: opening compacts into one base segment
    assert [p.name for p in paths.as_path(path).iterdir()] == [f"seg-{len(segments) + 1:09d}.jsonl"]
    assert {r.request_id: r.output_ids for r in reopened.unfinished_requests()} == {"r0": [11, 12, 13], "r1": [21]}
    assert [r.request_id for r in reopened.finished_requests()] == ["r2"]
    assert {r.request_id: r.output_ids for r in replay(path)} == {"r0": [11, 12, 13], "r1": [21]}
    # token records upload at most every TOKEN_SYNC_INTERVAL_S; an add uploads at once
    monkeypatch.setattr(SegmentLog, "TOKEN_SYNC_INTERVAL_S", 60.0)
    reopened.committed("r1", [22], [-0.5])
    reopened.committed("r1", [23], [-0.6])
    assert {r.request_id: r.output_ids for r in replay(path)}["r1"] == [21]
    reopened.added(_request("r3", 3.0))
    assert {r.request_id: r.output_ids for r in replay(path)}["r1"] == [21, 22, 23]


def _serve(workdir, port, checkpoint, journal):
    """launch/serve.py run from its own working directory, with only bucket paths in common."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    from test_journal import ORBAX_CONFIG
    os.makedirs(workdir, exist_ok=True)
    with open(f"{workdir}/config.py", "w") as f:
        f.write(ORBAX_CONFIG.format(path=checkpoint))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the emulator's settings included
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    with open(f"{workdir}/serve.log", "a") as out:
        return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "serve.py"), "--config=config.py",
                                 "--served_model_name=tiny", f"--port={port}", f"--journal={journal}",
                                 "--journal_fsync_every=1"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_server_killed_mid_stream_resumes_every_request_elsewhere_from_the_bucket(gcs_bucket, bucket_checkpoint,
                                                                                   tmp_path):
    """SIGKILL one server mid-generation; a new one in another working directory, pointed at the
    same bucket (checkpoint and journal), finishes every request (or serves it, if it had ended),
    and each client's text equals an uninterrupted run's."""
    import json
    import os
    import signal
    import httpx
    from jaxserve.engine.journal import replay
    from test_server import free_port, wait_healthy
    journal = f"{gcs_bucket}/journals/serve"
    prompts = ["The history of the printing press", "A recipe for bread:", "def quicksort(xs):"]
    body = lambda p: {"model": "tiny", "prompt": p, "max_tokens": 400, "temperature": 0, "stream": True, "logprobs": 0}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(str(tmp_path / "vm1"), port, bucket_checkpoint, journal)
    try:
        wait_healthy(url, proc)
        streams, have = [], {}
        for p in prompts:
            ctx = httpx.stream("POST", url + "/v1/completions", json=body(p), timeout=120)
            response = ctx.__enter__()
            lines = (json.loads(x[6:]) for x in response.iter_lines() if x.startswith("data: ") and x != "data: [DONE]")
            first = next(lines)
            streams.append((ctx, lines))  # held: a dropped line iterator closes its stream (an abort)
            have[first["id"]] = (p, first["choices"][0]["text"], 1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        for ctx, _ in streams:
            try:
                ctx.__exit__(None, None, None)
            except httpx.HTTPError:
                pass
        pending = {r.request_id: r for r in replay(journal)}
        # mid-generation ones resume; any that ended before the kill are served from the journal
        assert pending and set(pending) <= set(have)
        proc = _serve(str(tmp_path / "vm2"), port, bucket_checkpoint, journal)
        wait_healthy(url, proc)
        for rid, (prompt, before, n) in have.items():
            rest = ""
            with httpx.stream("GET", f"{url}/v1/requests/{rid}/stream?from_token={n}", timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        rest += json.loads(line[6:])["choices"][0]["text"]
            reference = httpx.post(url + "/v1/completions", json={**body(prompt), "stream": False}, timeout=300).json()
            assert before + rest == reference["choices"][0]["text"], rid
        assert replay(journal) == []
    finally:
        proc.kill()
        proc.wait(30)


def test_a_bucket_journal_compacts_before_replay_would_read_too_many_segments(gcs_bucket, monkeypatch):
    from jaxserve.engine.journal import SegmentLog, TokenJournal, replay
    monkeypatch.setattr(SegmentLog, "MAX_SEGMENTS", 4)
    path = f"{gcs_bucket}/journals/crowded"
    j = TokenJournal(path)  # compact_bytes of 64 MB: size alone would never compact here
    for i in range(4):
        j.added(_request(f"r{i}", float(i)))  # one segment each
    j.finished("r0", "stop")  # the fifth: crowded, so it compacts into one base segment
    names = [p.name for p in paths.list_dir(path)]
    assert len(names) == 1 and paths.as_path(f"{path}/{names[0]}").read_text().startswith(SegmentLog.BASE)
    assert sorted(r.request_id for r in replay(path)) == ["r1", "r2", "r3"]


CONFIG_IN_BUCKET = '''
from jaxserve.config import default_config
def get_config(max_batch="{default}"):
    c = default_config()
    c.engine.max_batch = int(max_batch)
    return c
'''


def test_config_files_load_from_a_bucket_fresh_every_run(gcs_bucket):
    from absl import flags
    from ml_collections import config_flags
    from jaxserve.cli import fetch_remote_config_files

    def parse(*args):  # as a launcher would; ml_collections defines override flags from the argv
        argv, fv = ["prog", *args], flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
        fv(fetch_remote_config_files(argv, fv))
        return fv.config

    url = f"{gcs_bucket}/configs/serve.py"
    paths.as_path(url).write_text(CONFIG_IN_BUCKET.format(default=4))
    config = parse(f"--config={url}:7", "--config.engine.token_budget=64")
    assert (config.engine.max_batch, config.engine.token_budget) == (7, 64)  # the :arg and the override
    paths.as_path(url).write_text(CONFIG_IN_BUCKET.format(default=5))  # edited between two runs
    assert parse(f"--config={url}").engine.max_batch == 5
    with pytest.raises(FileNotFoundError, match="--config: no config file at gs://"):
        parse(f"--config={gcs_bucket}/configs/none.py")
