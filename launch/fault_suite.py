"""Fault-injection suite: real servers on loopback, faults injected, lost requests counted by the clients.

    python launch/fault_suite.py --out=/tmp/faults.json
    python launch/fault_suite.py --scenarios=kill9_twice,burst --streams=2 --max_tokens=60

Every scenario starts `launch/serve.py` processes (the tiny model unless --config says otherwise)
and drives them over HTTP like users would. A request counts once a client was given its id
(the first streamed chunk, or a whole answer). It is lost unless its final text equals the text
of the same request run without faults (greedy, `ignore_eos`, asked of a server afterwards);
a request refused with a 4xx/5xx before it was given an id is refused, not lost. Clients that
were cut off reconnect with the id and the tokens they have (`/v1/requests/ID/stream`), as a
real client would after a restart. Nothing the engine counts for itself is used.

Scenarios: kill9_twice (SIGKILL mid-stream, a torn journal record, restart, again), sigterm
(drain into the journal, restart), sigterm_peer (hand over to a peer), device_fault (a fault in
the device step, in-process; the failed requests are resumed by a restarted engine), disconnect
(a client leaves mid-stream), burst (10x capacity at once), malformed (bad and oversized
bodies), import_noauth (the peer route without its secret). The last line printed is one JSON
object with the table (also written to --out).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import httpx
from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("kill9_twice", "sigterm", "sigterm_peer", "device_fault", "disconnect", "burst", "malformed",
             "import_noauth")
_SCENARIOS = flags.DEFINE_list("scenarios", list(SCENARIOS), f"Which to run, of {SCENARIOS}.")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "tiny.py"),
                                          "Model config the servers run.")
_STREAMS = flags.DEFINE_integer("streams", 4, "Concurrent streaming clients per scenario.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 120, "Tokens each client asks for.", lower_bound=20)
_OUT = flags.DEFINE_string("out", "", "Also write the table (JSON) here.")
SECRET = "fault-suite-peer-secret"
TORN = '{"op":"tokens","id":"cmpl-torn","ids":[1,2'  # what a write cut short by a crash leaves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `launch/serve.py` process on loopback; restartable on the same port and journal."""

    def __init__(self, workdir: str, name: str, extra=()):
        self.port, self.journal = free_port(), os.path.join(workdir, f"{name}.journal")
        self.url, self.log, self.extra, self.proc = f"http://127.0.0.1:{self.port}", os.path.join(workdir, f"{name}.log"), list(extra), None

    def start(self, timeout: float = 180) -> float:
        """Starts it; returns the seconds until /health answered."""
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(PYTHONPATH=REPO, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), JAXSERVE_PEER_SECRET=SECRET)
        t = time.time()
        with open(self.log, "a") as out:
            config = os.path.abspath(config_flags.get_config_filename(flags.FLAGS["config"]))
            self.proc = subprocess.Popen([sys.executable, "launch/serve.py", f"--config={config}",
                                          "--served_model_name=m", f"--port={self.port}", f"--journal={self.journal}",
                                          "--shutdown_grace_s=0.5", *self.extra],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.time() - t
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} did not become healthy")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def prompt(i: int) -> str:
    return f"Request {i}: the story of the lighthouse keeper and the"


def body(i: int, stream: bool) -> dict:
    return {"model": "m", "prompt": prompt(i), "max_tokens": _MAX_TOKENS.value, "temperature": 0,
            "ignore_eos": True, "stream": stream, **({"logprobs": 0} if stream else {})}  # one chunk a token


class StreamClient:
    """A streaming client in its own thread; after a cut it reconnects when told where."""

    def __init__(self, i: int, url: str):
        self.i, self.id, self.text, self.tokens = i, None, "", 0
        self.finish, self.refused, self.first_resumed_at, self.gone = None, None, None, False
        self._go = threading.Event()
        self._url, self.cut = url, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _consume(self, response, resumed: bool):
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise httpx.ReadError(chunk["error"].get("message", "error"))
            self.id = self.id or chunk["id"]
            choice = chunk["choices"][0]
            self.text += choice["text"]
            lp = choice.get("logprobs")  # asked for: one entry per token the chunk carries
            self.tokens += len(lp["tokens"]) if lp and lp.get("tokens") is not None else 1
            if resumed and self.first_resumed_at is None:
                self.first_resumed_at = time.time()
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def _run(self):
        try:
            with httpx.stream("POST", self._url + "/v1/completions", json=body(self.i, True), timeout=300) as r:
                if r.status_code != 200:
                    self.refused = r.status_code
                    return
                self._consume(r, False)
        except httpx.HTTPError:
            pass
        while self.finish is None and self.id is not None:
            self.cut.set()
            self._go.wait()
            self._go.clear()
            try:
                url = f"{self._url}/v1/requests/{self.id}/stream?from_token={self.tokens}"
                with httpx.stream("GET", url, timeout=300) as r:
                    if r.status_code == 404:  # the server does not know it: the client gives up
                        self.gone = True
                        return
                    if r.status_code == 200:
                        self._consume(r, True)
            except httpx.HTTPError:
                pass

    def reconnect(self, url: str):
        self._url, self.first_resumed_at = url, None
        self.cut.clear()
        self._go.set()


def reconnect_all(clients, url: str):
    """Every client that was cut off before its end reconnects to `url`."""
    for c in clients:
        if c.finish is None and c.id is not None:
            c.cut.wait(60)
            c.reconnect(url)


def wait_tokens(clients, n: int, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline and any(c.tokens < n and c.finish is None for c in clients):
        time.sleep(0.005)


def references(url: str, indices, workers: int = 8, **overrides) -> Dict[int, str]:
    """The texts of the same requests (with `overrides` to their bodies) without faults, asked
    `workers` at a time (no more than the server admits)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        outs = pool.map(lambda i: httpx.post(url + "/v1/completions", json={**body(i, False), **overrides},
                                             timeout=300), indices)
        return {i: r.json()["choices"][0]["text"] for i, r in zip(indices, outs)}


def count(clients, reference: Dict[int, str]) -> dict:
    given = [c for c in clients if c.id is not None]
    lost = [c for c in given if c.finish != "length" or c.text != reference[c.i]]
    # what each lost request got against what it should have: enough to tell a cut from a wrong token
    why = [{"id": c.id, "finish": c.finish, "gone": c.gone, "tokens": c.tokens, "text": c.text,
            "reference": reference[c.i]} for c in lost]
    return {"requests": len(clients), "given_an_id": len(given), "refused": sum(c.refused is not None for c in clients),
            "lost": len(lost), "lost_ids": [c.id for c in lost], "lost_detail": why}


# -- scenarios ------------------------------------------------------------------------------------
def kill9_twice(workdir: str) -> dict:
    s = Server(workdir, "kill9")
    s.start()
    clients = [StreamClient(i, s.url) for i in range(_STREAMS.value)]
    restarts, resumed_after = [], []
    for crash in range(2):
        # a third and two thirds of the way: each kill lands mid-stream, after the last resume
        wait_tokens(clients, _MAX_TOKENS.value * (crash + 1) // 3)
        cut = [c for c in clients if c.finish is None and c.id is not None]
        s.signal(signal.SIGKILL)
        with open(s.journal, "a") as f:
            f.write(TORN)  # the crash also cut a write short
        t = time.time()
        restarts.append(s.start())
        reconnect_all(clients, s.url)
        deadline = time.time() + 120
        while time.time() < deadline and not all(c.finish or c.first_resumed_at for c in clients):
            time.sleep(0.02)
        firsts = [c.first_resumed_at for c in cut if c.first_resumed_at]  # not an earlier crash's resume
        resumed_after.append(round(min(firsts) - t, 2) if firsts else None)
    for c in clients:
        c.thread.join(300)
    out = count(clients, references(s.url, range(_STREAMS.value)))
    s.stop()
    return {**out, "faults": 2, "restart_to_healthy_s": restarts, "restart_to_first_resumed_token_s": resumed_after}


def sigterm(workdir: str, peer: bool = False) -> dict:
    b = Server(workdir, "peer") if peer else None
    if b:
        b.start()
    a = Server(workdir, "drained", [f"--peer={b.url}"] if b else [])
    a.start()
    clients = [StreamClient(i, a.url) for i in range(_STREAMS.value)]
    wait_tokens(clients, 8)
    a.signal(signal.SIGTERM)
    target = b if b else a
    if not b:
        a.start()
    reconnect_all(clients, target.url)
    for c in clients:
        c.thread.join(300)
    out = count(clients, references(target.url, range(_STREAMS.value)))
    for s in (a, b):
        if s:
            s.stop()
    return {**out, "faults": 1}


def device_fault(workdir: str) -> dict:
    """In-process (the fault is patched into the step): the failed requests stay in the journal; a
    restarted engine on the same journal finishes them, and their clients reconnect there."""
    import uvicorn

    sys.path.insert(0, REPO)
    from jaxserve.engine.faults import DeviceFault
    from jaxserve.engine.journal import TokenJournal
    from jaxserve.llm import engine_from_config
    from jaxserve.server import create_app
    journal = os.path.join(workdir, "fault.journal")

    def serve():
        engine = engine_from_config(_CONFIG.value)
        engine.journal = TokenJournal(journal)
        engine.resume_valid(engine.journal.unfinished_requests())
        port = free_port()
        served = create_app(engine, "m")
        uv = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url, (uv, served, thread)
            except httpx.HTTPError:
                time.sleep(0.2)

    def shut(handle):  # as SIGTERM does in launch/serve.py: cut-off requests stay in the journal
        uv, served, thread = handle
        served.state.server.engine_loop.drain()
        uv.should_exit = True
        thread.join(60)

    url, uv = serve()
    with DeviceFault() as fault:
        clients = [StreamClient(i, url) for i in range(_STREAMS.value)]
        wait_tokens(clients, 8)
        fault.armed = True
        deadline = time.time() + 60
        while not fault.fired and time.time() < deadline:
            time.sleep(0.01)
        fault.armed = False
        fired = fault.fired
        time.sleep(1.0)
    shut(uv)  # the operator restarts the server: the journal has the failed requests
    url, uv = serve()
    reconnect_all(clients, url)
    for c in clients:
        c.thread.join(300)
    out = count(clients, references(url, range(_STREAMS.value)))
    shut(uv)
    return {**out, "faults": fired}


def disconnect(workdir: str) -> dict:
    s = Server(workdir, "disconnect")
    s.start()
    leaving = [threading.Thread(target=_leave, args=(s.url, 100 + i), daemon=True) for i in range(2)]
    clients = [StreamClient(i, s.url) for i in range(_STREAMS.value)]
    for t in leaving:
        t.start()
    for t in leaving:
        t.join(120)
    for c in clients:
        c.thread.join(300)
    out = count(clients, references(s.url, range(_STREAMS.value)))
    metrics = httpx.get(s.url + "/metrics").text
    used = [line for line in metrics.splitlines() if line.startswith('jaxserve_kv_pages_in_use{pool="device"}')]
    s.stop()
    return {**out, "faults": len(leaving), "kv_pages_used_after": float(used[0].split()[-1]) if used else None}


def _leave(url: str, i: int):
    with httpx.stream("POST", url + "/v1/completions", json=body(i, True), timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 5:
                return  # the client goes away mid-stream


def burst(workdir: str) -> dict:
    waiting = 4
    s = Server(workdir, "burst", [f"--max_waiting_requests={waiting}", "--config.engine.max_batch=4"])
    s.start()
    rss0 = _rss(s.proc.pid)
    n = 10 * (4 + waiting)
    results: List[Optional[httpx.Response]] = [None] * n

    def one(i):
        try:
            results[i] = httpx.post(s.url + "/v1/completions", json={**body(i % 8, False), "max_tokens": 24},
                                    timeout=600)
        except httpx.HTTPError:
            results[i] = None
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    rss1 = _rss(s.proc.pid)
    ref = references(s.url, range(8), workers=waiting, max_tokens=24)
    ok = [i for i, r in enumerate(results) if r is not None and r.status_code == 200]
    refused = [r for r in results if r is not None and r.status_code in (429, 503)]
    lost = [i for i in ok if results[i].json()["choices"][0]["text"] != ref[i % 8]]
    lost += [i for i, r in enumerate(results) if r is None or r.status_code not in (200, 429, 503)]
    s.stop()
    return {"requests": n, "given_an_id": len(ok), "refused": len(refused), "lost": len(lost), "lost_ids": lost,
            "faults": 1, "retry_after_on_every_refusal": all("retry-after" in r.headers for r in refused),
            "rss_mb_before_after": [rss0, rss1]}


def _rss(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


def malformed(workdir: str) -> dict:
    s = Server(workdir, "malformed", ["--max_body_bytes=65536"])
    s.start()
    bad = [b"{not json", b"[1, 2]", b"", b"[" * 30000 + b"]" * 30000, json.dumps({"prompt": "x" * 100000}).encode(),
           json.dumps({"prompt": [5, 10 ** 9]}).encode(), json.dumps({"prompt": "hi", "max_tokens": 10 ** 9}).encode(),
           json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), b'{"prompt": "\\ud800"}']
    statuses = [httpx.post(s.url + "/v1/completions", content=b, headers={"Content-Type": "application/json"},
                           timeout=60).status_code for b in bad]
    healthy = httpx.get(s.url + "/health").status_code == 200
    good = httpx.post(s.url + "/v1/completions", json=body(0, False), timeout=300).status_code
    s.stop()
    wrong = [st for st in statuses if not 400 <= st < 500]
    return {"requests": len(bad) + 1, "given_an_id": 1 if good == 200 else 0, "refused": len(bad) - len(wrong),
            "lost": len(wrong) + (good != 200), "faults": len(bad), "statuses": statuses, "healthy_after": healthy}


def import_noauth(workdir: str) -> dict:
    s = Server(workdir, "import")
    s.start()
    record = {"requests": [{"id": "cmpl-x", "prompt": [5, 6], "params": {"max_tokens": 4}, "seed": 1, "arrival": 0.0}]}
    statuses = [httpx.post(s.url + "/v1/requests/import", json=record, headers=h).status_code
                for h in ({}, {"Authorization": "Bearer wrong"})]
    taken = httpx.get(s.url + "/v1/requests/cmpl-x/stream").status_code
    s.stop()
    return {"requests": 2, "given_an_id": 0, "refused": sum(st == 401 for st in statuses), "lost": 0,
            "faults": 2, "statuses": statuses, "stranger_request_exists": taken != 404}


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)
    table = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in _SCENARIOS.value:
            if name not in SCENARIOS:
                raise SystemExit(f"--scenarios: {name!r} is not one of {SCENARIOS}")
            t = time.time()
            run = (lambda w: sigterm(w, peer=True)) if name == "sigterm_peer" else globals()[name]
            table[name] = {**run(workdir), "wall_s": round(time.time() - t, 1)}
            row = table[name]
            print(f"{name:<14} faults {row['faults']:>3}  requests {row['requests']:>3}  given an id "
                  f"{row['given_an_id']:>3}  refused {row['refused']:>3}  lost {row['lost']}  ({row['wall_s']} s)",
                  flush=True)
    total = sum(row["lost"] for row in table.values())
    print(f"lost in all: {total}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(table, f, indent=1)
    print(json.dumps(table))


if __name__ == "__main__":
    app.run(main)
