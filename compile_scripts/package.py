"""Build model.tar.gz for AWS's PyTorch Neuron inference container (SageMaker inference toolkit + TorchServe).

    python -m compile_scripts.package --out model.tar.gz --artifacts sd2_512_root
    python -m compile_scripts.package --out model.tar.gz --model-s3-uri s3://BUCKET/sd2_512_root/
    python -m compile_scripts.package --out model.tar.gz --backend local --model tiny   # no accelerator

SageMaker unpacks the archive into /opt/ml/model; the toolkit (sagemaker-pytorch-inference) looks
in its code/ folder (sagemaker_inference/environment.py: code_dir). Inside:
  code/inference.py       serving/inference.py: model_fn, input_fn, predict_fn, output_fn
  code/requirements.txt   what the toolkit pip-installs before TorchServe starts: the packages the
                          image lacks, never torch, torch-neuronx, neuronx-cc or numpy (the image's
                          are built for its Neuron SDK)
  code/endpoint.json      what this package chose: backend, compiled root, model, PNG level
  code/backend/, code/serving/   this project's code, which inference.py imports
  <root name>/            the compiled root, with --artifacts (its own folder name, which the app shows)

How many workers TorchServe runs and how many requests it queues are the container's environment,
which compile_scripts/deploy.py sets on the SageMaker model.

The same inputs give the same bytes: entries sorted, mtime fixed (SOURCE_DATE_EPOCH, else 0),
owner 0:0 without names, no absolute paths, symlinks stored as the files they point to, and a
gzip header without name or time. A compiled root is several GB of weights that barely
compress; publishing it once with `compile.py --upload s3://...` and passing --model-s3-uri keeps the
archive small (the endpoint downloads it at start, verified: backend/neuron/root_store.py), and deploy.py
--model-data serves it as uncompressed model data with no archive at all.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python compile_scripts/package.py`: make the repo root importable
    sys.path.insert(0, str(ROOT))

# The one owner of the code folder's name and the file digest (light: imports no torch).
from backend.neuron.root_format import CODE_DIR, file_sha256  # noqa: E402 - after the path fix above

# Packages the endpoint needs beyond AWS's image, pinned as in requirements.txt.
ENDPOINT_PACKAGES = ("diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface_hub")
# The image carries these built for its Neuron SDK; a pip install of another build breaks the device code.
IMAGE_PACKAGES = ("torch", "torch-neuronx", "neuronx-cc", "numpy")
CODE = ("backend", "serving")
# Not server.py (TorchServe is the server there), nor inference.py (it is code/inference.py itself).
SERVING_FILES = ("__init__.py", "handler.py")
RESERVED = {CODE_DIR}
DEFAULT_PNG_LEVEL = 1  # answers cross the internet from an endpoint; see serving/handler.py


def endpoint_config(backend: str, artifacts: str | None, model_s3_uri: str | None, model: str | None,
                    png_level: int) -> dict[str, Any]:
    """code/endpoint.json: what serving/inference.py's model_fn loads."""
    config: dict[str, Any] = {"backend": backend, "png_level": png_level}
    for key, value in (("artifacts", artifacts), ("model_s3_uri", model_s3_uri), ("model", model)):
        if value:
            config[key] = value
    return config


def endpoint_requirements(source: Path = ROOT / "requirements.txt") -> str:
    """The pins of ENDPOINT_PACKAGES from the project's requirements.txt."""
    wanted = {_normalize(p) for p in ENDPOINT_PACKAGES}
    kept = [line for name, line in _requirements(source.read_text()) if name in wanted]
    header = ("# Installed by the SageMaker inference toolkit before TorchServe starts. torch, torch-neuronx,\n"
              "# neuronx-cc and numpy come with the image, built for its Neuron SDK: never list them here.\n")
    return header + "\n".join(kept) + "\n"


def check_requirements(text: str) -> None:
    """Refuse requirements that would replace a package the image carries for its Neuron SDK."""
    image = {_normalize(p) for p in IMAGE_PACKAGES}
    listed = sorted({name for name, _ in _requirements(text) if name in image})
    if listed:
        raise ValueError(f"requirements list {', '.join(listed)}: AWS's image carries them built for its Neuron SDK, "
                         f"and a pip install of another build breaks the Neuron code; remove them.")


def _requirements(text: str) -> Iterator[tuple[str, str]]:
    """(normalized name, line) of each requirement line."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        yield _normalize(re.split(r"[\s<>=!~\[;@]", stripped, maxsplit=1)[0]), stripped


def artifacts_name(artifacts: Path) -> str:
    """The compiled root's folder name, which it keeps inside the archive."""
    return artifacts.resolve().name


def members(artifacts: Path | None, config: dict[str, Any], requirements: str) -> Iterator[tuple[str, Path | bytes]]:
    """(archive name, file path or bytes) for every entry, unsorted."""
    yield f"{CODE_DIR}/inference.py", ROOT / "serving" / "inference.py"
    yield f"{CODE_DIR}/requirements.txt", requirements.encode()
    yield f"{CODE_DIR}/endpoint.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # The backend package whole, subpackages included: a top-level glob would silently leave out
    # backend/core/, backend/neuron/ and the rest, and the endpoint would fail only at import.
    for path in backend_files():
        yield f"{CODE_DIR}/backend/{path.relative_to(ROOT / 'backend').as_posix()}", path
    for name in SERVING_FILES:
        yield f"{CODE_DIR}/serving/{name}", ROOT / "serving" / name
    if artifacts is not None:
        for path in _walk(artifacts):
            yield f"{artifacts_name(artifacts)}/{path.relative_to(artifacts).as_posix()}", path


def backend_files(backend: Path = ROOT / "backend") -> list[Path]:
    """Every .py file of the backend package, recursively and sorted, without __pycache__."""
    return sorted(path for path in backend.rglob("*.py")
                  if "__pycache__" not in path.relative_to(backend).parts and path.is_file())


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


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the archive, print its path, size and sha256."""
    parser = argparse.ArgumentParser(prog="python -m compile_scripts.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="archive to write, e.g. model.tar.gz")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--artifacts", type=Path, help="compiled root to put inside the archive, under its own name")
    where.add_argument("--model-s3-uri", help="s3:// folder holding a compiled root published with compile.py "
                                              "--upload, which the endpoint downloads and verifies at start (its "
                                              "role needs read access); keeps the archive small")
    parser.add_argument("--backend", choices=("neuron", "local"), default="neuron",
                        help="what the endpoint runs: neuron (inf2, default) or local (diffusers on the "
                             "instance's GPU or CPU)")
    parser.add_argument("--model", help="local backend: diffusers folder inside the archive, Hub id or 'tiny'")
    parser.add_argument("--png-level", type=int, default=DEFAULT_PNG_LEVEL, choices=range(10), metavar="0-9",
                        help=f"zlib level of the PNGs the endpoint answers (default {DEFAULT_PNG_LEVEL}: slower to "
                             f"encode than 0 but smaller, which wins across the internet; docs/benchmarks.md)")
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
    requirements = args.requirements.read_text() if args.requirements else endpoint_requirements()
    try:
        check_requirements(requirements)
    except ValueError as exc:
        parser.error(f"--requirements {args.requirements}: {exc}")
    config = endpoint_config(args.backend, artifacts_name(args.artifacts) if args.artifacts else None,
                             args.model_s3_uri, args.model, args.png_level)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    digest = build(args.out, members(args.artifacts, config, requirements), mtime, args.compress_level)
    size = args.out.stat().st_size
    print(f"{args.out}  {size / 1e6:.1f} MB  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
