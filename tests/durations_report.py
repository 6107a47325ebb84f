"""Where a test run's time goes: per file and per kind, from pytest's JUnit XML (docs/testing.md's tables).

    python -m pytest --junitxml=run.xml            # any run, serial or with xdist workers
    python tests/durations_report.py before.xml after.xml ...   # a column for each run

A test's time is its setup, call and teardown together (the XML's `time`), so a module fixture's cost is
charged to the test that first used it. With two workers the sum is about twice the wall time.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Each file under the kind that dominates its time (what its fixtures start, or what its tests run).
KINDS = {
    "model loads and generations in the test process": (
        "test_local", "test_modes", "test_frozen", "test_fewstep", "test_tiny", "test_preview", "test_live",
        "test_fuzz", "test_api", "test_metadata", "test_settings", "test_ui", "test_walkthrough", "test_protocol",
        "test_emphasis", "test_hires", "test_png_info_formats", "test_imports", "test_model_revision"),
    "traces and compiles (Neuron CPU stand-in)": (
        "test_compile", "test_neuron", "test_neuron_sizes", "test_neuron_image_modes", "test_neuron_parallel",
        "test_neuron_stack", "test_preflight", "test_root_store", "test_neuron_placement", "test_package_archive",
        "test_transfer_progress"),
    "app and endpoint start-ups": (
        "test_app", "test_app_modes", "test_faults", "test_security", "test_sagemaker_backend", "test_serving",
        "test_deploy", "test_spaces"),
    "TorchServe and the SageMaker toolkit": (
        "test_torchserve", "test_torchserve_modes", "test_torchserve_uncompressed"),
    "Chromium": ("test_browser", "test_browser_modes", "test_browser_hires", "test_browser_pnginfo"),
    "load and soak": ("test_load",),
    "benchmark and overhead scripts": ("test_benchmarks",),
}
KIND_OF = {module: kind for kind, modules in KINDS.items() for module in modules}


def per_file(path: str) -> tuple[dict[str, float], dict[str, int], float]:
    """Seconds and test counts per test file, and the run's wall time (the testsuite's `time`)."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    seconds: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for case in suite.iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x or tests.test_x.TestClass
        module = parts[1] if len(parts) > 1 else parts[0]
        seconds[module] += float(case.get("time", 0))
        counts[module] += 1
    return seconds, counts, float(suite.get("time", 0))


def main(argv: list[str]) -> int:
    """Print the wall times and two Markdown tables (per file, per kind), a column for each XML given."""
    if not argv:
        print(__doc__)
        return 2
    runs = [per_file(path) for path in argv]
    names = [Path(path).stem for path in argv]
    for name, (seconds, counts, wall) in zip(names, runs):
        print(f"{name}: {sum(counts.values())} tests, wall time {wall:.0f} s, "
              f"test time summed {sum(seconds.values()):.0f} s")
    print()
    head = "| file | tests | " + " | ".join(f"{name} (s)" for name in names) + " |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    modules = set().union(*(seconds for seconds, _, _ in runs))
    for module in sorted(modules, key=lambda m: -runs[-1][0].get(m, 0)):
        tests = max(counts.get(module, 0) for _, counts, _ in runs)
        print(f"| {module} | {tests} | " + " | ".join(f"{seconds.get(module, 0):.1f}" for seconds, _, _ in runs) + " |")
    print()
    head = "| kind | " + " | ".join(f"{name} (s)" for name in names) + " |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for kind, kind_modules in KINDS.items():
        print(f"| {kind} | " + " | ".join(f"{sum(seconds.get(m, 0) for m in kind_modules):.1f}"
                                          for seconds, _, _ in runs) + " |")
    unknown = sorted(m for m in modules if m not in KIND_OF)
    if unknown:
        print(f"\nfiles with no kind (add them to KINDS): {', '.join(unknown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
