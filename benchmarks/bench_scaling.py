#!/usr/bin/env python3
"""How wall time and peak memory of ``cst-report`` grow with the size of the series.

Copies of one shared scan (default ``sub-philips01``, 128×128×60×33) are made at larger
sizes: upsampled in space over the same field of view (trilinear, DIPY's ``reslice``)
and with more volumes (the scan's volumes repeated with their gradients, every repeat
with fresh Rician noise of the scan's own σ, so that denoising sees independent noise).
``cst-report`` runs on each copy in its own process; the resident memory of its whole
process tree (the command, Nipype's workers and theirs) is summed every 0.2 s.

Printed per size: wall time, peak RSS of the tree, the estimate of
:func:`pipeline.memory.estimated_memory_bytes` and its excess over the peak, the verdict
(damage, side, level) and each step's seconds (from the run's ``*_steps.tsv``); then the
growth exponents ``b`` of ``t ∝ samples^b`` (log-log least squares over the sizes run).

Usage (from the repository root)::

    python benchmarks/bench_scaling.py --sizes native ukb            # a few minutes
    python benchmarks/bench_scaling.py --sizes native ukb abcd mid hcp --out scaling.json

The copies go to ``--work`` (default a temporary folder; 2.5 GB of int16 for the HCP size).
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.memory import estimated_memory_bytes  # noqa: E402
from pipeline.sims import degrade  # noqa: E402

#: Grid (X, Y, Z) and volumes of each size; ``native`` is the source scan itself.
SIZES = {
    "native": None,
    "ukb": (104, 104, 72, 105),  # UK Biobank
    "abcd": (140, 140, 81, 103),  # ABCD (1.7 mm, three shells' worth of volumes)
    "mid": (128, 150, 120, 180),
    "hcp": (145, 174, 145, 288),  # Human Connectome Project (young adult)
}
#: Seconds between two samples of the process tree's memory (MP-PCA's patch batches live
#: for about a second).
SAMPLE_SECONDS = 0.05


def build_copy(series, shape, noise_sigma, dwi_dir, stem, *, seed=0):
    """Write a BIDS run ``<dwi_dir>/<stem>_dwi.{nii,bval,bvec}`` of ``shape`` (X, Y, Z, N)
    made from ``series``, in the source's data type, uncompressed (as large scans are often
    stored; gzip would take longer than the run); returns the image path."""
    from dipy.align.reslice import reslice

    zooms = degrade.voxel_sizes(series.affine)
    new_zooms = zooms * np.array(series.data.shape[:3]) / np.array(shape[:3])
    grid, affine = reslice(series.data, series.affine, zooms, new_zooms, order=1,
                           mode="nearest")
    grid = grid[:shape[0], :shape[1], :shape[2]]  # rounding may add a voxel
    n_source = series.data.shape[3]
    order = np.arange(shape[3]) % n_source
    data = np.empty(tuple(shape), dtype=np.float32)
    for volume, source in enumerate(order):
        repeat = volume // n_source
        data[..., volume] = grid[..., source] if repeat == 0 else degrade.add_rician_noise(
            grid[..., source], noise_sigma, seed=seed + volume)
    dwi_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(dwi_dir / f"{stem}_dwi.bval", series.bvals[order][None], fmt="%g")
    np.savetxt(dwi_dir / f"{stem}_dwi.bvec", series.bvecs_fsl[order].T, fmt="%.8f")
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(series.header.get_data_dtype())
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = dwi_dir / f"{stem}_dwi.nii"
    nib.save(img, str(path))
    return path


def tree_rss(process):
    """Resident bytes of ``process`` and all its descendants (0 for those gone)."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command):
    """Run ``command``; return (exit code, wall s, peak RSS of its process tree in bytes,
    the time of the peak as a Unix time)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    watched = psutil.Process(proc.pid)
    peak = [0, None]

    def sample():
        while proc.poll() is None:
            try:
                rss = tree_rss(watched)
                if rss > peak[0]:
                    peak[:] = rss, time.time()
            except psutil.Error:
                pass
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    sampler.join()
    if proc.returncode:
        print(stderr[-2000:], file=sys.stderr)
    return proc.returncode, time.perf_counter() - started, *peak


def step_seconds(out_dir, subject):
    """Seconds of each computed step of the run (its log folder's ``*_steps.tsv``),
    by the step's own name."""
    tables = sorted((out_dir / f"sub-{subject}" / "log").glob("*_steps.tsv"))
    with open(tables[-1], newline="") as handle:
        return {row["step"].rsplit(".", 1)[-1]: float(row["seconds"])
                for row in csv.DictReader(handle, delimiter="\t")
                if row["outcome"] == "computed"}


def steps_running_at(out_dir, subject, moment):
    """The steps running at Unix time ``moment``: from the run log's times at which each
    step finished and the step seconds, those whose span holds it."""
    log = sorted((out_dir / f"sub-{subject}" / "log").glob("cst-report_*.log"))[-1]
    seconds = step_seconds(out_dir, subject)
    running = []
    for line in log.read_text().splitlines():
        if " step " not in line or not line.endswith(": computed"):
            continue
        finished = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + \
            float("0." + line[20:23])
        name = line.split(" step ", 1)[1].rsplit(":", 1)[0].rsplit(".", 1)[-1]
        if finished - seconds.get(name, 0.0) - 1 <= moment <= finished + 1:
            running.append(name)
    return running


def verdict(out_dir, subject):
    """(damage, side, level) of the run's localisation."""
    metrics = next((out_dir / f"sub-{subject}").rglob("*_desc-cst_metrics.json"))
    found = json.loads(metrics.read_text())["localization"]
    return found.get("umn_damage"), found.get("affected_side"), found.get("level")


def growth_exponent(samples, values):
    """Slope of log(values) on log(samples): the exponent b of ``value ∝ samples^b``."""
    x, y = np.log(np.asarray(samples, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", default=str(REPO_ROOT.parent / "shared/data/bids"))
    parser.add_argument("--subject", default="philips01")
    parser.add_argument("--sizes", nargs="+", default=["native", "ukb"], choices=list(SIZES))
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--mem-gb", type=float, default=None,
                        help="passed to cst-report (default: its own default budget)")
    parser.add_argument("--work", help="folder for the copies and outputs (kept)")
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args(argv)

    from workflows.execution import resolve_mem_gb

    subject = args.subject.removeprefix("sub-")
    source = next(Path(args.bids_dir, f"sub-{subject}", "dwi").glob("*_dwi.nii*"))
    series = degrade.read_series(source)
    work = Path(args.work or tempfile.mkdtemp(prefix="cst-scaling-"))
    noise_sigma = None
    results = []
    for name in args.sizes:
        shape = SIZES[name]
        root = degrade.start_bids_copy(args.bids_dir, work / name / "bids")
        dwi_dir = root / f"sub-{subject}" / "dwi"
        if shape is None:
            image = degrade.link_run(source, dwi_dir)
            shape = series.data.shape
        elif not (image := dwi_dir / f"sub-{subject}_dwi.nii").is_file():
            if noise_sigma is None:
                noise_sigma = degrade.estimate_noise_sigma(series.data, series.bvals,
                                                           series.affine)
            started = time.perf_counter()
            build_copy(series, shape, noise_sigma, dwi_dir, f"sub-{subject}")
            print(f"{name}: copy {shape} built in {time.perf_counter() - started:.0f} s",
                  flush=True)
        out_dir = work / name / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        budget = resolve_mem_gb(args.mem_gb)
        itemsize = nib.load(str(image)).get_data_dtype().itemsize
        estimate = estimated_memory_bytes(
            shape, input_itemsize=itemsize, n_jobs=args.n_jobs,
            memory_bytes=None if budget is None else int(budget * 2 ** 30))
        command = [str(Path(sys.executable).with_name("cst-report")), subject,
                   "--bids-dir", str(root),
                   "--out-dir", str(out_dir), "--work-dir", str(work / name / "work"),
                   "--n-jobs", str(args.n_jobs)]
        if args.mem_gb is not None:
            command += ["--mem-gb", str(args.mem_gb)]
        code, wall, peak, peak_time = run_measured(command)
        result = {"size": name, "shape": list(shape), "samples": int(np.prod(shape)),
                  "exit_code": code, "wall_s": round(wall, 1),
                  "peak_rss_gib": round(peak / 2 ** 30, 3),
                  "estimate_gib": round(estimate / 2 ** 30, 3),
                  "estimate_over_peak": round(estimate / peak - 1, 3) if peak else None,
                  "budget_gib": None if budget is None else round(budget, 2)}
        if code == 0:
            result["verdict"] = verdict(out_dir, subject)
            result["steps_s"] = step_seconds(out_dir, subject)
            result["peak_during"] = steps_running_at(out_dir, subject, peak_time)
        results.append(result)
        print(json.dumps(result), flush=True)

    done = [r for r in results if r["exit_code"] == 0]
    print("\n| size | shape | wall s | peak RSS GiB | during | estimate GiB | estimate − peak "
          "| verdict |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {'×'.join(map(str, r['shape']))} | {r['wall_s']} | "
              f"{r['peak_rss_gib']} | {', '.join(r.get('peak_during', []))} | "
              f"{r['estimate_gib']} | {100 * r['estimate_over_peak']:+.0f} % | "
              f"{r.get('verdict', 'failed')} |")
    if len(done) >= 2:
        samples = [r["samples"] for r in done]
        exponents = {"wall": growth_exponent(samples, [r["wall_s"] for r in done]),
                     "peak_rss": growth_exponent(samples, [r["peak_rss_gib"] for r in done])}
        for step in done[0]["steps_s"]:
            seconds = [r["steps_s"].get(step) for r in done]
            if all(s and s > 0 for s in seconds):
                exponents[step] = growth_exponent(samples, seconds)
        print("\ngrowth exponents b (value ∝ samples^b):")
        for key, value in exponents.items():
            print(f"  {key:<22} {value:5.2f}")
        print("\nstep seconds:")
        for step in done[0]["steps_s"]:
            print(f"  {step:<22} " + "  ".join(f"{r['steps_s'].get(step, float('nan')):8.1f}"
                                                for r in done))
    else:
        exponents = {}
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "exponents": exponents},
                                             indent=1))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
