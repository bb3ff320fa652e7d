#!/usr/bin/env python3
"""Wall time and peak memory of each pipeline stage on one real subject.

Every stage of :mod:`pipeline.steps` runs in its own freshly spawned Python
process, so the peak resident set size reported for it is that stage's alone
(imports included), not the high-water mark of everything run before it. The
stages hand their outputs to each other as files in a temporary work folder,
exactly as the Nipype workflow does.

Reported per stage:

``wall s``
    time spent inside the stage function (imports and process start excluded;
    those are in the JSON as ``process_s``).
``peak RSS MiB (self)``
    ``getrusage(RUSAGE_SELF).ru_maxrss`` of the stage process.
``peak RSS MiB (workers)``
    ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the stage process after the
    joblib (loky) workers were shut down and reaped: the largest single worker;
    ``-`` when the stage started no child process (importing DIPY runs a short
    helper subprocess; ``rss_children_before_stage_mib`` in the JSON).
    Linux carries a parent's high-water mark into a child over fork/vfork+exec,
    so this is at least the stage process's RSS at the moment the workers were
    started. ``workers_vmhwm_mib`` in the JSON is the workers' own peak
    (``VmHWM`` of /proc/PID/status, sampled every 0.1 s), free of that effect.

Then the ``cst-report`` command runs once end to end on the same subject
(``--no-with-cli`` to skip), under ``/usr/bin/time -v`` when present, else
measured with ``os.wait4``.

Usage (from the repository root)::

    python benchmarks/bench_stages.py                      # ../shared/data/bids, philips01
    python benchmarks/bench_stages.py --subject siemens01 --n-jobs 1 --out bench.json

This script imports only the standard library at module level, so the driver
process stays small and cannot inflate the children's numbers.
"""

import argparse
import datetime
import glob
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("brain_mask", "denoise", "remove_gibbs", "correct_motion", "detect_outliers",
          "fit_tensor", "check_gradients", "collect_preprocessing_qc", "register_atlas",
          "track_cst", "tract_profiles", "assess")
#: The default preprocessing chain (up to the tensor fit), timed as one total as well.
PREPROCESSING = STAGES[:5]
MIB = 1024.0  # ru_maxrss and VmHWM are in KiB on Linux


# --------------------------------------------------------------------------- child side

def _descendants(pid):
    """PIDs of all live descendants of ``pid`` (from /proc)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _vmhwm_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _WorkerSampler(threading.Thread):
    """Largest VmHWM seen among this process's descendants (the joblib workers)."""

    def __init__(self, interval=0.1):
        super().__init__(daemon=True)
        self.interval, self.peak_kib, self.n_workers = interval, 0, set()
        self._stop_event = threading.Event()

    def run(self):
        me = os.getpid()
        while not self._stop_event.wait(self.interval):
            for pid in _descendants(me):
                self.n_workers.add(pid)
                self.peak_kib = max(self.peak_kib, _vmhwm_kib(pid))

    def stop(self):
        self._stop_event.set()
        self.join()


def _run_stage(stage, args, kwargs, conn):
    """Body of a stage process: run ``pipeline.steps.<stage>`` and report back."""
    t_process = time.perf_counter()
    try:
        sys.path.insert(0, str(REPO_ROOT))
        from pipeline import steps

        function = getattr(steps, stage)
        # Importing DIPY runs a short helper subprocess: the children's high-water mark
        # before the stage tells whether the stage itself started any child process.
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / MIB
        sampler = _WorkerSampler()
        sampler.start()
        t0 = time.perf_counter()
        result = function(*args, **kwargs)
        wall = time.perf_counter() - t0
        sampler.stop()
        try:  # reap idle loky workers, if any, so RUSAGE_CHILDREN counts them
            from joblib.externals.loky import reusable_executor
            if reusable_executor._executor is not None:  # never create one just to stop it
                reusable_executor._executor.shutdown(wait=True)
        except Exception:
            pass
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / MIB
        spawned = bool(sampler.n_workers) or children_after > children_before
        conn.send({
            "ok": True, "result": result, "wall_s": wall,
            "process_s": time.perf_counter() - t_process,
            "rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB,
            "rss_workers_mib": children_after if spawned else None,
            "rss_children_before_stage_mib": children_before,
            "workers_vmhwm_mib": sampler.peak_kib / MIB,
            "n_workers": len(sampler.n_workers),
        })
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


# --------------------------------------------------------------------------- driver side

def run_in_fresh_process(stage, args, kwargs):
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_stage, args=(stage, args, kwargs, child_conn),
                       name=f"bench-{stage}")
    proc.start()
    child_conn.close()
    try:
        report = parent_conn.recv()
    except EOFError:
        report = {"ok": False, "error": "stage process died without reporting "
                                        "(killed for memory?)"}
    proc.join()
    if not report["ok"]:
        raise SystemExit(f"stage {stage} failed (exit code {proc.exitcode}):\n{report['error']}")
    return report


def find_dwi(bids_dir, subject):
    """The first ``*_dwi.nii[.gz]`` of the subject and its .bval/.bvec."""
    label = subject[4:] if subject.startswith("sub-") else subject
    base = Path(bids_dir) / f"sub-{label}"
    candidates = sorted(glob.glob(str(base / "dwi" / "*_dwi.nii*"))
                        + glob.glob(str(base / "ses-*" / "dwi" / "*_dwi.nii*")))
    if not candidates:
        raise SystemExit(f"no *_dwi.nii[.gz] for sub-{label} under {bids_dir}")
    dwi = Path(candidates[0])
    stem = dwi.name[: dwi.name.index(".nii")]
    bval, bvec = dwi.with_name(stem + ".bval"), dwi.with_name(stem + ".bvec")
    for path in (bval, bvec):
        if not path.exists():
            raise SystemExit(f"missing {path}")
    return label, str(dwi), str(bval), str(bvec)


def run_stages(label, dwi, bval, bvec, work, *, n_jobs, denoise):
    rows = []

    def stage(name, *args, **kwargs):
        out_dir = work / name
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"  {name} ...", end="", flush=True)
        report = run_in_fresh_process(name, args, {"out_dir": str(out_dir), **kwargs})
        print(f" {report['wall_s']:.1f} s", flush=True)
        rows.append({"stage": name, **{k: v for k, v in report.items() if k != "ok"}})
        return report["result"]

    mask = stage("brain_mask", dwi, bval, bvec)
    den = stage("denoise", dwi, bval, bvec, mask["mask"], method=denoise, n_jobs=n_jobs)
    degibbs = stage("remove_gibbs", den["dwi"], mask["mask"], n_jobs=n_jobs)
    moco = stage("correct_motion", degibbs["dwi"], bval, bvec, mask["mask"], n_jobs=n_jobs)
    # As in the workflow: dropout is judged on the series before motion resampling.
    flagged = stage("detect_outliers", degibbs["dwi"], bval, bvec, mask["mask"], moco["qc"])
    dti = stage("fit_tensor", moco["dwi"], bval, moco["bvec"], mask["mask"], flagged["qc"],
                n_jobs=n_jobs)
    # In the workflow the check runs beside the registration (it turns only v1).
    checked = stage("check_gradients", moco["dwi"], bval, moco["bvec"], mask["mask"],
                    flagged["qc"], dti["v1"])
    pre_qc = stage("collect_preprocessing_qc", denoise_qc=den["qc"], motion_qc=moco["qc"],
                   outliers_qc=flagged["qc"], gradient_qc=checked["qc"], tensor_qc=dti["qc"])
    reg = stage("register_atlas", dti["fa"], mask["mask"], n_jobs=n_jobs)
    trk = stage("track_cst", dti["fa"], checked["v1"], mask["mask"], reg["rois"], reg["qc"],
                reg["mni_z"], n_jobs=n_jobs)
    prof = stage("tract_profiles", trk["left"], trk["right"], dti["fa"], dti["md"], dti["rd"],
                 dti["ad"], reg["mni_z"], reg["rois"], moco["dwi"], bval, checked["bvec"],
                 flagged["qc"], subject=label)
    stage("assess", prof["json"], reg["qc"], trk["qc"], pre_qc, subject=label, entities={},
          input_files=[dwi, bval, bvec], parameters={})
    return rows


def _parse_time_v(text):
    wall = rss = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in line.rsplit(" ", 1)[1].split(":")]
            wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size (kbytes)"):
            rss = int(line.rsplit(":", 1)[1]) / MIB
    return wall, rss


def run_cli(label, bids_dir, work, *, n_jobs, denoise):
    """``cst-report`` end to end once; wall and max RSS (largest single process)."""
    out_dir = work / "cli-out"
    exe = Path(sys.executable).parent / "cst-report"
    command = ([str(exe)] if exe.exists() else
               [sys.executable, "-c", "import sys; from workflows.cli import cst_report_main; "
                                      "sys.exit(cst_report_main())"])
    command += [label, "--bids-dir", str(bids_dir), "--out-dir", str(out_dir),
                "--n-jobs", str(n_jobs), "--denoise", denoise]
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    env.setdefault("MPLCONFIGDIR", str(work / "mpl"))
    time_v = shutil.which("time", path="/usr/bin:/bin")
    log = work / "cli.log"
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        if time_v:
            timing = work / "cli.time"
            proc = subprocess.run([time_v, "-v", "-o", str(timing)] + command, stdout=handle,
                                  stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
            wall_parent = time.perf_counter() - t0
            wall, rss = _parse_time_v(timing.read_text())
            returncode, method = proc.returncode, "/usr/bin/time -v"
        else:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO_ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall_parent = time.perf_counter() - t0
            wall, rss = wall_parent, usage.ru_maxrss / MIB
            returncode, method = proc.returncode, "os.wait4 rusage"
    if returncode not in (0, 3):  # 3: reported but not assessable
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"cst-report failed with exit code {returncode}")
    return {"command": " ".join(command), "exit_code": returncode, "method": method,
            "wall_s": wall if wall is not None else wall_parent, "max_rss_mib": rss}


def machine_facts():
    cpu = platform.processor() or "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    try:
        mem = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_gib = round(int(mem.group(1)) / 1024 ** 2, 1)
    except (OSError, AttributeError):
        mem_gib = None
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("nproc") else str(len(os.sched_getaffinity(0)))
    versions = {}
    for package in ("cst-integrity", "dipy", "numpy", "scipy", "nibabel", "nipype", "joblib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"date": datetime.date.today().isoformat(), "nproc": nproc,
            "cpu_count": os.cpu_count(), "cpu_model": cpu,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "mem_total_gib": mem_gib,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def format_table(rows, cli, facts, args, label):
    lines = [f"sub-{label}, n_jobs={args.n_jobs}, denoise={args.denoise}", "",
             f"| {'stage':<24} | {'wall s':>7} | {'peak RSS MiB (self)':>19} | "
             f"{'peak RSS MiB (workers)':>22} |",
             f"|{'-' * 26}|{'-' * 8}:|{'-' * 20}:|{'-' * 23}:|"]

    def workers(row):
        return f"{row['rss_workers_mib']:.0f}" if row["rss_workers_mib"] else "-"

    worker_peaks = [r["rss_workers_mib"] for r in rows if r["rss_workers_mib"]]

    for row in rows:
        lines.append(f"| {row['stage']:<24} | {row['wall_s']:>7.1f} | {row['rss_self_mib']:>19.0f} "
                     f"| {workers(row):>22} |")
    total_wall = sum(r["wall_s"] for r in rows)
    lines.append(f"| {'TOTAL':<24} | {total_wall:>7.1f} | "
                 f"{max(r['rss_self_mib'] for r in rows):>19.0f} | "
                 f"{(f'{max(worker_peaks):.0f}' if worker_peaks else '-'):>22} |")
    pre_wall = sum(r["wall_s"] for r in rows if r["stage"] in PREPROCESSING)
    lines.append(f"| {'preprocessing':<24} | {pre_wall:>7.1f} | {'':>19} | {'':>22} |")
    lines.append("")
    lines.append("preprocessing: brain_mask through detect_outliers (the default chain up to "
                 "the tensor fit).")
    lines.append("TOTAL: sum of stage walls; RSS columns: the largest stage peak. "
                 "workers '-': the stage started no child process.")
    with_workers = [r for r in rows if r["n_workers"]]
    if with_workers:
        lines.append("workers' own VmHWM (sampled): " + ", ".join(
            f"{r['stage']} {r['workers_vmhwm_mib']:.0f} MiB ({r['n_workers']} procs)"
            for r in with_workers))
    lines.append(f"stage process overhead (spawn + imports): "
                 f"{sum(r['process_s'] - r['wall_s'] for r in rows):.1f} s in all")
    if cli:
        lines.append(f"cst-report end to end ({cli['method']}, exit {cli['exit_code']}): "
                     f"wall {cli['wall_s']:.1f} s, max RSS {cli['max_rss_mib']:.0f} MiB")
    v = facts["versions"]
    lines.append(f"machine: nproc={facts['nproc']}, CPU {facts['cpu_model']}, "
                 f"{facts['mem_total_gib']} GiB RAM, Python {facts['python']}, "
                 f"dipy {v['dipy']}, numpy {v['numpy']}, scipy {v['scipy']}, "
                 f"nipype {v['nipype']}; {facts['date']}")
    lines.append(f"load average (1/5/15 min) at start: "
                 f"{' '.join(str(x) for x in facts['loadavg_at_start'])}, at end: "
                 f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine "
                 f"inflates the walls)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=REPO_ROOT.parent / "shared/data/bids",
                        help="BIDS dataset root (default: ../shared/data/bids from the repo root)")
    parser.add_argument("--subject", default="philips01", help="subject label (default philips01)")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib workers (default 2)")
    parser.add_argument("--denoise", choices=("mppca", "patch2self", "none"), default="mppca",
                        help="denoising method (default mppca, as the CLI)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--with-cli", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the cst-report command end to end (default on)")
    args = parser.parse_args(argv)

    label, dwi, bval, bvec = find_dwi(args.bids_dir, args.subject)
    work = Path(tempfile.mkdtemp(prefix="cst-bench-"))
    facts = machine_facts()
    print(f"benchmark sub-{label}: {dwi}\nwork dir: {work}", flush=True)
    try:
        rows = run_stages(label, dwi, bval, bvec, work, n_jobs=args.n_jobs, denoise=args.denoise)
        cli = None
        if args.with_cli:
            print("  cst-report (end to end) ...", flush=True)
            cli = run_cli(label, args.bids_dir.resolve(), work, n_jobs=args.n_jobs,
                          denoise=args.denoise)
        table = format_table(rows, cli, facts, args, label)
        print()
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "subject": label, "dwi": dwi, "n_jobs": args.n_jobs, "denoise": args.denoise,
                "stages": [{k: v for k, v in r.items() if k != "result"} for r in rows],
                "total_wall_s": sum(r["wall_s"] for r in rows), "cli": cli,
                "machine": facts, "table": table}, indent=2) + "\n")
            print(f"\nJSON: {args.out}")
    finally:
        if args.keep:
            print(f"kept work dir: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
