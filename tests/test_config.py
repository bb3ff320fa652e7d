"""The typed run configuration: every setting defined once, in :mod:`workflows.config`,
reaches both command lines, the TOML file and its printed form, and the parameters."""

import inspect
from dataclasses import fields

import pytest

from pipeline import steps
from pipeline.clinical.prognosis import DEFAULT_PREP2_THRESHOLDS, DEFAULT_PREP_PLIC_AI
from pipeline.errors import EXIT_BAD_INPUT, InputError
from pipeline.io.dwi import B0_THRESHOLD
from pipeline.reconstruction.tensor import DTI_MAX_BVALUE
from pipeline.tractometry.localization import DEFAULT_THRESHOLDS
from pipeline.tractometry.qc import DEFAULT_QC_LIMITS
from workflows.cli import bids_app_parser, cst_report_parser, parse_args
from workflows.config import Localization, Prognosis, RunConfig, Tracking, read_config, sections

#: A command line that sets every setting to a value other than its default.
EVERY_FLAG = ["--n-jobs", "3", "--mem-gb", "2.5", "--seed", "7", "--work-dir", "/w",
              "--keep-work", "--plugin", "SLURM", "--plugin-args",
              '{"max_jobs": 4, "sbatch_args": "-p \\"x\\""}', "--dask-scheduler", "tcp://h:1",
              "--b0-threshold", "80", "--denoise", "patch2self", "--no-gibbs", "--motion",
              "rigid", "--outliers", "report", "--gradient-check", "error",
              "--dti-max-bvalue", "1200", "--combine-runs", "--model", "csd", "--direction",
              "det", "--fa-stop", "0.15", "--gap-fa", "0.05", "--corridor-radius", "6",
              "--max-angle", "30", "--step-mm", "0.25", "--seeds-per-voxel", "4",
              "--detection", "fixed-ai", "--false-positive-rate", "0.05",
              "--mirrored-false-positive-rate", "0.02", "--node-ai", "0.2",
              "--min-nodes", "5", "--segment-mean-ai", "0.15", "--prep-plic-ai", "0.3",
              "--prep2-safe", "4", "--prep2-safe-any-age", "7", "--prep2-age", "70",
              "--prep2-nihss", "6"]


def _settings():
    return [(name, setting) for name, section in sections() for setting in fields(section)]


def test_every_setting_is_an_option_of_both_command_lines():
    keys = [setting.name for _, setting in _settings()]
    assert len(keys) == len(set(keys))  # a key is its option's argparse destination
    for parser in (cst_report_parser(), bids_app_parser()):
        options = {action.dest: action for action in parser._actions}
        defaults = RunConfig()
        for section, setting in _settings():
            action = options[setting.name]
            assert action.option_strings == [setting.metadata["flag"]]
            assert action.default == getattr(getattr(defaults, section), setting.name)


def test_every_flag_set_changes_every_setting():
    given = RunConfig.from_args(parse_args(cst_report_parser(), EVERY_FLAG))
    for section, setting in _settings():
        assert getattr(getattr(given, section), setting.name) != \
            getattr(getattr(RunConfig(), section), setting.name), setting.name


@pytest.mark.parametrize("parser", [cst_report_parser, bids_app_parser])
def test_printed_config_reads_back_as_the_same_settings(parser, tmp_path):
    given = RunConfig.from_args(parse_args(parser(), EVERY_FLAG))
    config = tmp_path / "cst.toml"
    config.write_text(given.to_toml())
    read = RunConfig.from_args(parse_args(parser(), ["--config", str(config)]))
    assert read == given
    assert read.parameters() == given.parameters()
    assert read.to_toml() == given.to_toml()
    # flags still override the file
    again = RunConfig.from_args(parse_args(parser(), ["--config", str(config), "--seed", "9"]))
    assert again.execution.seed == 9 and again.tracking == given.tracking


def test_defaults_are_the_sciences_own():
    defaults = RunConfig()
    assert defaults.preprocessing.b0_threshold == B0_THRESHOLD
    assert defaults.preprocessing.dti_max_bvalue == DTI_MAX_BVALUE
    for setting in fields(Localization):
        assert getattr(defaults.localization, setting.name) == DEFAULT_THRESHOLDS[setting.name]
    assert defaults.prognosis.prep_plic_ai == DEFAULT_PREP_PLIC_AI
    for setting in fields(Prognosis):
        if setting.name != "prep_plic_ai":
            assert getattr(defaults.prognosis, setting.name) == \
                DEFAULT_PREP2_THRESHOLDS[setting.name]
    tracking = inspect.signature(steps.track_cst).parameters
    for setting in fields(Tracking):
        if setting.name != "model":
            assert getattr(defaults.tracking, setting.name) == tracking[setting.name].default
    assert defaults.tracking.model == inspect.signature(steps.fit_fodf).parameters["model"].default
    assert defaults.parameters()["tracking"]["min_coverage"] == \
        DEFAULT_QC_LIMITS["min_roi_coverage"]


@pytest.mark.parametrize("section, line", [
    ("tracking", 'fa_stop = "high"'),
    ("tracking", 'model = "tensor"'),
    ("tracking", "seeds_per_voxel = 2.5"),
    ("preprocessing", "gibbs = 1"),
    ("preprocessing", "b0_threshold = true"),
    ("execution", 'keep_work = "yes"'),
    ("execution", "work_dir = 3"),
    ("execution", 'plugin = "Dask"'),
    ("execution", 'plugin_args = "--mem=8G"'),
    ("localization", "false_positive_rate = 0.7"),
])
def test_bad_value_in_the_config_file_is_an_input_error(section, line, tmp_path):
    config = tmp_path / "cst.toml"
    config.write_text(f"[{section}]\n{line}\n")
    key = line.split(" =")[0]
    with pytest.raises(InputError, match=f"Invalid setting '{section}.{key}'") as exc:
        parse_args(cst_report_parser(), ["--config", str(config)])
    assert exc.value.exit_code == EXIT_BAD_INPUT and exc.value.path == config


def test_unknown_setting_in_the_config_file_is_an_input_error(tmp_path):
    config = tmp_path / "cst.toml"
    config.write_text("[tracking]\ncorridor_radius = 6.0\n")  # the flag's name, not the key
    with pytest.raises(InputError, match="Unknown setting 'tracking.corridor_radius'"):
        read_config(config)


def test_the_example_of_each_error_message_is_a_valid_setting(tmp_path):
    config = tmp_path / "cst.toml"
    for section, setting in _settings():
        with pytest.raises(InputError) as exc:  # a list is no setting's value
            config.write_text(f"[{section}]\n{setting.name} = [[]]\n")
            read_config(config)
        example = exc.value.fix.removeprefix("Write e.g. ").removesuffix(".")
        config.write_text(f"[{section}]\n{example}\n")
        assert list(read_config(config)) == [setting.name]


def test_an_integer_in_the_file_is_a_number_for_a_number_setting(tmp_path):
    config = tmp_path / "cst.toml"
    config.write_text("[preprocessing]\nb0_threshold = 80\n")
    value = read_config(config)["b0_threshold"]
    assert value == 80.0 and isinstance(value, float)
