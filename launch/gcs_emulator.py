"""A GCS emulator on loopback (PyPI `gcp-storage-emulator`), for tests and benchmarks.

`start(bucket)` serves an in-memory bucket on a free 127.0.0.1 port and points this process's
clients at it through their documented settings: `STORAGE_EMULATOR_HOST` (gcsfs, which
etils.epath uses for gs://) and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, orbax's arrays; read
once a process, so start the emulator before anything touches gs://). Child processes started
afterwards inherit the same settings.

    python launch/gcs_emulator.py --bucket=ckpts   # serves until interrupted, prints its env
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict:
    """Environment that sends gcsfs and tensorstore to the emulator at `url`, unauthenticated."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: skip Google auth
            "FSSPEC_GCS_TOKEN": "anon",                    # gcsfs: no credentials
            # gcsfs otherwise asks the storage-control gRPC API for the bucket's type, which
            # an HTTP emulator does not serve (a 60 s timeout per bucket)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def start(bucket: str, port: int = 0):
    """Starts the emulator with `bucket` and sets this process's env; returns (server, url)."""
    from gcp_storage_emulator.server import create_server
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every miss is an ERROR line
    port = port or free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(client_env(url))
    return server, url


def start_for(path: str, default_bucket: str = "bench"):
    """`start` with the bucket `path` names (gs://BUCKET/...), or `default_bucket` for other paths."""
    return start(path[len("gs://"):].split("/")[0] if path.startswith("gs://") else default_bucket)


if __name__ == "__main__":
    name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--bucket=")), "jaxserve")
    server, url = start(name)
    for k, v in client_env(url).items():
        print(f"export {k}={v}")
    print(f"# serving gs://{name} at {url}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
