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
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from pipeline.errors import (EXIT_INTERNAL_ERROR, EXIT_NOT_ASSESSABLE, EXIT_OK, BusyError,
                             CSTError, InputError)

from .config import format_config, read_config

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
    parser.add_argument("--work-dir", type=Path, help="Nipype working directory (cache; a "
                        "rerun resumes from it). Default: OUT_DIR/.cst-work")
    parser.add_argument("--n-jobs", type=int, default=1, metavar="N",
                        help="parallel workers for denoising and tracking (default 1); "
                             "results do not depend on it")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed for seed placement (default 0)")
    g = parser.add_argument_group("preprocessing")
    g.add_argument("--b0-threshold", type=float, default=50.0, metavar="B",
                   help="b-values <= B s/mm² are b0 (default 50)")
    g.add_argument("--denoise", choices=("mppca", "patch2self", "none"), default="mppca",
                   help="denoising method (default mppca)")
    g = parser.add_argument_group("tracking")
    g.add_argument("--fa-stop", type=float, default=0.2, help="stop tracking below this FA "
                   "(default 0.2)")
    g.add_argument("--max-angle", type=float, default=45.0, help="max turn per step, degrees "
                   "(default 45)")
    g.add_argument("--step-mm", type=float, default=0.5, help="step size, mm (default 0.5)")
    g.add_argument("--seeds-per-voxel", type=int, default=10,
                   help="seeds per voxel of the CST ROIs (default 10)")
    g = parser.add_argument_group("detection and prognosis")
    g.add_argument("--node-ai", type=float, default=0.10,
                   help="|AI| at a profile node counted as asymmetric (default 0.10)")
    g.add_argument("--min-nodes", type=int, default=6,
                   help="consecutive asymmetric nodes for a finding (default 6)")
    g.add_argument("--segment-mean-ai", type=float, default=0.20,
                   help="mean |AI| over those nodes for a finding (default 0.20)")
    g.add_argument("--prep-plic-ai", type=float, default=0.25,
                   help="PREP cut-off on PLIC FA asymmetry (Stinear 2012; default 0.25)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Nipype logs")
    parser.add_argument("--version", action="version", version=f"cst-integrity {__version__}")


def build_parameters(args):
    """The run configuration recorded in every output's provenance."""
    from pipeline.localization import DEFAULT_THRESHOLDS
    from pipeline.steps import DEFAULT_QC_LIMITS

    return {
        "n_jobs": int(args.n_jobs),
        "seed": int(args.seed),
        "preprocessing": {"b0_threshold": args.b0_threshold, "denoise": args.denoise,
                          "brain_mask": "median_otsu(median_radius=2, numpass=1)",
                          "tensor_fit": "WLS"},
        "tracking": {"fa_stop": args.fa_stop, "max_angle_deg": args.max_angle,
                     "step_mm": args.step_mm, "seeds_per_voxel": args.seeds_per_voxel,
                     "min_coverage": DEFAULT_QC_LIMITS["min_roi_coverage"]},
        "localization": {**DEFAULT_THRESHOLDS, "node_ai": args.node_ai,
                         "min_nodes": args.min_nodes, "segment_mean_ai": args.segment_mean_ai},
        "prognosis": {"prep_plic_ai": args.prep_plic_ai},
        "qc": dict(DEFAULT_QC_LIMITS),
    }


def _configure_nipype(work_dir, debug):
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    # loky's resource tracker (a separate process) reports joblib's already-removed
    # memmap folders at exit; the message is noise to users, so children ignore it.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    from nipype import config, logging as nlogging

    config.update_config({
        "execution": {"crashdump_dir": str(Path(work_dir) / "crash"), "crashfile_format": "txt",
                      "stop_on_first_crash": True, "remove_unnecessary_outputs": False,
                      "check_version": False, "poll_sleep_duration": 0.05},
        "logging": {"workflow_level": "INFO" if debug else "WARNING",
                    "interface_level": "INFO" if debug else "WARNING"},
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(config)


def run_subject(subject, bids_dir, out_dir, *, work_dir, parameters, debug=False,
                config_text=""):
    """Validate, run and summarise every DWI run of one subject. Returns the exit code."""
    from pipeline.bids import find_dwi_runs
    from pipeline.dwi import load_dwi
    from pipeline.outputs import write_dataset_description

    runs = find_dwi_runs(bids_dir, subject)
    for run in runs:  # every input is checked before any work starts
        load_dwi(run.dwi, run.bval, run.bvec,
                 b0_threshold=parameters["preprocessing"]["b0_threshold"])
    label = runs[0].subject
    out_dir = Path(out_dir).resolve()
    work_dir = Path(work_dir).resolve() if work_dir else out_dir / ".cst-work"
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    with subject_lock(work_dir, label), run_log(out_dir / f"sub-{label}" / "log", config_text):
        write_dataset_description(out_dir, source_dataset=bids_dir)
        _configure_nipype(work_dir, debug)
        LOG.info("sub-%s: %d diffusion run(s): %s", label, len(runs),
                 ", ".join(r.dwi.name for r in runs))
        _run_workflow(runs, out_dir, work_dir, parameters)

    exit_code = EXIT_OK
    for run in runs:
        metrics_path = run.derivatives_dir(out_dir) / f"{run.stem}_desc-cst_metrics.json"
        metrics = json.loads(metrics_path.read_text())
        print(_verdict_line(run.stem, metrics))
        print(f"  report:  {out_dir / (run.stem + '.html')}")
        print(f"  metrics: {metrics_path}")
        if not metrics["qc"]["assessable"]:
            exit_code = EXIT_NOT_ASSESSABLE
    return exit_code


@contextmanager
def subject_lock(work_dir, label):
    """Hold an exclusive lock on ``sub-<label>`` in ``work_dir`` (released when the process ends,
    even on SIGKILL). A second run of the same subject there is refused, not interleaved."""
    path = Path(work_dir) / f"sub-{label}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BusyError(f"Another run is processing sub-{label} with this work directory.",
                            path=path, fix="Wait for it to finish, or use another --work-dir "
                                           "and --out-dir.") from exc
        yield


@contextmanager
def run_log(log_dir, config_text):
    """Log this run (ours and Nipype's messages) to ``log_dir/cst-report_<UTC time>.log``,
    with the effective configuration beside it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"_{os.getpid()}"
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
        yield
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _run_workflow(runs, out_dir, work_dir, parameters):
    from workflows.base import init_single_subject_wf

    wf = init_single_subject_wf(runs, out_dir=out_dir, work_dir=work_dir, parameters=parameters)
    n_procs = max(1, parameters["n_jobs"])
    progress = _progress_callback(wf)
    try:
        wf.run(plugin="MultiProc", plugin_args={"n_procs": n_procs, "raise_insufficient": False,
                                                "status_callback": progress})
    except RuntimeError as exc:
        crash = sorted((work_dir / "crash").glob("crash-*.txt"), key=os.path.getmtime)
        detail = _crash_summary(crash[-1]) if crash else str(exc)
        raise CSTError(f"Processing sub-{runs[0].subject} failed: {detail}",
                       path=crash[-1] if crash else None,
                       fix="Rerun with --debug for the full log; a rerun resumes from the "
                           "work directory.") from exc
    finally:
        progress.close()


class _Progress:
    """Nipype status callback: a progress bar on a terminal, log lines otherwise."""

    def __init__(self, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="cst-report",
                        disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, node, status):
        if status == "start":
            self.bar.set_postfix_str(node.name)
        elif status in ("end", "exception"):
            LOG.info("step %s: %s", node.fullname, "done" if status == "end" else "FAILED")
            self.bar.update(1)

    def close(self):
        self.bar.close()


def _progress_callback(wf):
    steps = [n for n in wf.list_node_names() if not n.endswith(("inputnode", "outputnode"))]
    return _Progress(len(steps))


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
    if args.print_config:
        print(format_config(args), end="")
        return EXIT_OK
    if args.subject is None or args.bids_dir is None or args.out_dir is None:
        parser.error("SUBJECT, --bids-dir and --out-dir are required")
    return run_subject(args.subject, args.bids_dir, args.out_dir, work_dir=args.work_dir,
                       parameters=build_parameters(args), debug=args.debug,
                       config_text=format_config(args))


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
    parser.add_argument("--participant-label", nargs="+", metavar="LABEL",
                        help="participants to process (default: all in the dataset)")
    _add_common_options(parser)
    return parser


def run_bids_app(parser, argv):
    from pipeline.bids import normalize_subject_label

    args = parse_args(parser, argv)
    if args.print_config:
        print(format_config(args), end="")
        return EXIT_OK
    if args.analysis_level is None:
        parser.error("BIDS_DIR, OUTPUT_DIR and ANALYSIS_LEVEL (participant|group) are required")
    if not args.bids_dir.is_dir():
        raise InputError("The BIDS directory does not exist.", path=args.bids_dir,
                         fix="Pass the dataset root as the first argument.")
    if args.analysis_level == "group":
        from pipeline.group import write_group_table

        path = write_group_table(args.output_dir)
        print(f"group table: {path}")
        return EXIT_OK
    labels = ([normalize_subject_label(s) for s in args.participant_label]
              if args.participant_label else
              sorted(p.name[4:] for p in args.bids_dir.glob("sub-*") if p.is_dir()))
    if not labels:
        raise InputError("No participants (sub-*) in the BIDS directory.", path=args.bids_dir,
                         fix="Point at a BIDS dataset root.")
    parameters = build_parameters(args)
    codes = []
    for label in labels:
        try:
            codes.append(run_subject(label, args.bids_dir, args.output_dir,
                                     work_dir=args.work_dir, parameters=parameters,
                                     debug=args.debug, config_text=format_config(args)))
        except CSTError as exc:  # one bad participant does not stop the batch
            print(f"cst-integrity: sub-{label}: {exc}", file=sys.stderr)
            codes.append(exc.exit_code)
    failures = [c for c in codes if c not in (EXIT_OK, EXIT_NOT_ASSESSABLE)]
    return max(failures) if failures else max(codes)


def bids_app_main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(_run_guarded(lambda: run_bids_app(bids_app_parser(), argv), "--debug" in argv))
