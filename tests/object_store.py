"""An S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer) for tests: real s3fs requests, no other host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pytest


@contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch, bucket: str = "segetl-test") -> Iterator[fsspec.AbstractFileSystem]:
    """Start a local S3 server, point fsspec's `s3://` at it (for URLs too), create `bucket`; yields the filesystem."""
    s3fs = pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                  "region_name": "us-east-1"}}
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.call_s3("create_bucket", Bucket=bucket)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
