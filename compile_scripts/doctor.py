"""Preflight a compiled root before serving it: versions, NeuronCores, memory, each part, one smoke generation.

    python -m compile_scripts.doctor --artifacts sd2_512_root
    python compile_scripts/doctor.py --artifacts sd2_512_root --no-smoke

Prints one line per finding (ok, warning, error) and, under each problem, what to do. Exit status 0
when nothing is an error, 1 otherwise. The checks are backend/neuron/preflight.py's, which an endpoint can
also run at start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python compile_scripts/doctor.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.core.errors import BackendUnavailable  # noqa: E402
from backend.neuron.preflight import check, failed  # noqa: E402
from backend.neuron.root_store import resolve  # noqa: E402
from backend.core.settings import DEFAULT_ARTIFACTS, Settings  # noqa: E402

MARKS = {"ok": "ok     ", "warning": "warning", "error": "ERROR  "}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m compile_scripts.doctor",
        description="Check that this machine can serve a compiled root: Python and Neuron package versions, "
                    "NeuronCores, host memory, each compiled part, then one 1-step generation per precision.",
    )
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS,
                        help=f"the compiled root: a folder (default {DEFAULT_ARTIFACTS}), s3://BUCKET/PREFIX/ or "
                             f"hf://OWNER/NAME[@REVISION], downloaded into --cache-dir / SD_CACHE_DIR first")
    parser.add_argument("--no-smoke", action="store_true", help="skip the smoke generation (loading the parts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    # The backend's own settings from SD_* variables (SD_NEURON_CORES), as the app would start with them.
    settings = Settings.from_args([], server_flags=False)
    try:
        root = resolve(args.artifacts, settings.cache_dir)
    except BackendUnavailable as exc:
        print(f"[{MARKS['error']}] {exc}")
        return 1
    findings = check(root, smoke=not args.no_smoke, neuron_cores=settings.neuron_cores)
    for finding in findings:
        print(f"[{MARKS[finding.level]}] {finding.what}")
        if finding.fix and finding.level != "ok":
            print(f"          -> {finding.fix}")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"{errors} error(s), {warnings} warning(s): "
          + ("this root cannot be served here as it is." if errors
             else f"serve it with: python app.py --backend neuron --artifacts {args.artifacts}"))
    return 1 if failed(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
