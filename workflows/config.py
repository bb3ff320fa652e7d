"""Run configuration: command-line defaults, TOML files and their printed form.

A TOML file holds the same settings as the command line, by section::

    [execution]
    n_jobs = 2
    seed = 0

    [tracking]
    fa_stop = 0.2

Command-line flags override the file; ``--print-config`` prints the effective
settings in this format, so its output is a valid ``--config`` file.
"""

import tomllib
from pathlib import Path

from pipeline.errors import InputError

from .execution import check_mem_gb, check_n_jobs

#: (section, key) in a TOML file → argparse destination.
CONFIG_KEYS = {
    ("execution", "n_jobs"): "n_jobs",
    ("execution", "mem_gb"): "mem_gb",
    ("execution", "seed"): "seed",
    ("execution", "work_dir"): "work_dir",
    ("execution", "keep_work"): "keep_work",
    ("execution", "plugin"): "plugin",
    ("execution", "plugin_args"): "plugin_args",
    ("execution", "dask_scheduler"): "dask_scheduler",
    ("preprocessing", "b0_threshold"): "b0_threshold",
    ("preprocessing", "denoise"): "denoise",
    ("preprocessing", "gibbs"): "gibbs",
    ("preprocessing", "motion"): "motion",
    ("preprocessing", "outliers"): "outliers",
    ("preprocessing", "gradient_check"): "gradient_check",
    ("preprocessing", "dti_max_bvalue"): "dti_max_bvalue",
    ("preprocessing", "combine_runs"): "combine_runs",
    ("tracking", "model"): "model",
    ("tracking", "direction"): "direction",
    ("tracking", "fa_stop"): "fa_stop",
    ("tracking", "gap_fa"): "gap_fa",
    ("tracking", "corridor_radius_mm"): "corridor_radius",
    ("tracking", "max_angle_deg"): "max_angle",
    ("tracking", "step_mm"): "step_mm",
    ("tracking", "seeds_per_voxel"): "seeds_per_voxel",
    ("localization", "method"): "detection",
    ("localization", "false_positive_rate"): "false_positive_rate",
    ("localization", "node_ai"): "node_ai",
    ("localization", "min_nodes"): "min_nodes",
    ("localization", "segment_mean_ai"): "segment_mean_ai",
    ("prognosis", "prep_plic_ai"): "prep_plic_ai",
    ("prognosis", "prep2_safe"): "prep2_safe",
    ("prognosis", "prep2_safe_any_age"): "prep2_safe_any_age",
    ("prognosis", "prep2_age"): "prep2_age",
    ("prognosis", "prep2_nihss"): "prep2_nihss",
}

#: Settings of the ``[execution]`` section whose values are checked on reading (argparse
#: checks them on the command line): key → (check, example for the message).
CHECKED_SETTINGS = {"n_jobs": (check_n_jobs, "n_jobs = 2, or n_jobs = -1"),
                    "mem_gb": (check_mem_gb, "mem_gb = 8")}


def read_config(path):
    """Argparse defaults from a TOML file.

    Unknown sections or keys, and an invalid ``n_jobs`` or ``mem_gb``, are an input error.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"The configuration file cannot be read: {exc}", path=path,
                         fix="Write it as TOML; `cst-report --print-config` prints a template.") \
            from exc
    defaults = {}
    for section, values in document.items():
        if not isinstance(values, dict):
            raise InputError(f"'{section}' must be a [section].", path=path,
                             fix="`cst-report --print-config` prints a template.")
        for key, value in values.items():
            if (section, key) not in CONFIG_KEYS:
                known = ", ".join(f"{s}.{k}" for s, k in CONFIG_KEYS)
                raise InputError(f"Unknown setting '{section}.{key}'.", path=path,
                                 fix=f"Known settings: {known}.")
            defaults[CONFIG_KEYS[(section, key)]] = value
    # argparse checks the values it parses, not the defaults taken from here.
    for key, (check, example) in CHECKED_SETTINGS.items():
        if key in defaults:
            try:
                defaults[key] = check(defaults[key])
            except ValueError as exc:
                raise InputError(f"Invalid setting 'execution.{key}': {exc}.", path=path,
                                 fix=f"Write e.g. {example}.") from exc
    return defaults


def format_config(args):
    """The effective settings of ``args`` as TOML text (a valid ``--config`` file)."""
    lines, current = [], None
    for (section, key), dest in CONFIG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if section != current:
            lines.append(f"{'' if current is None else chr(10)}[{section}]")
            current = section
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):  # e.g. the plugin arguments, as an inline table
        items = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
