"""Preflight a compiled root before serving it: versions, NeuronCores, memory, each part, one smoke generation.

    python -m compile_scripts.doctor --artifacts sd2_512_root
    python compile_scripts/doctor.py --artifacts sd2_512_root --no-smoke

Prints one line per finding (ok, warning, error) and, under each problem, what to do. Exit status 0
when nothing is an error, 1 otherwise. The checks are backend/preflight.py's, which an endpoint can
also run at start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python compile_scripts/doctor.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.preflight import check, failed  # noqa: E402
from backend.settings import DEFAULT_ARTIFACTS  # noqa: E402

MARKS = {"ok": "ok     ", "warning": "warning", "error": "ERROR  "}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m compile_scripts.doctor",
        description="Check that this machine can serve a compiled root: Python and Neuron package versions, "
                    "NeuronCores, host memory, each compiled part, then one 1-step generation per precision.",
    )
    parser.add_argument("--artifacts", type=Path, default=Path(DEFAULT_ARTIFACTS),
                        help=f"the compiled root (default {DEFAULT_ARTIFACTS})")
    parser.add_argument("--no-smoke", action="store_true", help="skip the smoke generation (loading the parts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    findings = check(args.artifacts, smoke=not args.no_smoke)
    for finding in findings:
        print(f"[{MARKS[finding.level]}] {finding.what}")
        if finding.fix and finding.level != "ok":
            print(f"          -> {finding.fix}")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    advice = ("this root cannot be served here as it is." if errors
              else f"serve it with: python app.py --backend neuron --artifacts {args.artifacts}")
    print(f"{errors} error(s), {warnings} warning(s): {advice}")
    return 1 if failed(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
