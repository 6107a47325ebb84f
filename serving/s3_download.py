"""Copy an s3:// folder to the endpoint's disk: the compiled root of `package.py --model-s3-uri`.

A compiled root is several GB of weights that barely compress; uploaded once with `aws s3 sync`,
it is fetched here when the endpoint starts instead of riding in model.tar.gz. The endpoint's
role needs s3:ListBucket on the bucket and s3:GetObject under the prefix. boto3 comes with AWS's
container image; AWS_ENDPOINT_URL points it elsewhere (a moto server in the tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from backend import BackendUnavailable

log = logging.getLogger("serving.s3_download")


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in '/') of an s3:// folder URI."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"{uri!r} is not an s3:// folder URI (s3://BUCKET/PREFIX/)")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def download_prefix(uri: str, dest: Path, client=None) -> Path:
    """Download every object under uri into dest, skipping files already there at the same size."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_uri(uri)
    if client is None:
        import boto3

        client = boto3.client("s3")
    count = size = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if not relative or relative.endswith("/"):
                    continue  # the folder's own marker object
                target = dest / relative
                if ".." in Path(relative).parts:
                    raise BackendUnavailable(f"{uri}: object key {item['Key']!r} leaves the folder; refusing it.")
                count, size = count + 1, size + item["Size"]
                if target.is_file() and target.stat().st_size == item["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                client.download_file(bucket, item["Key"], str(partial))
                os.replace(partial, target)
    except (BotoCoreError, ClientError) as exc:
        raise BackendUnavailable(f"cannot download the compiled root from {uri} ({type(exc).__name__}: {exc}); "
                                 f"give the endpoint's role s3:ListBucket on the bucket and s3:GetObject under "
                                 f"the prefix, in the endpoint's region.") from None
    except OSError as exc:
        raise BackendUnavailable(f"cannot write the compiled root from {uri} to {dest} ({exc}).") from None
    if count == 0:
        raise BackendUnavailable(f"{uri} holds no files; upload the compiled root there first "
                                 f"(aws s3 sync ROOT {uri}).")
    log.info("%s: %d files, %.1f MB in %s", uri, count, size / 1e6, dest)
    return dest
