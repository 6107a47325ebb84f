"""model.tar.gz's code/ folder stands on its own: every module of the archived backend package (subpackages
included) and serving.handler import from the extracted archive alone, never from the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from compile_scripts import package
from helpers import ROOT

# Runs in a fresh interpreter with cwd and PYTHONPATH = the extracted code/ folder: imports every module
# under backend/ (dotted names from the files), then serving.handler, and prints where backend came from
# and every module that failed (all of them, not only the first).
IMPORT_ALL = """
import importlib, json, pathlib, traceback
code = pathlib.Path.cwd()
names = []
for path in sorted((code / "backend").rglob("*.py")):
    parts = list(path.relative_to(code).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    names.append(".".join(parts))
failed = {}
for name in names + ["serving.handler"]:
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
import backend
print(json.dumps({"backend": backend.__file__, "modules": names, "failed": failed}))
"""


def python_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def test_archived_code_imports_on_its_own(tmp_path):
    archive = tmp_path / "model.tar.gz"
    assert package.main(["--out", str(archive), "--backend", "local", "--model", "tiny"]) == 0
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    code = extracted / "code"

    # Every .py of the repository's backend package is in the archive, and nothing else is.
    assert python_files(code / "backend") == python_files(ROOT / "backend")
    assert {p.relative_to(code / "backend").as_posix() for p in (code / "backend").rglob("*")
            if p.is_file()} == python_files(ROOT / "backend")

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(code)
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=code, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert not found["failed"], "modules that do not import from the archive alone:\n" + "\n".join(
        f"{name}:\n{trace}" for name, trace in found["failed"].items())
    assert Path(found["backend"]).resolve().is_relative_to(code.resolve())
    subpackages = {name.split(".")[1] for name in found["modules"] if name.count(".") >= 1}
    expected = {p.name for p in (ROOT / "backend").iterdir() if (p / "__init__.py").is_file()}
    assert subpackages >= expected
