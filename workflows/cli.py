"""Command-line entry points.

``cst-report SUBJECT --bids-dir DIR --out-dir DIR``
    one subject, full report.
``cst-integrity BIDS_DIR OUT_DIR participant|group``
    BIDS-App style batch entry.

Exit codes: 0 all runs reported; 1 internal error; 2 bad input or usage
(nothing computed); 3 reported, but the CST was not assessable in at least
one run (see the QC section of its report); 4 another run is processing the
same subject in the same work directory.
"""

import argparse
import fcntl
import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipeline import __version__
from pipeline.clinical.participants import read_clinical_scores
from pipeline.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_NOT_ASSESSABLE,
    EXIT_OK,
    BusyError,
    CSTError,
    InputError,
)

from .config import RunConfig, add_setting_options, read_config
from .execution import (
    outputs_up_to_date,
    remove_subject_work,
    resolve_mem_gb,
    subject_work_dir,
)

LOG = logging.getLogger("cst")

EPILOG = """\
examples:
  cst-report subject01 --bids-dir demo/bids --out-dir demo/out
  cst-report sub-01 --bids-dir /data/study --out-dir /data/study/derivatives/cst --n-jobs 2
  cst-report --print-config > cst.toml      # edit, then: cst-report ... --config cst.toml

exit codes:
  0  every run reported
  1  internal error (rerun with --debug for the traceback)
  2  bad input or usage: nothing was computed; the message names the file and the fix
  3  reported, but the CST was not assessable in at least one run (see its QC section)
  4  another run is processing the same subject with the same work directory

Research use only, not a medical device.
"""


def _add_common_options(parser):
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file with settings (flags given here override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings as TOML and exit")
    add_setting_options(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Nipype logs")
    parser.add_argument("--version", action="version", version=f"cst-integrity {__version__}")


def _configure_nipype(debug):
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    # loky's resource tracker (a separate process) reports joblib's already-removed
    # memmap folders at exit; the message is noise to users, so children ignore it.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    from nipype import config
    from nipype import logging as nlogging

    config.update_config({
        "execution": {"crashfile_format": "txt", "stop_on_first_crash": True,
                      "remove_unnecessary_outputs": False, "check_version": False,
                      "poll_sleep_duration": 0.05},
        "logging": {"workflow_level": "INFO" if debug else "WARNING",
                    "interface_level": "INFO" if debug else "WARNING"},
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(config)
    if not debug:
        # Nipype reports a failing node (with its traceback) on the console; without --debug
        # the user gets our one-paragraph message instead, and the run log keeps Nipype's.
        nipype_logger = logging.getLogger("nipype")
        nipype_logger.propagate = False
        for handler in nipype_logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.CRITICAL + 1)


def run_subject(subject, bids_dir, out_dir, *, work_dir, parameters, debug=False,
                config_text="", plugin="MultiProc", plugin_args=None, keep_work=False):
    """Validate, run and summarise every DWI run of one subject. Returns the exit code.

    Runs whose outputs are complete and up to date (same inputs, settings and
    software: :func:`workflows.execution.outputs_up_to_date`) are not run
    again. After success the subject's work folder is removed unless
    ``keep_work``; a failed or interrupted run keeps it, so that a rerun resumes.
    ``plugin`` and ``plugin_args`` choose how the Nipype graph runs (see
    :func:`workflows.execution.run_workflow`).
    """
    from pipeline.io.bids import combine_by_session, find_dwi_runs
    from pipeline.io.dwi import load_dwi
    from pipeline.io.outputs import write_dataset_description
    from pipeline.parallel import require_dask

    require_dask(parameters.get("dask_scheduler"))
    runs = find_dwi_runs(bids_dir, subject)
    budget = resolve_mem_gb(parameters.get("mem_gb"))
    for run in runs:  # every input is checked before any work starts
        load_dwi(run.dwi, run.bval, run.bvec,
                 b0_threshold=parameters["preprocessing"]["b0_threshold"],
                 memory_limit_bytes=None if budget is None else int(budget * 2 ** 30),
                 n_jobs=parameters["n_jobs"])
    clinical = read_clinical_scores(bids_dir, runs[0].subject)
    if parameters["preprocessing"]["combine_runs"]:
        runs = combine_by_session(runs)
    label = runs[0].subject
    out_dir = Path(out_dir).resolve()
    work_dir = Path(work_dir).resolve() if work_dir else out_dir / ".cst-work"
    out_dir.mkdir(parents=True, exist_ok=True)
    with subject_lock(work_dir, label), \
            run_log(out_dir / f"sub-{label}" / "log", config_text) as log_prefix:
        write_dataset_description(out_dir, source_dataset=bids_dir)
        pending = [run for run in runs
                   if not outputs_up_to_date(run, out_dir, parameters, clinical)]
        LOG.info("sub-%s: %d diffusion run(s): %s; to compute: %s", label, len(runs),
                 ", ".join(r.stem for r in runs), ", ".join(r.stem for r in pending) or "none")
        if pending:
            _configure_nipype(debug)
            _run_workflow(pending, out_dir, work_dir, parameters, plugin, plugin_args or {},
                          clinical, mem_gb=budget, timings_path=log_prefix.with_name(
                              log_prefix.name + "_steps.tsv"))
        if not keep_work:
            remove_subject_work(work_dir, label)

    exit_code = EXIT_OK
    for run in runs:
        metrics_path = run.derivatives_dir(out_dir) / f"{run.stem}_desc-cst_metrics.json"
        metrics = json.loads(metrics_path.read_text())
        print(_verdict_line(run.stem, metrics))
        if run not in pending:
            print("  (outputs already complete for these inputs and settings: nothing "
                  "recomputed)")
        for notice in metrics["qc"].get("notices", []):
            print(f"  note:    {notice}")
        print(f"  report:  {out_dir / (run.stem + '.html')}")
        print(f"  metrics: {metrics_path}")
        if not metrics["qc"]["assessable"]:
            exit_code = EXIT_NOT_ASSESSABLE
    return exit_code


@contextmanager
def subject_lock(work_dir, label):
    """Hold an exclusive lock on ``sub-<label>`` in ``work_dir`` (released when the process ends,
    even on SIGKILL). A second run of the same subject there is refused, not interleaved.

    The lock file is removed on the way out, while still locked, and so is ``work_dir`` when
    that leaves it empty. A run that opened the file just before then locks a file no longer
    in the folder, so it checks, once locked, that the file it holds is the one at the path,
    and tries again with the new one if not.
    """
    path = Path(work_dir) / f"sub-{label}.lock"
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # another run may have just removed it
        try:
            handle = open(path, "a")
        except FileNotFoundError:  # the folder went between the two lines: make it again
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise BusyError(f"Another run is processing sub-{label} with this work directory.",
                            path=path, fix="Wait for it to finish, or use another --work-dir "
                                           "and --out-dir.") from exc
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(handle.fileno()), current):
            break
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
        try:
            path.parent.rmdir()
        except OSError:  # not empty: a kept work folder, other subjects, the SLURM array's state
            pass


@contextmanager
def run_log(log_dir, config_text):
    """Log this run (ours and Nipype's messages) to ``log_dir/cst-report_<UTC time>.log``,
    with the effective configuration beside it. Yields that common path prefix (for
    further records of the run, e.g. its step timings)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + f"_{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"cst-report_{stamp}.toml").write_text(config_text)
    handler = logging.FileHandler(log_dir / f"cst-report_{stamp}.log")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("", "nipype.workflow", "nipype.interface")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(min(lg.level or logging.INFO, logging.INFO))
    try:
        yield log_dir / f"cst-report_{stamp}"
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _run_workflow(runs, out_dir, work_dir, parameters, plugin, plugin_args, clinical,
                  mem_gb=None, timings_path=None):
    """Build and run the subject's graph. ``mem_gb``: the resolved memory budget (GiB);
    ``timings_path``: where the TSV of its steps (outcome and wall seconds,
    :meth:`_Progress.write_timings`) goes, also after a failure."""
    from workflows.base import init_single_subject_wf
    from workflows.execution import run_workflow

    wf = init_single_subject_wf(runs, out_dir=out_dir, work_dir=work_dir, parameters=parameters,
                                clinical=clinical, mem_gb=mem_gb)
    # In the subject's own folder: found there after a failure even when other subjects
    # share the work directory, and removed with it after a success.
    crash_dir = subject_work_dir(work_dir, runs[0].subject) / "crash"
    wf.config["execution"]["crashdump_dir"] = str(crash_dir)
    progress = _progress_callback(wf)
    try:
        run_workflow(wf, plugin=plugin, plugin_args=plugin_args, n_procs=parameters["n_jobs"],
                     memory_gb=mem_gb, status_callback=progress)
    except RuntimeError as exc:
        crash = sorted(crash_dir.glob("crash-*.txt"), key=os.path.getmtime)
        input_error = _input_error_in(crash[-1]) if crash else None
        if input_error is not None:  # a check inside a node (e.g. the gradient table) refused
            raise input_error from exc
        detail = _crash_summary(crash[-1]) if crash else str(exc)
        raise CSTError(f"Processing sub-{runs[0].subject} failed: {detail}",
                       path=crash[-1] if crash else None,
                       fix="Rerun with --debug for the full log; a rerun resumes from the "
                           "work directory.") from exc
    finally:
        progress.close()
        if timings_path is not None:
            progress.write_timings(timings_path)
    LOG.info("sub-%s: %d step(s) computed, %d reused from the work directory",
             runs[0].subject, len(progress.computed), len(progress.cached))


class _Progress:
    """Nipype status callback: a progress bar on a terminal; in the log, one line per step
    saying whether it was computed, taken from the cache ("cached") or failed.

    Attributes
    ----------
    computed, cached : list of str
        Full names of the steps computed, and of those taken from the cache, so far.
    steps : list of (str, str, float or None)
        Each finished step: full name, outcome, wall seconds from its start to its end as
        the scheduler saw them (None for a cached step that the scheduler never started).
    """

    def __init__(self, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="cst-report",
                        disable=not sys.stderr.isatty(), leave=False)
        self.steps = []
        self._will_compute, self._started = {}, {}

    @property
    def computed(self):
        return [name for name, outcome, _ in self.steps if outcome == "computed"]

    @property
    def cached(self):
        return [name for name, outcome, _ in self.steps if outcome == "cached"]

    def __call__(self, node, status):
        if status == "start":
            self.bar.set_postfix_str(node.name)
            self._will_compute[node.fullname] = _will_compute(node)
            self._started[node.fullname] = time.monotonic()
        elif status in ("end", "exception"):
            # MultiProc and SLURM report a step they find in the cache as ended, never
            # started (as they would a run_without_submitting step, which this graph does not
            # have); Linear starts every step, and runs from the cache what it can.
            if status == "exception":
                outcome = "FAILED"
            elif self._will_compute.pop(node.fullname, False):
                outcome = "computed"
            else:
                outcome = "cached"
            started = self._started.pop(node.fullname, None)
            seconds = None if started is None else round(time.monotonic() - started, 2)
            self.steps.append((node.fullname, outcome, seconds))
            LOG.info("step %s: %s", node.fullname, outcome)
            self.bar.update(1)

    def close(self):
        self.bar.close()

    def write_timings(self, path):
        """The finished steps as a TSV (step, outcome, seconds; ``n/a`` when unknown)."""
        from pipeline.io.outputs import atomic_path

        rows = ["step\toutcome\tseconds"] + [
            f"{name}\t{outcome}\t{'n/a' if seconds is None else seconds}"
            for name, outcome, seconds in self.steps]
        with atomic_path(path) as tmp:
            Path(tmp).write_text("\n".join(rows) + "\n")


def _will_compute(node):
    """Whether ``node.run()`` computes (True) or takes its result from the cache (False).

    Mirrors the test in Nipype's ``Node.run``: an up-to-date cached result is used
    unless the node always runs (``overwrite``).
    """
    if node.overwrite or (node.overwrite is None and node.interface.always_run):
        return True
    try:
        cached, updated = node.is_cached()
    except Exception:  # Nipype itself then reruns the node (plugins.base._local_hash_check)
        return True
    return not (cached and updated)


def _progress_callback(wf):
    steps = [n for n in wf.list_node_names() if not n.endswith(("inputnode", "outputnode"))]
    return _Progress(len(steps))


def _input_error_in(crash_file):
    """The InputError a node raised, rebuilt from its crash file (None if it was not one)."""
    lines = Path(crash_file).read_text().splitlines()
    starts = [i for i, ln in enumerate(lines) if "InputError: " in ln]
    if not starts:
        return None
    message = lines[starts[-1]].split("InputError: ", 1)[1].strip()
    details = {}
    for ln in lines[starts[-1] + 1:starts[-1] + 3]:
        key, _, value = ln.strip().partition(":")
        if key in ("file", "fix"):
            details[key] = value.strip()
    return InputError(message, path=details.get("file"), fix=details.get("fix"))


def _crash_summary(crash_file):
    lines = [ln for ln in Path(crash_file).read_text().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return errors[-1].strip() if errors else lines[-1].strip()


def _verdict_line(stem, metrics):
    loc = metrics["localization"]
    if not metrics["qc"]["assessable"]:
        return f"{stem}: NOT ASSESSABLE — " + "; ".join(metrics["qc"]["warnings"])
    if loc["umn_damage"]:
        x, y, z = loc["peak_ras_mm"]
        return (f"{stem}: UMN damage shows along the {loc['affected_side']} CST at the "
                f"{loc['level']} (peak x={x:.0f}, y={y:.0f}, z={z:.0f} mm RAS; "
                f"{loc['confidence']} confidence)")
    return f"{stem}: no imaging evidence of UMN damage along either CST"


def _run_guarded(function, debug):
    """Run ``function``; turn errors into a message and an exit code (traceback with --debug)."""
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if debug else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, handlers=[console])
    try:
        return function()
    except CSTError as exc:
        if debug:
            traceback.print_exc()
        kind = "input error" if isinstance(exc, InputError) else "error"
        print(f"cst-integrity: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cst-integrity: interrupted; a rerun resumes from the work directory.",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except Exception as exc:  # the last line of defence: no raw traceback for users
        if debug:
            traceback.print_exc()
        print(f"cst-integrity: internal error: {type(exc).__name__}: {exc}\n"
              "  Rerun with --debug for the traceback.", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def cst_report_parser():
    parser = argparse.ArgumentParser(
        prog="cst-report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reconstruct both corticospinal tracts from a subject's diffusion MRI, "
                    "measure their integrity, localise upper-motor-neuron damage and write "
                    "a report (BIDS in, BIDS-Derivatives out).", epilog=EPILOG)
    parser.add_argument("subject", nargs="?", help="subject label, with or without 'sub-'")
    parser.add_argument("--bids-dir", type=Path, help="BIDS dataset root (required)")
    parser.add_argument("--out-dir", type=Path,
                        help="output (BIDS-Derivatives) directory (required)")
    _add_common_options(parser)
    return parser


def parse_args(parser, argv):
    """Parse ``argv``; settings from ``--config`` become defaults that flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_config(known.config))
    return parser.parse_args(argv)


def _cst_report(parser, argv):
    args = parse_args(parser, argv)
    config = RunConfig.from_args(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return EXIT_OK
    if args.subject is None or args.bids_dir is None or args.out_dir is None:
        parser.error("SUBJECT, --bids-dir and --out-dir are required")
    return _run_configured(args.subject, args.bids_dir, args.out_dir, config, args.debug)


def _run_configured(subject, bids_dir, out_dir, config, debug):
    """:func:`run_subject` with the settings of ``config`` (a :class:`RunConfig`)."""
    execution = config.execution
    return run_subject(subject, bids_dir, out_dir, work_dir=execution.work_dir,
                       parameters=config.parameters(), debug=debug,
                       config_text=config.to_toml(), plugin=execution.plugin,
                       plugin_args=execution.plugin_args, keep_work=execution.keep_work)


def cst_report_main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(_run_guarded(lambda: _cst_report(cst_report_parser(), argv), "--debug" in argv))


def bids_app_parser():
    parser = argparse.ArgumentParser(
        prog="cst-integrity", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="BIDS-App entry: CST integrity for every (or the listed) participant, "
                    "or a group table.", epilog=EPILOG.replace(
                        "cst-report subject01 --bids-dir demo/bids --out-dir demo/out",
                        "cst-integrity demo/bids demo/out participant").replace(
                        "cst-report sub-01 --bids-dir /data/study --out-dir "
                        "/data/study/derivatives/cst --n-jobs 2",
                        "cst-integrity /data/study /data/study/derivatives/cst group"))
    parser.add_argument("bids_dir", type=Path, nargs="?", help="BIDS dataset root")
    parser.add_argument("output_dir", type=Path, nargs="?",
                        help="output (BIDS-Derivatives) directory")
    parser.add_argument("analysis_level", nargs="?", choices=("participant", "group"))
    # --participant_label: the spelling of the BIDS-Apps specification.
    parser.add_argument("--participant-label", "--participant_label", nargs="+",
                        metavar="LABEL",
                        help="participants to process (default: all in the dataset)")
    _add_common_options(parser)
    return parser


def run_bids_app(parser, argv):
    from pipeline.io.bids import normalize_subject_label

    args = parse_args(parser, argv)
    config = RunConfig.from_args(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return EXIT_OK
    if args.analysis_level is None:
        parser.error("BIDS_DIR, OUTPUT_DIR and ANALYSIS_LEVEL (participant|group) are required")
    if not args.bids_dir.is_dir():
        raise InputError("The BIDS directory does not exist.", path=args.bids_dir,
                         fix="Pass the dataset root as the first argument.")
    if args.analysis_level == "group":
        from pipeline.tractometry.group import run_group_level

        written = run_group_level(args.output_dir, args.bids_dir)
        print(f"group table: {written['table']}")
        if written["norms"] is None:
            print(f"norms:       none ({written['n_controls']} assessable control run(s); "
                  "participants.tsv column 'group' = 'control' marks controls)")
        else:
            print(f"norms:       {written['norms']} ({written['n_controls']} control runs; "
                  f"{len(written['compared'])} other run(s) compared)")
        print(f"group page:  {written['html']}")
        return EXIT_OK
    labels = ([normalize_subject_label(s) for s in args.participant_label]
              if args.participant_label else
              sorted(p.name[4:] for p in args.bids_dir.glob("sub-*") if p.is_dir()))
    if not labels:
        raise InputError("No participants (sub-*) in the BIDS directory.", path=args.bids_dir,
                         fix="Point at a BIDS dataset root.")
    codes = []
    for label in labels:
        try:
            codes.append(_run_configured(label, args.bids_dir, args.output_dir, config,
                                         args.debug))
        except CSTError as exc:  # one bad participant does not stop the batch
            print(f"cst-integrity: sub-{label}: {exc}", file=sys.stderr)
            codes.append(exc.exit_code)
    failures = [c for c in codes if c not in (EXIT_OK, EXIT_NOT_ASSESSABLE)]
    return max(failures) if failures else max(codes)


def bids_app_main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(_run_guarded(lambda: run_bids_app(bids_app_parser(), argv), "--debug" in argv))
