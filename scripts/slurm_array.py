#!/usr/bin/env python3
"""Submit a whole BIDS dataset to SLURM as one job array: one task per participant.

Each task runs ``cst-integrity BIDS_DIR OUTPUT_DIR participant --participant-label L``
(all DWI runs of that participant, each reported separately), natively or inside
an Apptainer image, and records its exit code in ``STATE_DIR/exit/sub-L``.
Running the same command again submits only what is not finished: participants
whose task failed, was cancelled, ran out of time or memory, or never ran. A
finished participant (exit 0, or 3: reported but not assessable) is skipped, and
so is a refused input (exit 2: rerunning cannot help; fix it, then ``--force``).
Resubmitted tasks resume from the Nipype cache in the work directory.

Only the Python standard library is needed, so the script also runs on a login
node where the pipeline itself lives in an Apptainer image. Where this Python can
import the pipeline (its environment is active), each task asks by default for
the memory the pipeline estimates for the largest series it is given
(:func:`estimated_task_memory`); elsewhere for 8G.

Examples::

    # every participant, 2 cores and 8 GiB each, at most 20 at a time
    python3 scripts/slurm_array.py /data/study /data/study/derivatives/cst \\
        --cpus 2 --mem 8G --time 2:00:00 --max-parallel 20
    # the same with the Apptainer image, and one automatic resubmission of failures
    python3 scripts/slurm_array.py /data/study /data/study/derivatives/cst \\
        --apptainer cst.sif --retries 1
    # see what would be submitted; options after -- go to cst-integrity
    python3 scripts/slurm_array.py /data/study /data/out --dry-run -- --seed 1
"""

import argparse
import math
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

JOB_NAME = "cst-integrity"
#: Exit codes of cst-integrity after which a participant is not resubmitted.
FINISHED = {0: "done", 3: "done (not assessable)"}
BAD_INPUT = 2
#: Memory per task without --mem where the pipeline's estimate cannot be made here.
FALLBACK_MEM = "8G"
#: What a task asks for beyond the pipeline's estimate, which bounds the run's Python
#: processes (pipeline/memory.py): SLURM counts the batch shell and the page cache of the
#: files the run writes against --mem too (bytes).
MEM_MARGIN_BYTES = 2 ** 30


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Options after -- are passed to "
        "cst-integrity (e.g. -- --seed 1 --denoise patch2self).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--participant-label", nargs="+", metavar="LABEL",
                        help="participants to process (default: every sub-* in BIDS_DIR)")
    parser.add_argument("--work-dir", type=Path,
                        help="Nipype work directory shared by the tasks (default "
                             "OUTPUT_DIR/.cst-work); must be on a shared filesystem")
    parser.add_argument("--state-dir", type=Path,
                        help="task lists, batch scripts, logs and exit codes "
                             "(default WORK_DIR/slurm-array)")
    resources = parser.add_argument_group("resources per task")
    resources.add_argument("--cpus", type=int, default=2,
                           help="cores (--cpus-per-task; also cst-integrity --n-jobs; default 2)")
    resources.add_argument("--mem", help="memory (--mem; default: the pipeline's estimate for "
                                         "the largest series submitted, with --cpus workers, "
                                         "plus 1 GiB, in whole GiB; 8G where this Python "
                                         "cannot import the pipeline)")
    resources.add_argument("--time", default="02:00:00", help="wall time (--time; default 2 h)")
    resources.add_argument("--partition", help="partition (--partition)")
    resources.add_argument("--account", help="account (--account)")
    resources.add_argument("--max-parallel", type=int, metavar="N",
                           help="at most N tasks at a time (--array=...%%N)")
    resources.add_argument("--sbatch-args", default="",
                           help='more sbatch options, e.g. "--qos=short --constraint=avx2"')
    runtime = parser.add_mutually_exclusive_group()
    runtime.add_argument("--apptainer", type=Path, metavar="SIF",
                         help="run cst-integrity from this Apptainer image")
    runtime.add_argument("--cst-integrity", metavar="PATH",
                         help="the cst-integrity executable (default: the one on PATH)")
    parser.add_argument("--retries", type=int, default=0, metavar="N",
                        help="after the array ends, resubmit its failed tasks up to N times "
                             "(a small follow-up job runs this script again)")
    parser.add_argument("--force", action="store_true",
                        help="submit the selected participants even if finished or refused")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the batch script; submit nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    for name in ("bids_dir", "output_dir", "work_dir", "state_dir", "apptainer"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.work_dir = args.work_dir or args.output_dir / ".cst-work"
    args.state_dir = args.state_dir or args.work_dir / "slurm-array"
    return args


def participants(bids_dir, labels):
    """Bare participant labels: the given ones, or every ``sub-*`` folder of the dataset."""
    if labels:
        return [label[4:] if label.startswith("sub-") else label for label in labels]
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def recorded_exit_code(state_dir, label):
    """The exit code the last task of ``label`` recorded; None if none finished."""
    path = state_dir / "exit" / f"sub-{label}"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def plan(args, labels):
    """Split the participants into those to submit and those to skip (with the reason)."""
    submit, skipped = [], {}
    for label in labels:
        code = recorded_exit_code(args.state_dir, label)
        if not args.force and code in FINISHED:
            skipped[label] = FINISHED[code]
        elif not args.force and code == BAD_INPUT:
            skipped[label] = "input refused (exit 2): fix it, then rerun with --force"
        else:
            submit.append(label)
    return submit, skipped


def estimated_task_memory(args, labels):
    """The ``--mem`` of a task when none is given: the memory cst-integrity estimates for the
    largest series of the participants ``labels`` (:func:`pipeline.memory.estimated_memory_bytes`,
    as its up-front check does) with ``--cpus`` workers and the options after ``--``, plus
    :data:`MEM_MARGIN_BYTES`, rounded up to whole GiB (e.g. ``"3G"``).

    Returns None where there is no estimate: this Python cannot import the pipeline (the
    script itself needs only the standard library), or no series of ``labels`` is readable
    (their tasks then stop with cst-integrity's message).
    """
    try:
        from nibabel.filebasedimages import ImageFileError

        from pipeline.errors import InputError
        from pipeline.io.bids import combine_by_session, find_dwi_runs
        from pipeline.memory import estimated_memory_bytes, series_header
        from workflows.cli import bids_app_parser, parse_args
        from workflows.config import RunConfig
    except ImportError:
        return None
    # The settings the tasks run with (e.g. --combine-runs, --mem-gb, --config).
    parameters = RunConfig.from_args(parse_args(bids_app_parser(), args.extra)).parameters()
    budget = None if parameters["mem_gb"] is None else int(parameters["mem_gb"] * 2 ** 30)
    estimates = []
    for label in labels:
        try:
            runs = find_dwi_runs(args.bids_dir, label)
        except InputError:
            continue
        if parameters["preprocessing"]["combine_runs"]:
            runs = combine_by_session(runs)
        for run in runs:
            try:
                shape, input_itemsize = series_header(list(getattr(run, "runs", [run])))
            except (OSError, ImageFileError, IndexError):  # unreadable, or not a 4D series
                continue
            estimates.append(estimated_memory_bytes(shape, input_itemsize=input_itemsize,
                                                    n_jobs=args.cpus, memory_bytes=budget))
    if not estimates:
        return None
    return f"{math.ceil((max(estimates) + MEM_MARGIN_BYTES) / 2 ** 30)}G"


def pipeline_command(args):
    """The command a task runs, up to (not including) the participant label."""
    if args.apptainer:
        binds = [f"{args.bids_dir}:{args.bids_dir}:ro", f"{args.output_dir}:{args.output_dir}"]
        if not args.work_dir.is_relative_to(args.output_dir):
            binds.append(f"{args.work_dir}:{args.work_dir}")
        command = ["apptainer", "run", "--cleanenv"]
        for bind in binds:
            command += ["-B", bind]
        command.append(str(args.apptainer))
    else:
        executable = args.cst_integrity or shutil.which("cst-integrity")
        if executable is None:
            sys.exit("slurm_array.py: cst-integrity is not on PATH; activate its environment, "
                     "or pass --cst-integrity PATH or --apptainer SIF")
        command = [str(Path(executable).resolve())]
    return command + [str(args.bids_dir), str(args.output_dir), "participant",
                      "--work-dir", str(args.work_dir), *args.extra]


def batch_script(args, task_list, n_tasks):
    """The sbatch script of the array: task i processes line i of ``task_list``."""
    array = f"1-{n_tasks}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    directives = [f"--job-name={JOB_NAME}", f"--array={array}",
                  f"--cpus-per-task={args.cpus}", f"--mem={args.mem}", f"--time={args.time}",
                  f"--output={args.state_dir / 'logs' / '%A_%a.out'}"]
    directives += [f"--partition={args.partition}"] * bool(args.partition)
    directives += [f"--account={args.account}"] * bool(args.account)
    command = shlex.join(pipeline_command(args))
    exit_dir = shlex.quote(str(args.state_dir / "exit"))
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        f'label=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(task_list))})',
        'echo "sub-$label: array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} '
        'on $(hostname)"',
        f'{command} --participant-label "$label" --n-jobs "${{SLURM_CPUS_PER_TASK:-1}}"',
        "code=$?",
        f'echo "$code" > {exit_dir}/"sub-$label"',
        "# 3 = reported but not assessable: the task did its work",
        'if [ "$code" -eq 3 ]; then exit 0; fi',
        'exit "$code"',
        "",
    ])


def sbatch(arguments):
    """Submit with ``sbatch --parsable``; return the job id."""
    result = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"slurm_array.py: sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def still_queued(state_dir):
    """Id of this state directory's last array if SLURM still lists tasks of it."""
    last = state_dir / "last_array_job"
    if not last.exists() or shutil.which("squeue") is None:
        return None
    job_id = last.read_text().strip()
    result = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return job_id if result.returncode == 0 and result.stdout.strip() else None


def resubmission_arguments(args, argv):
    """This script's arguments for the follow-up job: same selection, one retry fewer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[:argv.index("--")] if "--" in argv else argv
    kept, skip = [], False
    for item in own:
        if skip:
            skip = False
        elif item == "--retries":
            skip = True
        elif not item.startswith("--retries="):
            kept.append(item)
    extra = ["--", *args.extra] if args.extra else []
    return [*kept, "--retries", str(args.retries - 1), *extra]


def main(argv=None):
    args = parse_arguments(argv)
    labels = participants(args.bids_dir, args.participant_label)
    if not labels:
        sys.exit(f"slurm_array.py: no participants (sub-*) in {args.bids_dir}")
    submit, skipped = plan(args, labels)
    for label, reason in skipped.items():
        print(f"sub-{label}: {reason}")
    if not submit:
        print("nothing to submit")
        return 0
    if args.mem is None:
        args.mem = estimated_task_memory(args, submit)
        if args.mem is None:
            args.mem = FALLBACK_MEM
            print(f"memory per task: {args.mem} (no estimate: this Python cannot import the "
                  "pipeline, or reads no series; --mem sets it)")
        else:
            print(f"memory per task: {args.mem} (the pipeline's estimate for the largest "
                  "series, with a margin; --mem sets it)")
    running = None if args.dry_run else still_queued(args.state_dir)
    if running:
        sys.exit(f"slurm_array.py: array job {running} of {args.state_dir} is still queued or "
                 "running; wait for it (squeue) or cancel it (scancel) first")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    task_list = args.state_dir / f"tasks-{stamp}.txt"
    script = batch_script(args, task_list, len(submit))
    if args.dry_run:
        print(f"would submit {len(submit)} task(s): " + " ".join(f"sub-{s}" for s in submit))
        print(script)
        return 0
    for folder in ("exit", "logs"):
        (args.state_dir / folder).mkdir(parents=True, exist_ok=True)
    for label in submit:  # a stale code must not mark a killed resubmission as finished
        (args.state_dir / "exit" / f"sub-{label}").unlink(missing_ok=True)
    task_list.write_text("".join(f"{label}\n" for label in submit))
    script_path = args.state_dir / f"array-{stamp}.sh"
    script_path.write_text(script)
    job_id = sbatch([*shlex.split(args.sbatch_args), str(script_path)])
    (args.state_dir / "last_array_job").write_text(job_id + "\n")
    print(f"submitted array job {job_id}: {len(submit)} task(s), logs in "
          f"{args.state_dir / 'logs'}")
    if args.retries > 0:
        follow_up = shlex.join([sys.executable, str(Path(__file__).resolve()),
                                *resubmission_arguments(args, argv)])
        retry_id = sbatch([f"--dependency=afterany:{job_id}", f"--job-name={JOB_NAME}-retry",
                           "--cpus-per-task=1", "--mem=1G", "--time=00:10:00",
                           f"--output={args.state_dir / 'logs' / 'retry-%j.out'}",
                           *shlex.split(args.sbatch_args), f"--wrap={follow_up}"])
        print(f"submitted follow-up job {retry_id}: resubmits failed tasks when {job_id} ends "
              f"({args.retries} retr{'y' if args.retries == 1 else 'ies'} left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
