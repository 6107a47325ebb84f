"""Build model.tar.gz, the archive a DJL-Serving endpoint loads.

    python -m compile_scripts.package --out model.tar.gz --artifacts sd2_512_root
    python -m compile_scripts.package --out model.tar.gz --model-s3-uri s3://BUCKET/sd2_512_root/
    python -m compile_scripts.package --out model.tar.gz --backend local --model tiny   # no accelerator

Inside, at the top (DJL's layout for its Python engine):
  serving.properties   engine=Python, option.entryPoint=model.py, timeouts, workers, sd_* options
  model.py             serving/model.py, DJL's entry point
  requirements.txt     what DJL pip-installs before loading (never torch: the image has its build)
  backend/, serving/   this project's code, which model.py imports
  <root name>/         the compiled root, with --artifacts (its own folder name, which the app shows)

The same inputs give the same bytes: entries sorted, mtime fixed (SOURCE_DATE_EPOCH, else 0),
owner 0:0 without names, no absolute paths, symlinks stored as the files they point to, and a
gzip header without name or time. A compiled root is several GB of weights that barely
compress; uploading it once with `aws s3 sync` and passing --model-s3-uri keeps the archive small.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
# Packages the endpoint needs beyond the DJL image; torch, torch-neuronx and numpy come with the
# image, built for its Neuron SDK, and must not be replaced.
ENDPOINT_PACKAGES = ("diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface_hub")
CODE = ("backend", "serving")
SERVING_FILES = ("__init__.py", "handler.py", "model.py")  # not server.py: DJL is the server there
RESERVED = {*CODE, "serving.properties", "model.py", "requirements.txt"}
DEFAULT_LOADING_TIMEOUT_S = 1800  # loading compiled Neuron graphs onto the device takes minutes
DEFAULT_PREDICT_TIMEOUT_S = 60  # SageMaker's own limit on a real-time invocation
DEFAULT_PNG_LEVEL = 1  # answers cross the internet from an endpoint; see serving/handler.py


def serving_properties(backend: str, artifacts: str | None, model_s3_uri: str | None, model: str | None,
                       workers: int, loading_timeout: int, predict_timeout: int, png_level: int) -> str:
    """The serving.properties text."""
    lines = [
        "# Built by compile_scripts/package.py.",
        "engine=Python",
        "option.entryPoint=model.py",
        f"option.model_loading_timeout={loading_timeout}",
        f"option.predict_timeout={predict_timeout}",
        # One worker owns the device; requests queue in DJL and then in serving/handler.py.
        f"minWorkers={workers}",
        f"maxWorkers={workers}",
        f"option.sd_backend={backend}",
        f"option.sd_png_level={png_level}",
    ]
    if artifacts:
        lines.append(f"option.sd_artifacts={artifacts}")
    if model_s3_uri:
        lines.append(f"option.model_id={model_s3_uri}")
    if model:
        lines.append(f"option.sd_model={model}")
    return "\n".join(lines) + "\n"


def endpoint_requirements(source: Path = ROOT / "requirements.txt") -> str:
    """The pins of ENDPOINT_PACKAGES from the project's requirements.txt."""
    wanted = {_normalize(p) for p in ENDPOINT_PACKAGES}
    kept = []
    for line in source.read_text().splitlines():
        name = re.split(r"[\s<>=!~\[;]", line.strip(), maxsplit=1)[0]
        if name and not line.lstrip().startswith("#") and _normalize(name) in wanted:
            kept.append(line.strip())
    header = "# Installed by DJL-Serving before model.py loads; torch and torch-neuronx come with the image.\n"
    return header + "\n".join(kept) + "\n"


def artifacts_name(artifacts: Path) -> str:
    """The compiled root's folder name, which it keeps inside the archive."""
    return artifacts.resolve().name


def members(artifacts: Path | None, properties: str, requirements: str) -> Iterator[tuple[str, Path | bytes]]:
    """(archive name, file path or bytes) for every entry, unsorted."""
    yield "serving.properties", properties.encode()
    yield "requirements.txt", requirements.encode()
    yield "model.py", ROOT / "serving" / "model.py"
    for path in sorted((ROOT / "backend").glob("*.py")):
        yield f"backend/{path.name}", path
    for name in SERVING_FILES:
        yield f"serving/{name}", ROOT / "serving" / name
    if artifacts is not None:
        for path in _walk(artifacts):
            yield f"{artifacts_name(artifacts)}/{path.relative_to(artifacts).as_posix()}", path


def build(out: Path, entries: Iterator[tuple[str, Path | bytes]], mtime: int = 0, compress_level: int = 6) -> str:
    """Write the archive reproducibly; returns its sha256."""
    ordered = sorted(entries, key=lambda e: e[0])
    names = [name for name, _ in ordered]
    if len(set(names)) != len(names):
        raise ValueError("duplicate archive entries")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as raw:
        # filename="" and mtime: the gzip header otherwise records both, and the bytes would differ.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=compress_level) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, source in ordered:
                    info = tarfile.TarInfo(name)
                    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = mtime, 0o644, 0, 0, "", ""
                    if isinstance(source, bytes):
                        info.size = len(source)
                        tar.addfile(info, io.BytesIO(source))
                    else:
                        info.size = source.stat().st_size  # stat follows a symlink to its file
                        with open(source, "rb") as f:
                            tar.addfile(info, f)
    os.replace(partial, out)
    return file_sha256(out)


def _walk(root: Path) -> Iterator[Path]:
    """Every file under root, following symlinks (Hub caches are made of them) but never in a loop."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
        for name in sorted(files):
            path = Path(folder) / name
            if name.endswith((".pyc", ".partial")) or not path.is_file():
                continue
            yield path


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (also what deploy.py records for the archive it uploads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the archive, print its path, size and sha256."""
    parser = argparse.ArgumentParser(prog="python -m compile_scripts.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="archive to write, e.g. model.tar.gz")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--artifacts", type=Path, help="compiled root to put inside the archive, under its own name")
    where.add_argument("--model-s3-uri", help="s3:// folder holding the compiled root, which DJL downloads at "
                                              "start (option.model_id); keeps the archive small")
    parser.add_argument("--backend", choices=("neuron", "local"), default="neuron",
                        help="what the endpoint runs: neuron (inf2, default) or local (diffusers on the "
                             "instance's GPU or CPU)")
    parser.add_argument("--model", help="local backend: diffusers folder inside the archive, Hub id or 'tiny'")
    parser.add_argument("--workers", type=int, default=1, help="DJL workers (default 1: one owns the device)")
    parser.add_argument("--loading-timeout", type=int, default=DEFAULT_LOADING_TIMEOUT_S,
                        help=f"seconds DJL allows for loading the model (default {DEFAULT_LOADING_TIMEOUT_S})")
    parser.add_argument("--predict-timeout", type=int, default=DEFAULT_PREDICT_TIMEOUT_S,
                        help=f"seconds DJL allows one request (default {DEFAULT_PREDICT_TIMEOUT_S}, SageMaker's limit)")
    parser.add_argument("--png-level", type=int, default=DEFAULT_PNG_LEVEL, choices=range(10), metavar="0-9",
                        help=f"zlib level of the PNGs the endpoint answers (default {DEFAULT_PNG_LEVEL}: ~30 ms more "
                             f"per 512x512 image than 0, ~40%% smaller for real images, which wins across the internet)")
    parser.add_argument("--requirements", type=Path,
                        help="requirements.txt for the endpoint instead of the pins taken from this project's")
    parser.add_argument("--compress-level", type=int, default=6, choices=range(10), metavar="0-9",
                        help="gzip level (default 6; 1 is much faster for GBs of weights)")
    args = parser.parse_args(argv)
    if args.model_s3_uri and not args.model_s3_uri.startswith("s3://"):
        parser.error("--model-s3-uri must start with s3://")
    if args.artifacts is not None and not (args.artifacts / "model_index.json").is_file():
        parser.error(f"--artifacts {args.artifacts}: no model_index.json there; pass the compiled root "
                     f"(the diffusers folder that holds compiled_models/)")
    if args.backend == "neuron" and args.artifacts is None and not args.model_s3_uri:
        parser.error("--backend neuron needs the compiled root: --artifacts ROOT or --model-s3-uri s3://...")
    if args.artifacts is not None and args.out.resolve().is_relative_to(args.artifacts.resolve()):
        parser.error("--out must not be inside --artifacts")
    if args.artifacts is not None and artifacts_name(args.artifacts) in RESERVED:
        parser.error(f"--artifacts {args.artifacts}: the folder's name {artifacts_name(args.artifacts)!r} is taken by "
                     f"the archive's own files; rename the folder")
    properties = serving_properties(args.backend, artifacts_name(args.artifacts) if args.artifacts else None,
                                    args.model_s3_uri, args.model,
                                    args.workers, args.loading_timeout, args.predict_timeout, args.png_level)
    requirements = args.requirements.read_text() if args.requirements else endpoint_requirements()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    digest = build(args.out, members(args.artifacts, properties, requirements), mtime, args.compress_level)
    size = args.out.stat().st_size
    print(f"{args.out}  {size / 1e6:.1f} MB  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
