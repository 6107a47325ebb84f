"""Bring a compiled root from where it is published to a local folder, verified file by file.

`--artifacts` takes one of:

    ROOT                          a local folder, used as it is
    s3://BUCKET/PREFIX/           a root published with `compile.py --upload s3://BUCKET/PREFIX/`
    hf://OWNER/NAME[@REVISION]    a root in a Hugging Face Hub model repo (a branch, tag or commit)

A published root carries its file index, ROOT/compiled_models/files.json (compile.py writes it at the
end of every compile): each file's size and sha256, and per compiled dtype the target and the Neuron
SDK it was compiled under. A download reads that index first (one small GET), refuses a root compiled
under another Neuron SDK before any big file is fetched, then fetches each file into `<file>.partial`,
checks its size and sha256 and only then renames it into place. An interrupted download is resumed
where it stopped: finished files are checked and kept, and a `.partial` file continues with an S3
ranged GET (`Range: bytes=N-`). The folder counts as complete only once its marker (MARKER, holding the
index's sha256) is written, last; nothing else is loaded from the cache.

S3 roots go to --cache-dir (SD_CACHE_DIR, default ~/.cache/sd-inf2), one folder per URI. Hub roots stay
in the Hub's own cache (HF_HUB_CACHE; huggingface_hub's snapshot_download fetches them, HF_HUB_OFFLINE
is honoured) and are verified against the index the same way; a marker in --cache-dir/hub records which
snapshot was verified, so a restart does not hash gigabytes again.

Long transfers show their progress (backend/core/progress.py): an S3 download counts the chunks it writes,
an upload takes boto3's Callback; on a terminal as a tqdm bar, in a log (the app's, the endpoint's) as a line
every 30 s or 10%. Each download ends with one line saying how long the whole of it took (index, checks and
transfer), which is the start-up cost an endpoint pays. A Hub download shows huggingface_hub's own tqdm bars
(on a terminal only; HF_HUB_DISABLE_PROGRESS_BARS=1 hides them), and the same closing line.

boto3 and huggingface_hub are imported only when a remote root is asked for; AWS_ENDPOINT_URL points
boto3 elsewhere (a moto server in the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import stack
from ..core.errors import BackendUnavailable
from ..core.progress import TransferProgress, size_text
from .root_format import (
    BLOCK,
    CODE_DIR,
    INDEX_PATH,
    file_sha256,
    installed_versions,
    parse_index,
    root_files,
    write_index,
    write_json,
)

log = logging.getLogger(__name__)

MARKER = ".sd-root-complete"  # in a downloaded folder, written last: the folder is complete
DEFAULT_CACHE_DIR = "~/.cache/sd-inf2"
_HUB = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")


class ChecksumMismatch(BackendUnavailable):
    """A downloaded file is not the one the root's index names."""


# ---- where a root is -------------------------------------------------------------------------------


def is_remote(artifacts: str | None) -> bool:
    """True for an s3:// or hf:// --artifacts value."""
    return bool(artifacts) and str(artifacts).startswith(("s3://", "hf://"))


def resolve(artifacts: str, cache_dir: str | None = None) -> Path:
    """The local folder of a compiled root: the folder itself, or an s3:// or hf:// root fetched into the cache."""
    if artifacts.startswith("s3://"):
        return fetch_s3(artifacts, cache_folder(artifacts, cache_dir))
    if artifacts.startswith("hf://"):
        return fetch_hub(artifacts, cache_dir)
    return Path(artifacts).expanduser()


def fetch(uri: str, dest: Path, cache_dir: str | None = None) -> Path:
    """A remote root into `dest` (s3://), or its verified Hub snapshot (hf://); the endpoint's download at start."""
    if uri.startswith("s3://"):
        return fetch_s3(uri, dest)
    if uri.startswith("hf://"):
        return fetch_hub(uri, cache_dir)
    raise BackendUnavailable(f"{uri}: not a published root; use s3://BUCKET/PREFIX/ or hf://OWNER/NAME[@REVISION].")


def cache_dir_path(cache_dir: str | None) -> Path:
    """--cache-dir as a path (default ~/.cache/sd-inf2)."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()


def cache_folder(uri: str, cache_dir: str | None = None) -> Path:
    """The cache folder of an s3:// root: its last name, made unique by a hash of the whole URI."""
    bucket, prefix = split_s3_uri(uri)
    name = re.sub(r"[^\w.-]+", "-", prefix.rstrip("/").rsplit("/", 1)[-1] or bucket)
    key = hashlib.sha256(f"s3://{bucket}/{prefix}".encode()).hexdigest()[:12]
    return cache_dir_path(cache_dir) / "roots" / f"{name}-{key}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in '/', or '') of an s3:// folder URI."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise BackendUnavailable(f"{uri!r} is not an s3:// folder URI (s3://BUCKET/PREFIX/)")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of hf://OWNER/NAME[@REVISION]."""
    match = _HUB.fullmatch(uri.rstrip("/"))
    if not match:
        raise BackendUnavailable(f"{uri!r} is not a Hub root: use hf://OWNER/NAME or hf://OWNER/NAME@REVISION "
                                 f"(a branch, tag or commit).")
    return match.group(1), match.group(2)


def stack_problem(index: dict[str, Any], installed: dict[str, str | None] | None = None) -> str | None:
    """Why a root's Neuron parts cannot load under this project's Neuron SDK (or the installed one); None if they can.

    CPU parts run anywhere. Neuron parts load only under the SDK line that compiled them
    (docs/architecture.md, "the one stack"); a root from another SDK is refused before gigabytes move.
    """
    wanted = stack.supported_sdk_line()
    installed_sdk = stack.sdk_release(installed if installed is not None else installed_versions())
    for dtype, entry in sorted((index.get("compiled") or {}).items()):
        if not isinstance(entry, dict) or entry.get("target") != "neuron":
            continue
        release = entry.get("neuron_sdk")
        if release is None:  # not recorded (the walk-through's layout): the loader checks what it can
            continue
        if _same_line(release, wanted) or (installed_sdk and _same_line(release, installed_sdk)):
            continue
        here = f", this machine has Neuron SDK {installed_sdk}" if installed_sdk else ""
        return (f"its {dtype} parts were compiled under Neuron SDK {release} (neuronx-cc {entry.get('neuronx-cc')}); "
                f"this project serves Neuron SDK {stack.NEURON_SDK}{here}, and compiled parts load only under "
                f"the SDK line that compiled them. Recompile under {stack.describe()} and publish again "
                f"with compile.py --upload.")
    return None


def _same_line(release: str, line: str) -> bool:
    return release == line or release.startswith(line + ".") or line.startswith(release + ".")


def check_stack(index: dict[str, Any], where: str) -> None:
    """BackendUnavailable when the root was compiled under another Neuron SDK."""
    problem = stack_problem(index)
    if problem:
        raise BackendUnavailable(f"{where}: {problem}")


# ---- S3 ----------------------------------------------------------------------------------------------


def s3_client():
    """A boto3 S3 client (AWS_ENDPOINT_URL, AWS_REGION and the usual credentials apply)."""
    import boto3

    return boto3.client("s3")


def _s3_error(exc: Exception, uri: str, doing: str, needs: str) -> BackendUnavailable:
    """A botocore error as a message that names the URI and what to fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    bucket, prefix = split_s3_uri(uri)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return BackendUnavailable(f"{uri}: no AWS credentials to {doing}; run `aws configure` (or `aws sso login`), "
                                  f"set AWS_PROFILE, or give the instance a role with {needs}.")
    if isinstance(exc, EndpointConnectionError):
        return BackendUnavailable(f"{uri}: cannot reach S3 to {doing} ({exc}); check the network and AWS_REGION.")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return BackendUnavailable(f"{uri}: no bucket {bucket!r}; check the URI (and the account), or create it "
                                      f"with `aws s3 mb s3://{bucket}` and publish the root there.")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch") \
                or status == 403:
            return BackendUnavailable(f"{uri}: access denied to {doing} ({code}: {error.get('Message', '')}); these "
                                      f"credentials need {needs}.")
        return BackendUnavailable(f"{uri}: cannot {doing} ({code}: {error.get('Message', '')}).")
    return BackendUnavailable(f"{uri}: cannot {doing} ({type(exc).__name__}: {exc}); run again to resume.")


def _read_needs(bucket: str, prefix: str) -> str:
    return (f"s3:GetObject on arn:aws:s3:::{bucket}/{prefix}* (and s3:ListBucket on arn:aws:s3:::{bucket}, "
            f"so that a missing file is told apart from a forbidden one)")


def read_s3_index(uri: str, client=None) -> dict[str, Any]:
    """The index of an s3:// root (one small GET), checked; BackendUnavailable naming what to fix."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    key = prefix + INDEX_PATH
    try:
        raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise BackendUnavailable(_no_index_message(client, uri, bucket, prefix)) from None
        raise _s3_error(exc, uri, f"read s3://{bucket}/{key}", _read_needs(bucket, prefix)) from None
    except BotoCoreError as exc:
        raise _s3_error(exc, uri, f"read s3://{bucket}/{key}", _read_needs(bucket, prefix)) from None
    index = parse_index(raw, f"s3://{bucket}/{key}")
    index["_sha256"] = hashlib.sha256(raw).hexdigest()
    index["_raw"] = raw
    return index


def _no_index_message(client, uri: str, bucket: str, prefix: str) -> str:
    """Why there is no index: an empty prefix, or files uploaded without one."""
    publish = (f"publish a compiled root there with: python -m compile_scripts.compile --model MODEL --out ROOT "
               f"--upload s3://{bucket}/{prefix}")
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0)
    except Exception:  # noqa: BLE001 - only refines the message
        listed = 0
    if listed:
        return (f"{uri}: holds files but no {INDEX_PATH}, the file index a download verifies (files synced before "
                f"compile.py wrote one?); {publish} (it writes the index and uploads only what differs).")
    return f"{uri}: no compiled root there (nothing under that prefix); check the URI, or {publish}."


def fetch_s3(uri: str, dest: Path, client=None) -> Path:
    """Download an s3:// root into dest, verified against its index; resumes, and skips a complete folder."""
    from botocore.exceptions import BotoCoreError, ClientError

    started = time.perf_counter()  # the whole download, index and checks included: what a start waits for
    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    index = read_s3_index(uri, client)
    check_stack(index, uri)
    if _is_complete(dest, index["_sha256"]):
        log.info("%s: complete in %s", uri, dest)
        return dest
    files = index["files"]
    total = sum(entry["size"] for entry in files.values())
    with _locked(dest):
        if _is_complete(dest, index["_sha256"]):  # another process finished it while we waited
            return dest
        _check_space(dest, files, uri)
        (dest / MARKER).unlink(missing_ok=True)
        fetched = 0
        try:
            with TransferProgress(f"downloading {uri}", total, echo=log.info) as progress:
                for rel, entry in files.items():
                    fetched += _fetch_s3_file(client, bucket, prefix + rel, dest / rel, entry, uri, progress)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, uri, f"download {rel}", _read_needs(bucket, prefix)) from None
        except OSError as exc:
            raise BackendUnavailable(f"{uri}: cannot write {dest / rel} ({exc}); free space there or choose "
                                     f"another --cache-dir.") from None
        _finish(dest, index, uri)
    kept = f", {size_text(total - fetched)} already there" if fetched < total else ""
    log.info("%s: downloaded and verified in %.1f s: %d files, %s (%s fetched%s) in %s", uri,
             time.perf_counter() - started, len(files), size_text(total), size_text(fetched), kept, dest)
    return dest


def _fetch_s3_file(client, bucket: str, key: str, target: Path, entry: dict[str, Any], uri: str,
                   progress: TransferProgress) -> int:
    """One file into place, verified, its bytes counted by `progress`; returns the bytes fetched (0 when a verified
    copy was there)."""
    size, sha256 = entry["size"], entry["sha256"]
    if target.is_file():
        if target.stat().st_size == size and file_sha256(target) == sha256:
            progress.skip(size)
            return 0
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    digest = hashlib.sha256()
    if have:
        progress.skip(have)
        with open(partial, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                digest.update(block)
    if have < size:
        extra = {"Range": f"bytes={have}-"} if have else {}
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        with open(partial, "ab") as f:
            for chunk in body.iter_chunks(BLOCK):
                f.write(chunk)
                digest.update(chunk)
                progress(len(chunk))
    else:
        partial.touch()
    _verify_partial(partial, target, entry, digest.hexdigest(), f"s3://{bucket}/{key}", uri)
    return size - have


def _verify_partial(partial: Path, target: Path, entry: dict[str, Any], sha256: str, source: str, uri: str) -> None:
    """Rename a fully fetched file into place if its size and sum match the index; else delete it and say so."""
    size = partial.stat().st_size
    if size == entry["size"] and sha256 == entry["sha256"]:
        os.replace(partial, target)
        return
    partial.unlink()
    found = f"{size} bytes" if size != entry["size"] else f"sha256 {sha256[:16]}..."
    raise ChecksumMismatch(f"{uri}: {source} does not match the root's index ({found}, the index says {entry['size']} "
                           f"bytes, sha256 {entry['sha256'][:16]}...); the bad copy was deleted. Run again to fetch it "
                           f"again; if it still differs, the published files changed after their index was written: "
                           f"publish the root again with compile.py --upload.")


def _finish(dest: Path, index: dict[str, Any], uri: str) -> None:
    """Remove files the index does not list (left from an older root), write the index, then the marker, last."""
    listed = set(index["files"])
    for rel in list(root_files(dest)):
        if rel not in listed:
            (dest / rel).unlink()
    for stray in dest.rglob("*.partial"):
        stray.unlink()
    (dest / INDEX_PATH).parent.mkdir(parents=True, exist_ok=True)
    (dest / INDEX_PATH).write_bytes(index["_raw"])
    write_json(dest / MARKER, {"source": uri, "index_sha256": index["_sha256"]})


def _is_complete(dest: Path, index_sha256: str) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()).get("index_sha256") == index_sha256
    except (OSError, ValueError, AttributeError):
        return False


def _check_space(dest: Path, files: dict[str, Any], uri: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    needed = sum(entry["size"] for rel, entry in files.items() if not (dest / rel).is_file())
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise BackendUnavailable(f"{uri}: needs {needed / 1e9:.1f} GB in {dest}, {free / 1e9:.1f} GB are free; free "
                                 f"space or choose another --cache-dir (SD_CACHE_DIR).")


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One process at a time fills a cache folder (a second waits, then finds it complete)."""
    import fcntl  # POSIX only: imported where the lock is taken, so `import backend` works on Windows too

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upload_uri(text: str) -> str:
    """compile.py --upload's value: an s3:// folder URI (checked before hours of compiling)."""
    try:
        bucket, prefix = split_s3_uri(text)
    except BackendUnavailable as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"s3://{bucket}/{prefix}"


def publish(root: Path, uri: str | None = None, client=None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The end of a compile: write the root's file index, and with `uri` upload the root there; returns the index."""
    index = write_index(root)
    if uri:
        upload(root, uri, client, echo, index=index)
    return index


def upload(root: Path, uri: str, client=None, echo: Callable[[str], None] = print,
           index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish a local root to s3://BUCKET/PREFIX/: each file that differs is uploaded, the index last (a reader
    never finds an index whose files are not there yet); returns the index (written afresh unless given)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    index = index or write_index(root)
    needs = f"s3:PutObject on arn:aws:s3:::{bucket}/{prefix}* (s3:GetObject and s3:ListBucket to skip what is there)"
    sent = skipped = 0
    total = sum(entry["size"] for entry in index["files"].values())
    try:
        existing = listed_objects(client, bucket, prefix)
        with TransferProgress(f"uploading {root} to s3://{bucket}/{prefix}", total, echo=echo) as progress:
            for rel, entry in index["files"].items():
                key = prefix + rel
                same_size = existing.get(key) == entry["size"]
                if same_size and _remote_sha256(client, bucket, key) == entry["sha256"]:
                    skipped += 1
                    progress.skip(entry["size"])
                    continue
                # boto3 calls Callback with the bytes sent since its last call (boto3/s3/inject.py, upload_file).
                client.upload_file(str(root / rel), bucket, key, ExtraArgs={"Metadata": {"sha256": entry["sha256"]}},
                                   Callback=progress)
                sent += entry["size"]
        client.put_object(Bucket=bucket, Key=prefix + INDEX_PATH, Body=(root / INDEX_PATH).read_bytes(),
                          ContentType="application/json")
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(exc, uri, "publish the root", needs) from None
    stray = sorted(k for k in existing if k[len(prefix):] not in index["files"] and k != prefix + INDEX_PATH
                   and not k[len(prefix):].startswith(CODE_DIR + "/"))
    echo(f"published {root} to s3://{bucket}/{prefix}: {len(index['files'])} files, {sent / 1e6:.1f} MB sent, "
         f"{skipped} already there. Serve it with: python app.py --backend neuron --artifacts s3://{bucket}/{prefix}")
    if stray:
        echo(f"note: {len(stray)} other object(s) under the prefix are no part of this root (e.g. {stray[0]}); "
             f"downloads ignore them, but an uncompressed deploy would copy them: aws s3 rm them.")
    return index


def listed_objects(client, bucket: str, prefix: str) -> dict[str, int]:
    """{key: size} of the objects under a prefix."""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def _remote_sha256(client, bucket: str, key: str) -> str | None:
    return client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")


# ---- the Hugging Face Hub -------------------------------------------------------------------------


def fetch_hub(uri: str, cache_dir: str | None = None) -> Path:
    """The verified snapshot of a Hub root (in the Hub's cache): index first, then only the files it lists."""
    from huggingface_hub import hf_hub_download, snapshot_download

    started = time.perf_counter()
    repo_id, revision = parse_hub_uri(uri)
    try:
        index_path = Path(hf_hub_download(repo_id, INDEX_PATH, revision=revision))
    except Exception as exc:  # noqa: BLE001 - every Hub error becomes one message (classified below)
        raise _hub_error(exc, uri, f"read {INDEX_PATH}") from None
    raw = index_path.read_bytes()
    index = parse_index(raw, f"{uri}: {INDEX_PATH}")
    check_stack(index, uri)
    index_sha256 = hashlib.sha256(raw).hexdigest()
    total = sum(entry["size"] for entry in index["files"].values())
    log.info("%s: fetching %d files, %s, through huggingface_hub (its progress bars show on a terminal only)", uri,
             len(index["files"]), size_text(total))
    try:
        # huggingface_hub draws its own tqdm bars (files fetched, bytes downloaded) with tqdm's default of showing
        # them on a terminal only (huggingface_hub/utils/tqdm.py, _create_progress_bar); no log lines of its own.
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[INDEX_PATH, *index["files"]]))
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, uri, "download the root's files") from None
    marker = cache_dir_path(cache_dir) / "hub" / (re.sub(r"[^\w.-]+", "-", uri.removeprefix("hf://")) + ".json")
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded == {"snapshot": str(snapshot), "index_sha256": index_sha256}:
        log.info("%s: fetched in %.1f s (verified before) in %s", uri, time.perf_counter() - started, snapshot)
        return snapshot
    for rel, entry in index["files"].items():
        _verify_hub_file(snapshot / rel, rel, entry, uri)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"snapshot": str(snapshot), "index_sha256": index_sha256})
    log.info("%s: downloaded and verified in %.1f s: %d files, %s in %s", uri, time.perf_counter() - started,
             len(index["files"]), size_text(total), snapshot)
    return snapshot


def _verify_hub_file(path: Path, rel: str, entry: dict[str, Any], uri: str) -> None:
    """A snapshot file against the index; a bad one is removed from the Hub's cache (link and blob) so a rerun
    fetches it again."""
    if not path.is_file():
        raise BackendUnavailable(f"{uri}: {rel} is listed in the root's index but not in the repo's snapshot "
                                 f"({path}); upload the whole root folder to the repo (hf upload OWNER/NAME ROOT .).")
    size = path.stat().st_size
    sha256 = file_sha256(path) if size == entry["size"] else None
    if sha256 == entry["sha256"]:
        return
    blob = path.resolve()
    path.unlink()
    if blob != path:
        blob.unlink(missing_ok=True)
    found = f"sha256 {sha256[:16]}..." if sha256 else f"{size} bytes"
    raise ChecksumMismatch(f"{uri}: {rel} does not match the root's index ({found}, the index says {entry['size']} "
                           f"bytes, sha256 {entry['sha256'][:16]}...); the bad copy was removed from the Hub cache. "
                           f"Run again (without HF_HUB_OFFLINE) to fetch it again; if it still differs, the repo's "
                           f"files changed after their index was written: upload the root folder again.")


def _hub_error(exc: Exception, uri: str, doing: str) -> BackendUnavailable:
    """A huggingface_hub error as a message naming the repo and what to do."""
    from huggingface_hub import errors

    if isinstance(exc, errors.RevisionNotFoundError):
        return BackendUnavailable(f"{uri}: no such revision; name a branch, tag or commit of the repo after '@'.")
    if isinstance(exc, errors.GatedRepoError):
        return BackendUnavailable(f"{uri}: the repo is gated; accept its terms on the Hub and log in (hf auth login).")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return BackendUnavailable(f"{uri}: no such repo, or it is private and these credentials cannot read it; check "
                                  f"the name, or log in with a token that can (hf auth login, or HF_TOKEN).")
    if isinstance(exc, errors.LocalEntryNotFoundError):  # before EntryNotFoundError, its base
        return BackendUnavailable(f"{uri}: cannot {doing}: not (or not all) in the Hub cache, and the Hub cannot be "
                                  f"reached or HF_HUB_OFFLINE=1 is set; fetch it once with network access.")
    if isinstance(exc, errors.EntryNotFoundError):
        return BackendUnavailable(f"{uri}: no {INDEX_PATH} in the repo, so it is no published root; upload a root "
                                  f"compiled by this version's compile.py (it writes the index): hf upload OWNER/NAME "
                                  f"ROOT .")
    return BackendUnavailable(f"{uri}: cannot {doing} ({type(exc).__name__}: {exc}).")
