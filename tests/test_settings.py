"""backend/core/settings.py: every knob is a flag with its SD_* variable, and only settings.py reads them."""

import argparse
import dataclasses

from backend.core.settings import READ_TIMEOUT_S, RETRY_BACKOFF_S, Settings, add_arguments


def test_every_field_is_a_flag_with_its_variable():
    parser = add_arguments(argparse.ArgumentParser(), env={})
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(Settings)}


def test_variables_fill_the_backend_knobs_and_flags_win():
    env = {"SD_OFFLINE": "1", "SD_NEURON_CORES": "1", "SD_READ_TIMEOUT": "1.5", "SD_RETRY_BACKOFF": "0.01"}
    settings = Settings.from_args([], env=env)
    assert (settings.offline, settings.neuron_cores, settings.read_timeout, settings.retry_backoff) == (
        True, 1, 1.5, 0.01)
    assert Settings.from_args(["--read-timeout", "9", "--neuron-cores", "2"], env=env).read_timeout == 9.0
    defaults = Settings.from_args([], env={})
    assert (defaults.offline, defaults.neuron_cores, defaults.read_timeout, defaults.retry_backoff) == (
        False, None, READ_TIMEOUT_S, RETRY_BACKOFF_S)


def test_offline_follows_the_hubs_own_variable_unless_sd_offline_says_otherwise():
    assert Settings.from_args([], env={"HF_HUB_OFFLINE": "1"}).offline
    assert not Settings.from_args([], env={"HF_HUB_OFFLINE": "1", "SD_OFFLINE": "0"}).offline
    assert Settings.from_args(["--offline"], env={}).offline


def test_a_callers_own_flags_are_left_out_of_settings():
    parser = add_arguments(argparse.ArgumentParser(), env={}, server_flags=False)
    parser.add_argument("--runs", type=int, default=3)
    settings = Settings.from_namespace(parser.parse_args(["--model", "tiny"]))
    assert settings.model == "tiny" and not hasattr(settings, "runs")


def test_each_backend_slice_is_fields_of_settings_with_the_same_defaults():
    """A backend's settings slice names only Settings fields, with Settings' defaults, so `of` copies and a backend
    built without the app (tests, the doctor) starts as the app would."""
    from backend.core.settings import InProcessSettings, LocalSettings, NeuronSettings, SageMakerSettings

    whole = {f.name: f.default for f in dataclasses.fields(Settings)}
    for piece in (InProcessSettings, LocalSettings, NeuronSettings, SageMakerSettings):
        fields = {f.name: f.default for f in dataclasses.fields(piece)}
        assert fields and fields == {name: whole[name] for name in fields}, piece.__name__
    settings = Settings(model="tiny", device="cpu", sizes="128x128", endpoint_name="e", max_images=2, lora="x")
    assert LocalSettings.of(settings) == LocalSettings(model="tiny", device="cpu", max_images=2, lora="x")
    assert NeuronSettings.of(settings).sizes == "128x128" and NeuronSettings.of(settings).max_images == 2
    assert SageMakerSettings.of(settings) == SageMakerSettings(endpoint_name="e", max_images=2)


def test_only_settings_reads_the_sd_variables():
    """No other project module reads an SD_* variable from the environment (serving/inference.py hands its
    endpoint.json and the environment to Settings instead): a lookup, `m[...]`, `m.get(...)` or `os.getenv(...)`,
    with an SD_ key (literal, f-string or "SD_" + ...) appears in core/settings.py alone."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted(root.glob("**/*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith((".", "tests/")) or "/." in rel or rel == "backend/core/settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Subscript):
                key = node.slice
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith((".get", "getenv")) and node.args:
                key = node.args[0]
            text = ast.unparse(key) if key is not None else ""
            if text.lstrip("f").strip("'\"").startswith("SD_"):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
