"""launch/fault_suite.py's scenario that no other test covers, run for real: a server killed with
SIGKILL twice mid-stream, with a torn journal record each time. The clients' own count of lost
requests must be 0 (every request given an id ends with the fault-free text). The other
scenarios have their own tests (test_journal, test_faults, test_auth, test_server)."""
import json
import subprocess
import sys

from conftest import REPO


def test_kill_9_twice_with_torn_records_loses_no_request(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "launch/fault_suite.py", "--scenarios=kill9_twice", "--streams=2",
                           "--max_tokens=40", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())
    kill = table["kill9_twice"]
    assert kill["faults"] == 2 and kill["given_an_id"] == 2 and kill["lost"] == 0, kill
    assert all(t is not None for t in kill["restart_to_first_resumed_token_s"]), kill
