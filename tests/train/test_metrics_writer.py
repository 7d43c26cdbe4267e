"""MetricsWriter: JSONL records and TensorBoard scalars, read back from the files."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from prefopt_jax.train.metrics import MetricsWriter


def read_scalars(directory):
    """{tag: [(step, value)]} from the TFRecord event files under `directory`, parsed here."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])  # past length and its crc
            at += 12 + length + 4  # record and its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_and_tensorboard_hold_every_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=3)
    written = {1: {"loss": 0.75, "rewards/accuracy": 0.5},
               2: {"loss": 0.5, "rewards/accuracy": 1.0},
               3: {"loss": 0.25, "rewards/accuracy": 1.0}}
    for step, values in written.items():
        writer.write(step, values)
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == [{"step": s, **v} for s, v in written.items()]
    scalars = read_scalars(tmp_path / "tb")
    assert sorted(scalars) == ["loss", "rewards/accuracy"]
    for tag, points in scalars.items():
        assert points == [(s, pytest.approx(v[tag])) for s, v in written.items()], tag


def test_tensorboard_writer_does_not_load_torch(tmp_path):
    pytest.importorskip("torch")  # only meaningful where tensorboardX could import it
    code = ("import sys\nfrom prefopt_jax.train.metrics import MetricsWriter\n"
            f"w = MetricsWriter({str(tmp_path)!r}, 1)\nw.write(1, {{'loss': 0.5}})\nw.close()\n"
            "print('torch' in sys.modules, 'tensorboardX' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stderr
    assert read_scalars(tmp_path / "tb") == {"loss": [(1, 0.5)]}
