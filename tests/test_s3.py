"""Real object storage end to end: moto's S3 server on 127.0.0.1 and s3fs, the same code paths as AWS S3.

The whole demo DAG (reduced) writes to `s3://segetl/run` and pseudo-labels an image folder on `s3://`; it is
killed with SIGKILL while `train_ifseg` trains, resumes from the checkpoint on S3, and ends byte-identical to the
same run on a local root. A shard above s3fs' single-PUT limit goes up as a multipart upload.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.data.toyworld import render_scene, split_seed
from pipeline.run import compose, run
from pipeline.shards import SampleOutput, commit_shard, join, read_done
from pipeline.tar_samples import iter_tar_samples

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BUCKET = "segetl"
REDUCED = [  # the whole demo DAG, small enough for CI; train_ifseg long enough to be killed mid-training
    "toy.train_images=4", "toy.val_images=2", "toy.size=64", "wordgrid.num_samples=200",
    "wordgrid.samples_per_shard=100", "train_ifseg.loop.steps=40", "train_ifseg.loop.checkpoint_every=5",
    "train_ifseg.ifseg.width=32", "train_ifseg.ifseg.depth=1", "train_ifseg.ifseg.heads=2",
    "train_ifseg.ifseg.label_size=16", "train_ifseg.batch_size=4", "train_ifseg_st.loop.steps=2",
    "train_align.loop.steps=2", "train_zegclip.loop.steps=2", "train_zegclip_st.loop.steps=2",
    "train_ifseg_st.image_size=64", "train_align.image_size=56", "selftrain.samples_per_shard=2",
    "pseudolabel.samples_per_shard=2", "eval.samples_per_shard=1", "pseudolabel.amg.points_per_side=4",
    "eval.num_report_samples=1", "train_ifseg.prompt_templates=single", "train_ifseg_st.prompt_templates=single",
    "train_align.prompt_templates=single", "progress=lines",
    # pseudolabel reads an image folder on S3 (no ground truth there): the ZegCLIP nodes train on its labels
    "train_zegclip.label_file=label.png", "train_zegclip_st.label_file=label.png",
    "eval.methods=[{name:ifseg,kind:trained,input:ifseg},{name:ifseg_st,kind:trained,input:ifseg_st},"
    "{name:align,kind:trained,input:align},{name:zegclip,kind:trained,input:zegclip,protocol:zegclip,"
    "protocol_overrides:{short_side:64,mode:whole}},{name:zegclip_st,kind:trained,input:zegclip_st,"
    "protocol:zegclip,protocol_overrides:{short_side:64,mode:whole}}]",
    # the killed child and this process run every node with one torch thread: the same float reductions,
    # whatever thread count earlier tests (or the caller) left in this process
    *(f"{node}.resources.torch_threads=1" for node in ("wordgrid", "train_ifseg", "selftrain", "train_ifseg_st",
                                                        "pseudolabel", "train_align", "train_zegclip",
                                                        "train_zegclip_st", "eval")),
]
VOLATILE = ("run.json", ".done.json", ".parquet", "train_log.jsonl")  # timings: never part of the result bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with bucket `segetl`; s3fs (this process and children) pointed at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", options)
        patch.setenv("FSSPEC_S3", json.dumps(options))
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(name, "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()


def _upload_images(fs: fsspec.AbstractFileSystem, count: int) -> str:
    """Toy-world scenes as PNG files in an S3 folder (no labels: a folder input)."""
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(render_scene(split_seed("train", index), 64).image).save(buffer, format="PNG")
        fs.pipe_file(f"{BUCKET}/images/scene_{index:02d}.png", buffer.getvalue())
    return f"s3://{BUCKET}/images"


def _result_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    """Every file of every node's current output, by path relative to the root, without timing-bearing files."""
    files = {}
    for pointer in fs.glob(join(root, "*", "current.json")):
        node_dir = pointer.rsplit("/", 1)[0]
        out = join(node_dir, json.loads(fs.cat_file(pointer))["path"])
        for path in fs.find(out):
            relative = path[len(root.rstrip("/")) + 1:]
            if not relative.endswith(VOLATILE) and "/checkpoints/" not in relative:
                files[relative] = fs.cat_file(path)
    return files


def test_demo_dag_on_s3_killed_and_resumed_equals_a_local_root(s3, tmp_path, caplog, torch_threads):
    torch_threads(3)  # not what the runs pin (one thread): the bytes must not depend on this process' count
    images = _upload_images(s3, 4)
    overrides = [*REDUCED, "executor=local", "~pseudolabel.data",
                 f"+pseudolabel.data={{kind:folder,root:{images},vocab:toy}}"]
    root = f"s3://{BUCKET}/run"
    argv = [sys.executable, "-m", "pipeline.run", f"output_root={root}", *overrides]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not s3.glob(f"{BUCKET}/run/train_ifseg/*/checkpoints/step_*.pt"):
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not s3.glob(f"{BUCKET}/run/train_ifseg/*/model.pt"), "the kill must land mid-training"
    caplog.set_level(logging.INFO)
    summaries = run(compose("demo", [f"output_root={root}", *overrides]))
    assert [s.status for s in summaries][:2] == ["up to date", "ran"]  # wordgrid was committed before the kill
    assert any(r.message.startswith("resumed from checkpoint at step") for r in caplog.records)
    run(compose("demo", [f"output_root={tmp_path}", *overrides]))
    on_s3 = _result_files(s3, f"{BUCKET}/run")
    local = _result_files(fsspec.filesystem("file"), str(tmp_path))
    assert {name.split("/")[0] for name in on_s3} == {s.node for s in summaries}
    assert any(name.endswith("model.pt") for name in on_s3) and any("report" in name for name in on_s3)
    assert on_s3.keys() == local.keys()
    assert on_s3 == local  # manifests included: no timing in them (trainers' samples/s are in run.json)


def test_a_large_shard_goes_up_as_a_multipart_upload_and_reads_back(s3):
    payload = np.random.default_rng(0).integers(0, 255, 101 * 2**20, dtype=np.uint8).tobytes()  # > 2 x 50 MiB
    stage_dir = f"{BUCKET}/large/fp"
    done = commit_shard(s3, stage_dir, 0, [SampleOutput("big", {"bin": payload})], "fp")
    assert s3.info(f"{stage_dir}/000000.tar")["ETag"].strip('"').endswith("-3")  # 3 parts of 50 MiB
    assert read_done(s3, stage_dir, 0, "fp") == done
    data = s3.cat_file(f"{stage_dir}/000000.tar")
    assert hashlib.sha256(data).hexdigest() == done.sha256
    samples = list(iter_tar_samples(f"s3://{stage_dir}/000000.tar"))
    assert [s["__key__"] for s in samples] == ["big"] and samples[0]["bin"] == payload
