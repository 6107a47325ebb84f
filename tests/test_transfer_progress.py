"""Progress of long transfers (backend/core/progress.py): the line-every-so-often rule with a fake clock, the tqdm
bar, and the real transfers that report through it against moto's S3 server (standing in for S3): a root's download
(root_store.fetch_s3, chunks counted), its upload (root_store.upload, boto3's Callback, a multipart file among them)
and deploy's upload of model.tar.gz. Each ends with a line whose byte count is the files' sizes."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path

import pytest

from backend.core.progress import TransferProgress, duration_text, size_text
from helpers import moto_server

REGION = "us-east-2"
BUCKET = "roots"
CLOSING = re.compile(r": ([\d,]+) bytes \(")  # the closing line's exact count


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counted(line: str) -> int:
    """The byte count of a closing line."""
    return int(CLOSING.search(line).group(1).replace(",", ""))


# ---- the rules, with a fake clock ----------------------------------------------------------------


def test_a_log_line_each_tenth_and_every_30_seconds_then_one_closing_line():
    clock, lines = FakeClock(), []
    progress = TransferProgress("downloading s3://b/root/", 1000, echo=lines.append, bar=False, clock=clock)
    clock.now += 10
    progress(50)  # 5%: nothing yet
    assert lines == []
    progress(60)  # 11%
    assert lines == ["downloading s3://b/root/: 110 bytes of 1.0 kB (11%), 11 bytes/s, about 81 s left"]
    clock.now += 30
    progress(10)  # still the first tenth, but 30 s since the last line
    assert lines[-1] == "downloading s3://b/root/: 120 bytes of 1.0 kB (12%), 3 bytes/s, about 4 min 53 s left"
    progress(400)  # 52%: past several tenths at once, one line
    progress(-100)  # a retried part rewound (s3transfer passes a negative amount)
    progress(100)  # back at 52%: that tenth was told already
    assert len(lines) == 3 and "520 bytes of 1.0 kB (52%)" in lines[2]
    clock.now += 10
    progress(480)  # all of it: the closing line says so
    assert len(lines) == 3
    assert progress.close() == "downloading s3://b/root/: 1,000 bytes (1.0 kB) in 50.0 s, 20 bytes/s"
    assert progress.close() == "" and lines[-1] == "downloading s3://b/root/: 1,000 bytes (1.0 kB) in 50.0 s, " \
                                                   "20 bytes/s" and len(lines) == 4  # closing twice adds nothing


def test_bytes_already_in_place_leave_the_total_and_a_failure_says_where_it_stopped():
    clock, lines = FakeClock(), []
    with pytest.raises(OSError):
        with TransferProgress("uploading root", 3_000_000, echo=lines.append, bar=False, clock=clock) as progress:
            progress.skip(1_000_000)  # a file that was already there
            clock.now += 2
            progress(500_000)  # a quarter of what is left
            raise OSError("disk full")
    assert lines[0] == "uploading root: 500.0 kB of 2.0 MB (25%), 250.0 kB/s, about 6 s left"
    assert lines[-1] == ("uploading root: stopped after 500,000 of 2,000,000 bytes (500.0 kB of 2.0 MB) in 2.0 s, "
                         "250.0 kB/s; 1.0 MB were already in place")


def test_on_a_terminal_a_tqdm_bar_instead_of_lines():
    stream, lines = io.StringIO(), []
    with TransferProgress("uploading model.tar.gz", 2_000_000, echo=lines.append, bar=True, stream=stream) as progress:
        progress.skip(500_000)
        for _ in range(3):
            progress(500_000)
    drawn = stream.getvalue()
    assert "uploading model.tar.gz: 100%" in drawn and "1.50M/1.50M" in drawn, drawn  # tqdm's bytes, total
    assert len(lines) == 1 and counted(lines[0]) == 1_500_000  # no periodic lines, the closing one still


def test_sizes_and_durations_read_as_people_write_them():
    assert [size_text(n) for n in (512, 12_345, 45_600_000, 7_890_000_000)] == \
        ["512 bytes", "12.3 kB", "45.6 MB", "7.89 GB"]
    assert [duration_text(s) for s in (42, 185, 4320)] == ["42 s", "3 min 5 s", "1 h 12 min"]


# ---- real transfers against moto's S3 ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    """moto's server for the module, throwaway credentials, AWS_ENDPOINT_URL pointing boto3 at it."""
    import boto3

    with moto_server(REGION) as url:
        boto3.client("s3", region_name=REGION, endpoint_url=url).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield url


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A root's shape with its file index: small files, and one past boto3's 8 MB multipart threshold (its parts go
    up from several threads, each calling the callback)."""
    from backend.neuron import root_store

    path = tmp_path_factory.mktemp("progress") / "root"
    files = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}',
             "compiled_models/fp32/unet.pt": os.urandom(9 * 1024 * 1024 + 123),
             "compiled_models/fp32/text_encoder.pt": os.urandom(1_500_000)}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    root_store.write_index(path)
    return path


def index_bytes(root: Path) -> int:
    from backend.neuron import root_store

    return sum(entry["size"] for entry in json.loads((root / root_store.INDEX_PATH).read_text())["files"].values())


def test_an_upload_and_a_download_report_every_byte(moto, root, tmp_path, caplog):
    from backend.neuron import root_store

    uri = f"s3://{BUCKET}/progress/root/"
    lines: list[str] = []
    root_store.upload(root, uri, echo=lines.append)
    closing = [line for line in lines if line.startswith(f"uploading {root} to {uri}: ") and "bytes (" in line]
    assert len(closing) == 1 and counted(closing[0]) == index_bytes(root), lines
    assert any("%)," in line and "left" in line for line in lines), lines  # lines while it went, in this log

    with caplog.at_level(logging.INFO, logger="backend.neuron.root_store"):
        root_store.fetch_s3(uri, tmp_path / "copy")
    messages = [record.getMessage() for record in caplog.records if record.name == "backend.neuron.root_store"]
    closing = [m for m in messages if m.startswith(f"downloading {uri}: ") and "bytes (" in m]
    assert len(closing) == 1 and counted(closing[0]) == index_bytes(root), messages
    assert any(m.startswith(f"downloading {uri}: ") and "%)," in m for m in messages), messages
    # The whole download's time, in the start-up log.
    files = len(json.loads((root / root_store.INDEX_PATH).read_text())["files"])
    assert any(re.match(rf"{re.escape(uri)}: downloaded and verified in \d+\.\d s: {files} files", m)
               for m in messages), messages

    # A second download of a changed root fetches only the changed file; what was in place is not counted.
    changed = root / "unet" / "config.json"
    changed.write_bytes(b'{"a": 2}')
    root_store.upload(root, uri, echo=lines.append)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backend.neuron.root_store"):
        root_store.fetch_s3(uri, tmp_path / "copy")
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"downloading {uri}: ")]
    assert counted(closing[-1]) == changed.stat().st_size and "were already in place" in closing[-1], closing


def test_deploys_upload_of_model_tar_reports_every_byte(moto, tmp_path):
    from compile_scripts import deploy

    archive = tmp_path / "model.tar.gz"
    assert deploy.package.main(["--out", str(archive), "--backend", "local", "--model", "tiny"]) == 0
    lines: list[str] = []
    deployer = deploy.Deployer(REGION, moto, out=lines.append)
    plan = deploy.Plan(name="sd21", role="arn:aws:iam::123456789012:role/SageMakerRole", bucket=BUCKET,
                       model_tar=archive)
    uri = deployer.upload(plan)
    closing = [line for line in lines if line.startswith("  model.tar.gz: ")]
    assert len(closing) == 1 and counted(closing[0]) == archive.stat().st_size, lines
    assert deployer.s3.head_object(Bucket=BUCKET, Key=uri.split("/", 3)[3])["ContentLength"] == archive.stat().st_size
