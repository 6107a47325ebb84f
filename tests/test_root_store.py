"""Compiled roots that travel (backend/neuron/root_store.py): published with `compile.py --upload` to moto's S3
server (standing in for S3), downloaded into a cache, verified against the root's file index, resumed,
refused with a clear message; served by the neuron backend and by serving/server.py from s3://; and a
Hub root read from a pre-filled Hub cache, offline.

Real: the compile script (--target cpu, the tiny model), boto3 against moto's server (its IAM check too,
for access denied), huggingface_hub's own functions on a cache laid out as it lays one out. Stand-ins,
and each says so where it is used: a connection dropped mid-file (a wrapper around the real client),
and the Hub itself, which cannot be reached here (so its download path runs from the cache only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.request
from pathlib import Path

import neuron_helpers
import pytest

from backend import BackendUnavailable, GenerationRequest, Settings, create_backend
from backend.neuron import root_store
from backend.neuron.root_format import read_root
from helpers import free_port, moto_server, run_process

REGION = "us-east-2"
BUCKET = "roots"
SIZE = neuron_helpers.SMALL_SIZE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    """moto's server for the module, with throwaway credentials and AWS_ENDPOINT_URL pointing boto3 at it."""
    with moto_server(REGION) as url:
        yield url


@pytest.fixture(scope="module")
def s3(moto):
    import boto3

    client = boto3.client("s3", region_name=REGION, endpoint_url=moto)
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    return client


@pytest.fixture(scope="module")
def published(s3, small_root, tmp_path_factory):
    """The tiny model compiled for the CPU (fp32, SIZE x SIZE) and published by `compile.py --upload`: (root, uri).

    The run's small root, compiled again with the same arguments and --upload: every part is up to date, so
    compile.py only writes the index and publishes."""
    from compile_scripts.compile import main as compile_main

    root = neuron_helpers.copy_root(small_root, tmp_path_factory.mktemp("published") / "tiny_root")
    uri = f"s3://{BUCKET}/teams/tiny_root/"
    assert compile_main([*neuron_helpers.small_root_args(root), "--upload", uri]) == 0
    return root, uri


class Counting:
    """The real S3 client, recording each GetObject (key and Range) that goes through it."""

    def __init__(self, client):
        self.client = client
        self.gets: list[tuple[str, str | None]] = []

    def get_object(self, **kwargs):
        self.gets.append((kwargs["Key"], kwargs.get("Range")))
        return self.client.get_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


class DroppedBody:
    """Stands in for a connection dropped mid-file: the real body's first `keep` bytes, then botocore's error."""

    def __init__(self, body, keep: int):
        self.body, self.keep = body, keep

    def iter_chunks(self, size):
        from botocore.exceptions import ResponseStreamingError

        data = self.body.read(self.keep)
        yield data
        raise ResponseStreamingError(error="Connection broken: IncompleteRead")


def copy_prefix(s3, source: str, dest: str) -> None:
    """Copy every object of one prefix to another (a second published root to break)."""
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=source)["Contents"]:
        s3.copy_object(Bucket=BUCKET, Key=dest + item["Key"][len(source):],
                       CopySource={"Bucket": BUCKET, "Key": item["Key"]}, MetadataDirective="COPY")


def files_before(root: Path, rel: str) -> list[str]:
    """The files a download fetches before `rel` (it goes in the index's order)."""
    files = list(json.loads((root / root_store.INDEX_PATH).read_text())["files"])
    assert files.index(rel) > 0
    return files[:files.index(rel)]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- publishing ----------------------------------------------------------------------------------


def test_compile_writes_the_index_and_upload_publishes_the_root_with_it(published, s3):
    root, uri = published
    index = json.loads((root / root_store.INDEX_PATH).read_text())
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {root_store.INDEX_PATH}
    assert set(index["files"]) == files
    for rel, entry in index["files"].items():
        data = (root / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert index["compiled"] == {"fp32": {"target": "cpu", "neuron_sdk": None, "torch-neuronx": None,
                                          "neuronx-cc": None}}
    listed = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="teams/tiny_root/")["Contents"]}
    assert listed == {f"teams/tiny_root/{rel}" for rel in [*files, root_store.INDEX_PATH]}
    head = s3.head_object(Bucket=BUCKET, Key=f"teams/tiny_root/compiled_models/fp32/{SIZE}x{SIZE}/unet.pt")
    assert head["Metadata"]["sha256"] == index["files"][f"compiled_models/fp32/{SIZE}x{SIZE}/unet.pt"]["sha256"]

    # Publishing again sends nothing that is already there (the sums are compared, not only the sizes).
    messages = []
    root_store.upload(root, uri, echo=messages.append)
    published, = [line for line in messages if line.startswith("published ")]
    assert f"0.0 MB sent, {len(files)} already there" in published
    # The transfer's closing line (backend/core/progress.py): nothing moved, everything was in place.
    assert any(line.startswith(f"uploading {root} to {uri}: 0 bytes (0 bytes) in ") and line.endswith(
        "were already in place") for line in messages), messages


# ---- the app's neuron backend from s3:// ---------------------------------------------------------


def test_the_neuron_backend_serves_an_s3_root_downloaded_once(published, s3, tmp_path):
    root, uri = published
    settings = Settings.from_args(["--backend", "neuron", "--artifacts", uri, "--cache-dir", str(tmp_path)], env={},
                                  server_flags=False)
    backend = create_backend(settings)
    try:
        result = backend.generate(GenerationRequest(prompt="a lovely cat", steps=2, seed=1, precision="fp32")
                                  .validated(backend.capabilities()))
    finally:
        backend.close()
    assert result.images[0].size == (SIZE, SIZE)
    cached = root_store.cache_folder(uri, str(tmp_path))
    assert backend.root == cached and cached.is_relative_to(tmp_path / "roots")
    assert {k: v for k, v in tree(cached).items() if k != root_store.MARKER} == tree(root)

    # Complete: the next start reads the index only.
    counting = Counting(s3)
    assert root_store.fetch_s3(uri, cached, client=counting) == cached
    assert counting.gets == [("teams/tiny_root/compiled_models/files.json", None)]


def test_an_interrupted_download_resumes_with_a_ranged_get(published, s3, tmp_path):
    root, uri = published
    dest = tmp_path / "root"
    unet = f"compiled_models/fp32/{SIZE}x{SIZE}/unet.pt"
    keep = 1000

    class Dropping(Counting):
        def get_object(self, **kwargs):
            answer = super().get_object(**kwargs)
            if kwargs["Key"].endswith(unet):
                answer["Body"] = DroppedBody(answer["Body"], keep)
            return answer

    with pytest.raises(BackendUnavailable, match=f"cannot download {unet}.*run again to resume"):
        root_store.fetch_s3(uri, dest, client=Dropping(s3))
    partial = dest / (unet + ".partial")
    assert partial.stat().st_size == keep and not (dest / unet).exists()
    assert not (dest / root_store.MARKER).exists()

    counting = Counting(s3)
    root_store.fetch_s3(uri, dest, client=counting)
    fetched = dict(counting.gets)
    assert fetched[f"teams/tiny_root/{unet}"] == f"bytes={keep}-"
    # Files finished before the drop were checked and kept, not fetched again.
    assert not any(f"teams/tiny_root/{rel}" in fetched for rel in files_before(root, unet))
    assert (dest / unet).read_bytes() == (root / unet).read_bytes()
    assert not list(dest.rglob("*.partial")) and (dest / root_store.MARKER).is_file()


def test_a_checksum_mismatch_deletes_the_bad_file_and_names_it(published, s3, tmp_path):
    root, uri = published
    copy_prefix(s3, "teams/tiny_root/", "teams/tampered/")
    bad = f"compiled_models/fp32/{SIZE}x{SIZE}/vae_decoder.pt"
    good = (root / bad).read_bytes()
    s3.put_object(Bucket=BUCKET, Key=f"teams/tampered/{bad}", Body=bytes(len(good)))  # same size, other bytes
    dest = tmp_path / "root"
    with pytest.raises(root_store.ChecksumMismatch,
                       match=f"s3://{BUCKET}/teams/tampered/{bad} does not match the root's index.*bad copy was "
                             f"deleted. Run again"):
        root_store.fetch_s3(f"s3://{BUCKET}/teams/tampered/", dest, client=s3)
    assert not (dest / bad).exists() and not list(dest.rglob("*.partial"))
    assert not (dest / root_store.MARKER).exists()

    s3.put_object(Bucket=BUCKET, Key=f"teams/tampered/{bad}", Body=good)  # fixed at the source: the rerun completes
    counting = Counting(s3)
    root_store.fetch_s3(f"s3://{BUCKET}/teams/tampered/", dest, client=counting)
    fetched = [key for key, _ in counting.gets]
    assert f"teams/tampered/{bad}" in fetched
    assert not any(f"teams/tampered/{rel}" in fetched for rel in files_before(root, bad))
    assert tree(dest)[bad] == good


def test_missing_places_get_messages_that_say_what_to_fix_and_leave_no_folder(published, s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="synced/old_root/model_index.json", Body=b"{}")  # `aws s3 sync`, no index
    cases = {
        f"s3://{BUCKET}/nothing/here/": "no compiled root there \\(nothing under that prefix\\).*--upload "
                                       f"s3://{BUCKET}/nothing/here/",
        "s3://no-such-bucket/root/": "no bucket 'no-such-bucket'; check the URI",
        f"s3://{BUCKET}/synced/old_root": "holds files but no compiled_models/files.json.*compile_scripts.compile",
    }
    for uri, message in cases.items():
        with pytest.raises(BackendUnavailable, match=message):
            root_store.resolve(uri, str(tmp_path))
    assert not (tmp_path / "roots").exists()


def test_access_denied_names_the_permissions_needed(published, s3, moto, tmp_path):
    import boto3

    # moto checks IAM policies once told to (its reset-auth call); this user may list but not read.
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto)
    iam.create_user(UserName="lister")
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    iam.put_user_policy(UserName="lister", PolicyName="list-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}"}]}))
    lister = boto3.client("s3", region_name=REGION, endpoint_url=moto, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])

    def set_auth(count: str) -> None:
        urllib.request.urlopen(urllib.request.Request(moto + "/moto-api/reset-auth", data=count.encode(),
                                                      method="POST", headers={"Content-Type": "text/plain"}))

    set_auth("0")
    try:
        with pytest.raises(BackendUnavailable, match=f"access denied to read s3://{BUCKET}/teams/tiny_root/compiled_"
                                                     f"models/files.json.*need s3:GetObject on arn:aws:s3:::{BUCKET}/"
                                                     f"teams/tiny_root/\\*"):
            root_store.fetch_s3(published[1], tmp_path / "root", client=lister)
    finally:
        set_auth("inf")
    assert not (tmp_path / "root").exists()


def test_a_root_from_another_neuron_sdk_is_refused_before_any_big_file(published, s3, tmp_path):
    root, uri = published
    copy_prefix(s3, "teams/tiny_root/", "teams/old_sdk/")
    index = json.loads((root / root_store.INDEX_PATH).read_text())
    index["compiled"] = {"bf16": {"target": "neuron", "neuron_sdk": "2.29.0", "torch-neuronx": "2.8.0.2.10.16998",
                                  "neuronx-cc": "2.24.5133.0"}}
    s3.put_object(Bucket=BUCKET, Key=f"teams/old_sdk/{root_store.INDEX_PATH}", Body=json.dumps(index).encode())
    counting = Counting(s3)
    with pytest.raises(BackendUnavailable, match="bf16 parts were compiled under Neuron SDK 2.29.0 .*serves Neuron SDK "
                                                 "2.31.1.*publish again"):
        root_store.fetch_s3(f"s3://{BUCKET}/teams/old_sdk/", tmp_path / "root", client=counting)
    assert counting.gets == [(f"teams/old_sdk/{root_store.INDEX_PATH}", None)]
    assert not (tmp_path / "root").exists()
    # The supported SDK, or the one this machine has, is fine; CPU parts run anywhere.
    index["compiled"]["bf16"]["neuron_sdk"] = "2.31"
    assert root_store.stack_problem(index, installed={}) is None
    index["compiled"]["bf16"]["neuron_sdk"] = "2.29.0"
    assert root_store.stack_problem(index, installed={"neuronx-cc": "2.24.5133.0+abc"}) is None


def test_doctor_checks_a_published_root_and_names_a_missing_one(published, tmp_path, monkeypatch, capsys):
    from compile_scripts import doctor

    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path))
    assert doctor.main(["--artifacts", published[1], "--no-smoke"]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    assert doctor.main(["--artifacts", f"s3://{BUCKET}/nothing/", "--no-smoke"]) == 1
    assert f"[ERROR  ] s3://{BUCKET}/nothing/: no compiled root there" in capsys.readouterr().out


def test_a_local_path_is_used_as_it_is_and_bad_uris_are_named(tmp_path):
    assert root_store.resolve("~/some/root") == Path("~/some/root").expanduser()
    assert root_store.resolve("team/root") == Path("team/root")  # a bare owner/name is a folder, never the Hub
    with pytest.raises(BackendUnavailable, match="not an s3:// folder URI"):
        root_store.resolve("s3:///prefix/")
    with pytest.raises(BackendUnavailable, match="hf://OWNER/NAME or hf://OWNER/NAME@REVISION"):
        root_store.resolve("hf://just-a-name")


# ---- the endpoint from s3:// ---------------------------------------------------------------------


def test_the_local_endpoint_serves_an_s3_root_named_by_sd_artifacts(published, moto, tmp_path):
    _, uri = published
    port = free_port()
    env = {"SD_BACKEND": "neuron", "SD_ARTIFACTS": uri, "SD_CACHE_DIR": str(tmp_path / "cache")}
    with run_process(["-m", "serving.server", "--port", str(port)], f"http://127.0.0.1:{port}/ping", env=env,
                     log_path=tmp_path / "server.log"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"prompt": "a lovely cat", "parameters": {
                                             "num_inference_steps": 2, "precision": "fp32"}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200 and answer.read().startswith(PNG_MAGIC)
    assert (root_store.cache_folder(uri, str(tmp_path / "cache")) / root_store.MARKER).is_file()


# ---- the Hub, offline, from a pre-filled cache --------------------------------------------------


def fill_hub_cache(cache: Path, repo_id: str, root: Path, commit: str = "a" * 40) -> Path:
    """The Hub cache as huggingface_hub lays it out (file_download.py): blobs named by their hash, the snapshot's
    files as relative links to them, refs/main naming the commit; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline (huggingface_hub reads both settings from its constants at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_root_is_verified_from_the_hub_cache(published, hub_cache, tmp_path, caplog):
    root, _ = published
    snapshot = fill_hub_cache(hub_cache, "team/sd-tiny-root", root)
    with caplog.at_level(logging.INFO, logger="backend.neuron.root_store"):
        for uri in ("hf://team/sd-tiny-root", "hf://team/sd-tiny-root@main"):
            assert root_store.resolve(uri, str(tmp_path / "cache")) == snapshot
    # How long the whole of it took, in the start-up log (huggingface_hub's own bars show on a terminal only).
    files = len(json.loads((root / root_store.INDEX_PATH).read_text())["files"])
    assert re.search(rf"hf://team/sd-tiny-root: downloaded and verified in \d+\.\d s: {files} files, ",
                     caplog.text), caplog.text
    marker = tmp_path / "cache" / "hub" / "team-sd-tiny-root-main.json"
    assert json.loads(marker.read_text())["snapshot"] == str(snapshot)
    assert [s.dtype for s in read_root(snapshot)] == ["fp32"]

    with pytest.raises(BackendUnavailable, match="hf://team/other: cannot read compiled_models/files.json: not .* "
                                                 "in the Hub cache"):
        root_store.resolve("hf://team/other", str(tmp_path / "cache"))


def test_a_bad_file_in_the_hub_cache_is_removed_and_named(published, hub_cache, tmp_path):
    root, _ = published
    snapshot = fill_hub_cache(hub_cache, "team/sd-tiny-root", root)
    bad = snapshot / "compiled_models" / "fp32" / "text_encoder.pt"
    blob = bad.resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    with pytest.raises(root_store.ChecksumMismatch, match="compiled_models/fp32/text_encoder.pt does not match the "
                                                          "root's index.*removed from the Hub cache"):
        root_store.resolve("hf://team/sd-tiny-root", str(tmp_path / "cache"))
    assert not bad.exists() and not blob.exists()
    assert not (tmp_path / "cache" / "hub").exists()
