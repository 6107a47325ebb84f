"""backend/settings.py: every knob is a flag with its SD_* variable, and only settings.py reads them."""

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
