"""Run configuration: typed sections in which every setting is defined once.

A setting is a field of one section (:class:`Execution`, :class:`Preprocessing`,
:class:`Tracking`, :class:`Localization`, :class:`Prognosis`). The field carries all there
is to say about it: its TOML key (the field's name, also its argparse destination), its
command-line flag, its type and allowed values, its help text and its default. The
default is the science's own, imported from ``pipeline``: a named constant, or the
keyword default of the stage that takes the setting (:func:`stage_default`). From these
fields come the options of both command lines (:func:`add_setting_options`), the reading
of a TOML file (:func:`read_config`), its printed form (:meth:`RunConfig.to_toml`) and the
parameters that go to the workflow and into every output's provenance
(:meth:`RunConfig.parameters`).

A TOML file holds the same settings as the command line, by section::

    [execution]
    n_jobs = 2
    seed = 0

    [tracking]
    fa_stop = 0.2

Command-line flags override the file; ``--print-config`` prints the effective
settings in this format, so its output is a valid ``--config`` file.
"""

import inspect
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, get_args

from pipeline import steps
from pipeline.clinical.prognosis import DEFAULT_PREP2_THRESHOLDS, DEFAULT_PREP_PLIC_AI
from pipeline.errors import InputError
from pipeline.io.dwi import B0_THRESHOLD
from pipeline.preprocessing.denoise import DENOISE_METHODS
from pipeline.reconstruction.tensor import DTI_MAX_BVALUE
from pipeline.tractometry.localization import DEFAULT_THRESHOLDS
from pipeline.tractometry.qc import DEFAULT_QC_LIMITS

from .execution import (
    PLUGINS,
    argparse_type,
    check_mem_gb,
    check_n_jobs,
    parse_plugin_args,
    resolve_n_jobs,
)

#: Methods of the preprocessing that no setting changes, recorded with its settings.
PREPROCESSING_METHODS = {
    "brain_mask": "median_otsu(median_radius=2, numpass=1), mean b0 | mean DWI, holes filled",
    "tensor_fit": "WLS",
}

#: What a value in the TOML file must be, by the setting's type (for the error message).
TOML_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              Path: "a path (a string)", dict: "a table"}

CLUSTER_GROUP = "execution on a cluster (results do not depend on it)"


def setting(default, flag, help, *, choices=None, check=None, parse=None, metavar=None,
            group=None, example=None):
    """A field of a configuration section: one setting, described once.

    Parameters
    ----------
    default
        Its value unless the command line or the TOML file sets it.
    flag : str
        Its command-line flag. A boolean setting is a switch that turns it on when it is
        off by default (``--combine-runs``), or off when it is on (``--no-gibbs``).
    help : str
        Its ``--help`` text; ``%(default)s`` and the like write the default.
    choices : tuple, optional
        The values allowed.
    check : callable, optional
        Value → value, raising ``ValueError`` with a one-line message; it takes the value
        as the command line (a string) or the TOML file gives it, instead of the type.
    parse : callable, optional
        Command-line text → value (an argparse ``type``), for a setting written
        otherwise there than in the TOML file (the plugin arguments: a JSON object).
    metavar : str, optional
        Its value's name in ``--help``.
    group : str, optional
        Its group in ``--help``, where not its section's (``GROUP``).
    example : str, optional
        A valid TOML line for the message about an invalid value, where the default
        does not make a good one.
    """
    metadata = {"flag": flag, "help": help, "choices": choices, "check": check, "parse": parse,
                "metavar": metavar, "group": group, "example": example}
    metadata = {key: value for key, value in metadata.items() if value is not None}
    if isinstance(default, dict):  # mutable: each configuration gets its own copy
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


def stage_default(stage, keyword):
    """The default of ``keyword`` of ``stage`` (a function of :mod:`pipeline.steps`): the
    stage owns the defaults that have no named constant in ``pipeline``."""
    return inspect.signature(stage).parameters[keyword].default


def check_false_positive_rate(value):
    """A valid ``false_positive_rate``: the chance of a finding on a healthy scan, a
    probability between 0 and 0.5 (exclusive).

    Raises
    ------
    ValueError
        With a one-line message saying what is allowed.
    """
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number; give a probability between 0 and "
                         "0.5") from None
    if isinstance(value, bool) or not 0 < rate < 0.5:
        raise ValueError(f"must lie between 0 and 0.5, got {value}")
    return rate


@dataclass(frozen=True)
class Execution:
    """``[execution]``: how the run is executed; apart from ``seed``, results do not depend
    on it (:data:`workflows.execution.EXECUTION_SETTINGS`)."""

    GROUP: ClassVar[str | None] = None  # the general options of --help

    n_jobs: int = setting(
        1, "--n-jobs", check=check_n_jobs, metavar="N", example="n_jobs = 2",
        help="parallel workers for denoising and tracking (default %(default)d); -1: every "
             "core this process may use (under SLURM, the job's --cpus-per-task); results do "
             "not depend on it")
    mem_gb: float | None = setting(
        None, "--mem-gb", check=check_mem_gb, metavar="GB", example="mem_gb = 8",
        help="memory budget in GiB (default: what the machine, or the SLURM allocation, has "
             "available); denoising works in chunks sized from it and a series that needs "
             "more is refused up front; results do not depend on it")
    seed: int = setting(stage_default(steps.track_cst, "seed"), "--seed", metavar="N",
                        help="random seed for seed placement (default %(default)d)")
    work_dir: Path | None = setting(
        None, "--work-dir", example='work_dir = "/scratch/cst-work"',
        help="Nipype working directory (cache; a rerun of a failed or interrupted run resumes "
             "from it). Default: OUT_DIR/.cst-work")
    keep_work: bool = setting(
        False, "--keep-work",
        help="keep the subject's work folder after a successful run (by default it is "
             "removed; a failed run always keeps it)")
    plugin: str = setting(
        "MultiProc", "--plugin", choices=PLUGINS, group=CLUSTER_GROUP,
        help="Nipype plugin that runs the steps: Linear (one by one), MultiProc (--n-jobs "
             "processes here; default) or SLURM (one sbatch job per step, asking for the "
             "memory and cores the step declares)")
    plugin_args: dict = setting(
        {}, "--plugin-args", parse=parse_plugin_args, metavar="JSON", group=CLUSTER_GROUP,
        example='plugin_args = { "max_jobs" = 20 }',
        help="arguments of the plugin as a JSON object, e.g. "
             """'{"sbatch_args": "--time=1:00:00 -p short", "max_jobs": 20}'""")
    dask_scheduler: str | None = setting(
        None, "--dask-scheduler", metavar="ADDRESS", group=CLUSTER_GROUP,
        example='dask_scheduler = "tcp://host:8786"',
        help="track on a Dask cluster: a scheduler address (tcp://host:8786), or 'slurm' to "
             "start a dask-jobqueue SLURMCluster of --n-jobs workers (needs the [dask] extra)")


@dataclass(frozen=True)
class Preprocessing:
    """``[preprocessing]``: from the scanner's series to the tensor fit."""

    GROUP: ClassVar[str | None] = "preprocessing"

    b0_threshold: float = setting(B0_THRESHOLD, "--b0-threshold", metavar="B",
                                  help="b-values <= B s/mm² are b0 (default %(default)g)")
    denoise: str = setting(stage_default(steps.denoise, "method"), "--denoise",
                           choices=DENOISE_METHODS, help="denoising method (default %(default)s)")
    gibbs: bool = setting(True, "--no-gibbs", help="skip Gibbs-ringing removal (on by default)")
    motion: str = setting(
        stage_default(steps.correct_motion, "model"), "--motion",
        choices=("affine", "rigid", "none"),
        help="volume-to-b0 motion correction; affine also absorbs eddy-current distortion "
             "(default %(default)s)")
    outliers: str = setting(
        stage_default(steps.detect_outliers, "action"), "--outliers",
        choices=("exclude", "report"),
        help="leave volumes with signal dropout or extreme motion out of the fit, or only "
             "report them (default %(default)s)")
    gradient_check: str = setting(
        stage_default(steps.check_gradients, "mode"), "--gradient-check",
        choices=("fix", "error", "off"),
        help="on a flipped or permuted gradient table: fix it and say so in the report, stop "
             "with an error, or do not check (default %(default)s)")
    dti_max_bvalue: float = setting(
        DTI_MAX_BVALUE, "--dti-max-bvalue", metavar="B",
        help="the tensor fit uses b0 and shells up to B s/mm² (default %(default)g)")
    combine_runs: bool = setting(
        False, "--combine-runs",
        help="combine the runs of a session (e.g. dir-AP and dir-PA) into one series after "
             "aligning them; default: each run processed and reported alone")


@dataclass(frozen=True)
class Tracking:
    """``[tracking]``: the fibre model and the CST tracking."""

    GROUP: ClassVar[str | None] = "tracking"

    model: str = setting(
        stage_default(steps.fit_fodf, "model"), "--model", choices=("dti", "csd", "auto"),
        help="fibre model: the tensor (deterministic), CSD fibre ODFs (DIPY; response from "
             "the data; with two or more shells of 16 or more directions and b0 volumes, "
             "multi-shell multi-tissue CSD with WM/GM/CSF responses, else single-shell CSD on "
             "the shell with the most directions), or auto: CSD when the shell's directions "
             "allow order 4 (16 or more), else the tensor (default %(default)s)")
    direction: str = setting(
        stage_default(steps.track_cst, "direction"), "--direction", choices=("prob", "det"),
        help="with CSD: probabilistic or deterministic direction getter (default %(default)s)")
    fa_stop: float = setting(stage_default(steps.track_cst, "fa_stop"), "--fa-stop",
                             help="stop tracking below this FA (default %(default)g)")
    gap_fa: float = setting(
        stage_default(steps.track_cst, "gap_fa"), "--gap-fa",
        help="inside the CST corridor, tracking crosses FA down to this (a lesion must not "
             "erase its tract; default %(default)g; set it to --fa-stop to turn this off)")
    corridor_radius_mm: float = setting(
        stage_default(steps.track_cst, "corridor_radius_mm"), "--corridor-radius", metavar="MM",
        help="radius of the CST corridor around the line through the CST ROIs "
             "(default %(default)g mm)")
    max_angle_deg: float = setting(stage_default(steps.track_cst, "max_angle_deg"), "--max-angle",
                                   help="max turn per step, degrees (default %(default)g)")
    step_mm: float = setting(stage_default(steps.track_cst, "step_mm"), "--step-mm",
                             help="step size, mm (default %(default)g)")
    seeds_per_voxel: int = setting(stage_default(steps.track_cst, "seeds_per_voxel"),
                                   "--seeds-per-voxel",
                                   help="seeds per voxel of the CST ROIs (default %(default)d)")


@dataclass(frozen=True)
class Localization:
    """``[localization]``: the rule that finds upper-motor-neuron damage along a CST
    (:data:`pipeline.tractometry.localization.DEFAULT_THRESHOLDS` holds the rest of it)."""

    GROUP: ClassVar[str | None] = "detection and prognosis"

    method: str = setting(
        DEFAULT_THRESHOLDS["method"], "--detection", choices=("calibrated", "fixed-ai"),
        help="calibrated: asymmetry tested against this scan's bootstrap noise and the "
             "healthy-asymmetry model at a stated false-finding rate (default); fixed-ai: the "
             "fixed |AI| thresholds below")
    false_positive_rate: float = setting(
        DEFAULT_THRESHOLDS["false_positive_rate"], "--false-positive-rate",
        check=check_false_positive_rate, metavar="RATE",
        help="calibrated detection: chance of a finding on a healthy scan (default %(default)g)")
    mirrored_false_positive_rate: float = setting(
        DEFAULT_THRESHOLDS["mirrored_false_positive_rate"], "--mirrored-false-positive-rate",
        check=check_false_positive_rate, metavar="RATE",
        help="calibrated detection: chance of a finding on a healthy scan for the second, "
             "voxel-wise test (mirrored FA asymmetry in the CST volume; default %(default)g); "
             "a finding of either test is a finding")
    node_ai: float = setting(
        DEFAULT_THRESHOLDS["node_ai"], "--node-ai",
        help="fixed-ai: |AI| at a profile node counted as asymmetric (default %(default)g)")
    min_nodes: int = setting(
        DEFAULT_THRESHOLDS["min_nodes"], "--min-nodes",
        help="fixed-ai: consecutive asymmetric nodes for a finding (default %(default)d)")
    segment_mean_ai: float = setting(
        DEFAULT_THRESHOLDS["segment_mean_ai"], "--segment-mean-ai",
        help="fixed-ai: mean |AI| over those nodes for a finding (default %(default)g)")


@dataclass(frozen=True)
class Prognosis:
    """``[prognosis]``: the cut-offs of PREP (Stinear 2012) and PREP2 (Stinear 2017); PREP2
    reads the participant's safe_score, age, mep_status and nihss from participants.tsv."""

    GROUP: ClassVar[str | None] = "detection and prognosis"

    prep_plic_ai: float = setting(
        DEFAULT_PREP_PLIC_AI, "--prep-plic-ai",
        help="PREP cut-off on PLIC FA asymmetry (Stinear 2012; default %(default)g)")
    prep2_safe: float = setting(
        DEFAULT_PREP2_THRESHOLDS["prep2_safe"], "--prep2-safe",
        help="PREP2: SAFE score from which no TMS is needed (default %(default)g)")
    prep2_safe_any_age: float = setting(
        DEFAULT_PREP2_THRESHOLDS["prep2_safe_any_age"], "--prep2-safe-any-age",
        help="PREP2: SAFE score predicting Excellent at any age (default %(default)g)")
    prep2_age: float = setting(
        DEFAULT_PREP2_THRESHOLDS["prep2_age"], "--prep2-age",
        help="PREP2: age (years) from which a lower SAFE score gives Good (default %(default)g)")
    prep2_nihss: float = setting(
        DEFAULT_PREP2_THRESHOLDS["prep2_nihss"], "--prep2-nihss",
        help="PREP2: NIHSS from which an MEP- patient is predicted Poor (default %(default)g)")


@dataclass(frozen=True)
class RunConfig:
    """The settings of a run, by section; a field's name is its section's name in TOML."""

    execution: Execution = field(default_factory=Execution)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    tracking: Tracking = field(default_factory=Tracking)
    localization: Localization = field(default_factory=Localization)
    prognosis: Prognosis = field(default_factory=Prognosis)

    @classmethod
    def from_args(cls, args):
        """The settings parsed by a parser given :func:`add_setting_options`."""
        return cls(**{name: section(**{f.name: getattr(args, f.name) for f in fields(section)})
                      for name, section in sections()})

    def to_toml(self):
        """These settings as TOML text: a valid ``--config`` file (unset ones left out)."""
        blocks = []
        for name, _ in sections():
            lines = [f"{key} = {_toml_value(value)}"
                     for key, value in asdict(getattr(self, name)).items() if value is not None]
            if lines:
                blocks.append("\n".join([f"[{name}]", *lines]))
        return "\n\n".join(blocks) + "\n"

    def parameters(self):
        """The run configuration that the workflow takes and every output's provenance
        records (the metrics JSON's ``provenance.parameters``).

        ``n_jobs`` is resolved to a number of workers; ``mem_gb`` stays as given (None:
        the machine's, resolved when the run starts), so that the recorded settings do
        not change with the memory free at the time. ``work_dir``, ``keep_work``,
        ``plugin`` and ``plugin_args`` reach no step and are not recorded.
        """
        qc_limits = DEFAULT_QC_LIMITS
        return {
            "n_jobs": resolve_n_jobs(self.execution.n_jobs),
            "mem_gb": self.execution.mem_gb,
            "dask_scheduler": self.execution.dask_scheduler or None,
            "seed": self.execution.seed,
            "preprocessing": {**asdict(self.preprocessing), **PREPROCESSING_METHODS},
            "tracking": {**asdict(self.tracking), "min_coverage": qc_limits["min_roi_coverage"]},
            "localization": {**DEFAULT_THRESHOLDS, **asdict(self.localization)},
            "prognosis": asdict(self.prognosis),
            "qc": dict(qc_limits),
        }


def sections():
    """(TOML name, section class) of every section of :class:`RunConfig`, in order."""
    return [(f.name, f.type) for f in fields(RunConfig)]


def add_setting_options(parser):
    """Add to ``parser`` an option for every setting, in its group of ``--help``: its
    destination is the setting's key, its default the setting's default."""
    groups = {None: parser}
    for _, section in sections():
        defaults = section()
        for setting_field in fields(section):
            meta = setting_field.metadata
            title = meta.get("group", section.GROUP)
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            default = getattr(defaults, setting_field.name)
            groups[title].add_argument(meta["flag"], dest=setting_field.name, default=default,
                                       help=meta["help"], **_option_kind(setting_field, default))


def _option_kind(setting_field, default):
    """How argparse reads a setting: a switch, or a value (its type, check or parser)."""
    meta = setting_field.metadata
    if _value_type(setting_field) is bool:
        return {"action": "store_false" if default else "store_true"}
    if "parse" in meta:
        convert = meta["parse"]
    elif "check" in meta:
        convert = argparse_type(meta["check"])
    else:
        convert = _value_type(setting_field)
    return {"type": convert, **{key: meta[key] for key in ("choices", "metavar") if key in meta}}


def read_config(path):
    """The settings of a TOML file, as argparse defaults (setting key → value).

    Unknown sections or keys, and values of the wrong type or not allowed, are an input
    error: the file is checked as the command line is.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"The configuration file cannot be read: {exc}", path=path,
                         fix="Write it as TOML; `cst-report --print-config` prints a template.") \
            from exc
    settings = {name: {f.name: f for f in fields(section)} for name, section in sections()}
    defaults = {}
    for section, values in document.items():
        if not isinstance(values, dict):
            raise InputError(f"'{section}' must be a [section].", path=path,
                             fix="`cst-report --print-config` prints a template.")
        for key, value in values.items():
            setting_field = settings.get(section, {}).get(key)
            if setting_field is None:
                known = ", ".join(f"{s}.{k}" for s, keys in settings.items() for k in keys)
                raise InputError(f"Unknown setting '{section}.{key}'.", path=path,
                                 fix=f"Known settings: {known}.")
            defaults[key] = _checked(setting_field, value, f"{section}.{key}", path)
    return defaults


def _checked(setting_field, value, name, path):
    """``value`` of setting ``name`` (section.key) as read from ``path``, checked and
    converted as on the command line."""
    meta = setting_field.metadata
    try:
        if "check" in meta:
            value = meta["check"](value)
        else:
            value = _typed(value, _value_type(setting_field))
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}")
    except ValueError as exc:
        example = (meta.get("example")
                   or f"{setting_field.name} = {_toml_value(setting_field.default)}")
        raise InputError(f"Invalid setting '{name}': {exc}.", path=path,
                         fix=f"Write e.g. {example}.") from exc
    return value


def _value_type(setting_field):
    """The type of a setting's value (``float`` for ``float | None``)."""
    return next(kind for kind in get_args(setting_field.type) or (setting_field.type,)
                if kind is not type(None))


def _typed(value, kind):
    """A TOML ``value`` as a value of type ``kind``; ``ValueError`` if it is not one."""
    accepted = {float: (int, float), Path: str}.get(kind, kind)
    # TOML true and false are ints to Python, and an integer counts as a number.
    if isinstance(value, accepted) and isinstance(value, bool) == (kind is bool):
        return kind(value) if kind in (float, Path) else value
    raise ValueError(f"{value!r} is not {TOML_KINDS[kind]}")


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
