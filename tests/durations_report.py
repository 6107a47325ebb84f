"""Where a test run's time goes: per file and per kind, from pytest's JUnit XML (docs/testing.md's tables).

    python -m pytest --junitxml=run.xml            # any run, serial or with xdist workers
    python tests/durations_report.py run.xml [before.xml]

A test's time is its setup, call and teardown together (the XML's `time`), so a module fixture's cost is
charged to the test that first used it. With two workers the sum is about twice the wall time.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET

# Each file under the kind that dominates its time (what its fixtures start, or what its tests run).
KINDS = {
    "model loads and generations in the test process": (
        "test_local", "test_modes", "test_frozen", "test_fewstep", "test_tiny", "test_preview", "test_live",
        "test_fuzz", "test_api", "test_metadata", "test_settings", "test_ui", "test_walkthrough", "test_protocol"),
    "traces and compiles (Neuron CPU stand-in)": (
        "test_compile", "test_neuron", "test_neuron_sizes", "test_neuron_image_modes", "test_neuron_parallel",
        "test_neuron_stack", "test_preflight", "test_root_store"),
    "app and endpoint start-ups": (
        "test_app", "test_app_modes", "test_faults", "test_security", "test_sagemaker_backend", "test_serving",
        "test_deploy"),
    "TorchServe and the SageMaker toolkit": (
        "test_torchserve", "test_torchserve_modes", "test_torchserve_uncompressed"),
    "Chromium": ("test_browser", "test_browser_modes"),
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
        module = case.get("classname", "").split(".")[1] if "." in case.get("classname", "") else case.get("classname")
        seconds[module] += float(case.get("time", 0))
        counts[module] += 1
    return seconds, counts, float(suite.get("time", 0))


def main(argv: list[str]) -> int:
    """Print the two Markdown tables: after (argv[0]) and, when given, before (argv[1])."""
    after, counts, wall = per_file(argv[0])
    before = per_file(argv[1])[0] if len(argv) > 1 else {}
    head = "| file | tests | before (s) | after (s) |" if before else "| file | tests | seconds |"
    print(f"wall time {wall:.0f} s; test time summed {sum(after.values()):.0f} s\n")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for module in sorted(set(after) | set(before), key=lambda m: -after.get(m, 0)):
        row = f"| {module} | {counts.get(module, 0)} |"
        row += f" {before.get(module, 0):.1f} | {after.get(module, 0):.1f} |" if before else f" {after[module]:.1f} |"
        print(row)
    print()
    head = "| kind | before (s) | after (s) |" if before else "| kind | seconds |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for kind in KINDS:
        mods = KINDS[kind]
        a = sum(after.get(m, 0) for m in mods)
        b = sum(before.get(m, 0) for m in mods)
        print(f"| {kind} | {b:.1f} | {a:.1f} |" if before else f"| {kind} | {a:.1f} |")
    unknown = sorted(m for m in after if m not in KIND_OF)
    if unknown:
        print(f"\nfiles with no kind (add them to KINDS): {', '.join(unknown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
