"""Every path jaxserve reads or writes: a local path, `file://...` or a bucket URL (`gs://...`).

One layer, `etils.epath` (what orbax uses; gs:// goes through gcsfs), so checkpoints, tokenizers
and journals take the same strings. Readers that need a real local file (a GGUF file is memory
mapped, safetensors are opened by name) get a local copy of a remote file, made once per URL.

A GCS emulator is reached the documented ways: `STORAGE_EMULATOR_HOST` for gcsfs and
`TENSORSTORE_GCS_HTTP_URL` for tensorstore (orbax's arrays).
"""
from __future__ import annotations

import hashlib
import os
import shutil

from etils import epath

URL_SCHEMES = ("gs://", "s3://")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "remote")


def is_remote(path: str) -> bool:
    return str(path).startswith(URL_SCHEMES)


def as_path(path) -> epath.Path:
    """An epath.Path for a local path (`~` expanded), a `file://` URL or a bucket URL."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_remote(path):
        path = os.path.abspath(os.path.expanduser(path))
    return epath.Path(path)


def list_dir(path) -> list:
    """The entries of a folder as they are now ([] when there is none: buckets have no empty
    folders). gcsfs caches listings per process, which would hide objects another process wrote."""
    p = as_path(path)
    if is_remote(str(p)):
        from etils.epath import backend
        backend.fsspec_backend.fs(str(p)).invalidate_cache(str(p))
    try:
        return list(p.iterdir())
    except FileNotFoundError:
        return []


def _copy_tree(src: epath.Path, dst: str) -> None:
    if not src.is_dir():
        src.copy(epath.Path(dst))
        return
    os.makedirs(dst, exist_ok=True)
    for child in src.iterdir():  # one listing a level (epath refuses ** on buckets)
        _copy_tree(child, os.path.join(dst, child.name))


def local_copy(path: str, cache_dir: str = CACHE_DIR) -> str:
    """A local path holding `path`'s file or directory: `path` itself when local, else a copy
    (made once: a later call with the same URL reuses it)."""
    if not is_remote(path):
        return str(as_path(path))
    src = as_path(path)
    dst = os.path.join(cache_dir, hashlib.sha256(str(path).encode()).hexdigest()[:16], src.name)
    if os.path.exists(dst):
        return dst
    tmp = f"{dst}.partial-{os.getpid()}"  # one per process: two may fetch the same URL at once
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    _copy_tree(src, tmp)
    try:
        os.replace(tmp, dst)  # a crash mid-copy leaves only the .partial, never a half cache entry
    except OSError:
        if not os.path.exists(dst):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use its copy
    return dst
