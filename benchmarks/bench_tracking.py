#!/usr/bin/env python3
"""Our tractography against MRtrix3's ``tckgen`` on the same scan, seeds and settings.

Pairs compared (one real subject, whole-brain white-matter seeding):

=====================================  =====================================
ours (:mod:`pipeline.tracking.propagation`)        MRtrix3 ``tckgen -algorithm``
=====================================  =====================================
tensor, deterministic (EuDX on V1)     ``Tensor_Det`` (tensor from the DWI)
CSD, probabilistic                     ``iFOD2`` (on our CSD, same FODs)
CSD, deterministic                     ``SD_Stream`` (on our CSD, same FODs)
=====================================  =====================================

Same data (the raw series of the subject), same number of seeds drawn uniformly
at random in the same seed mask (FA ≥ 0.3 in the brain; ``tckgen`` cannot take
a list of points, so the draws differ but not their distribution), same step
(0.5 mm), turning angle (45°), length limits (20-250 mm) and stopping rule:
tracking stops below FA 0.2 (ours: FA threshold; MRtrix: ``-cutoff 0.2`` for
``Tensor_Det``, and ``-mask`` of FA ≥ 0.2 for the FOD algorithms, whose
``-cutoff`` is then our ODF threshold of 0.1). Our CSD coefficients are
converted to MRtrix's basis (``tournier07``, non-legacy) and given to
``tckgen``, so both trackers read the same fibre ODFs.

Timing: each run is a fresh process under ``/usr/bin/time`` (peak RSS). Start-up
is left out of both, measured the same way and printed beside: ``tckgen``'s own
start and image loading by a run with one seed, subtracted from its time; ours
(loading the compiled kernels, the first thread pool) by a first tracking call
with one seed in the same process, before the timed call (model fits are timed
separately and printed). Seeds/s = seeds / tracking seconds. 1 and 2 workers:
our ``n_jobs`` and ``tckgen -nthreads``. A shared machine's speed drifts from
run to run (here ±10 %): ``--repeat 3`` runs each row three times, the two tools
alternating, and reports each tool's median run.

MRtrix3 comes from Debian (``apt-get install mrtrix3``); the benchmark installs
it when ``tckgen`` is missing and it runs as root.

Usage (repository root, the README's venv)::

    .venv/bin/python benchmarks/bench_tracking.py                 # philips01, 20k and 100k seeds
    .venv/bin/python benchmarks/bench_tracking.py --seeds 20000 --modes dti --out bench.json
    .venv/bin/python benchmarks/bench_tracking.py --repeat 3 --modes csd_prob
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("dti", "csd_prob", "csd_det")
MRTRIX_ALGORITHM = {"dti": "Tensor_Det", "csd_prob": "iFOD2", "csd_det": "SD_Stream"}
SETTINGS = {"step_mm": 0.5, "max_angle_deg": 45.0, "min_length_mm": 20.0,
            "max_length_mm": 250.0, "fa_stop": 0.2, "pmf_threshold": 0.1, "seed_fa": 0.3}


def ensure_mrtrix():
    """Path of ``tckgen``, installing Debian's mrtrix3 when missing (root only)."""
    if shutil.which("tckgen") is None:
        if os.geteuid() != 0:
            sys.exit("tckgen (MRtrix3) is missing: sudo apt-get install mrtrix3")
        print("installing MRtrix3 (apt-get install mrtrix3) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "mrtrix3"],
                       check=True, stdout=subprocess.DEVNULL)
    return shutil.which("tckgen")


def prepare(bids_dir, subject, work):
    """Brain mask, tensor, CSD (ours) of the raw series; the files both tools read."""
    sys.path.insert(0, str(REPO))
    import nibabel as nib
    import numpy as np
    from dipy.reconst.shm import convert_sh_descoteaux_tournier

    from pipeline.io.dwi import load_dwi
    from pipeline.preprocessing.mask import brain_mask, mean_b0
    from pipeline.reconstruction import fodf, tensor

    dwi = sorted((bids_dir / f"sub-{subject}" / "dwi").glob(f"sub-{subject}*_dwi.nii*"))[0]
    stem = str(dwi)[: -len(".nii.gz")] if dwi.name.endswith(".gz") else str(dwi)[:-4]
    scan = load_dwi(dwi, f"{stem}.bval", f"{stem}.bvec")
    data = scan.img.get_fdata(dtype=np.float32)
    affine = scan.affine
    timings = {}
    started = time.perf_counter()
    mask = brain_mask(mean_b0(data, scan.b0_mask))
    maps = tensor.fit_dti(data, scan.bvals, scan.bvecs_fsl, affine, mask,
                          b0_threshold=scan.b0_threshold)
    timings["tensor_fit_s"] = time.perf_counter() - started
    fa = maps["fa"]
    choice = fodf.choose_model(scan.bvals, scan.bvecs_fsl, scan.b0_threshold, requested="csd")
    order = choice["sh_order"] or 4
    started = time.perf_counter()
    sh, info = fodf.fit_csd(data, scan.bvals, scan.bvecs_fsl, affine, mask, fa,
                            b0_threshold=scan.b0_threshold, shell=choice["shell_bvalue"],
                            sh_order=order, fit_mask=mask & (fa >= SETTINGS["fa_stop"]),
                            n_jobs=2)
    timings["csd_fit_s_2_workers"] = time.perf_counter() - started
    stop = mask & (fa >= SETTINGS["fa_stop"])
    seed_mask = mask & (fa >= SETTINGS["seed_fa"])
    np.savez(work / "fields.npz", fa=np.where(mask, fa, 0), v1=maps["v1"], mask=mask, sh=sh,
             seed_mask=seed_mask, affine=affine)

    def save(name, array):
        nib.save(nib.Nifti1Image(array, affine), str(work / name))

    save("seed.nii.gz", seed_mask.astype(np.uint8))
    save("stop.nii.gz", stop.astype(np.uint8))
    save("brain.nii.gz", mask.astype(np.uint8))
    # Ours: Descoteaux basis (non-legacy) in the voxel frame. MRtrix: Tournier basis in
    # its own image frame, which for this axis-aligned grid is the voxel frame too.
    save("fod_tournier.nii", convert_sh_descoteaux_tournier(sh.astype(np.float64))
         .astype(np.float32))
    return {"dwi": str(dwi), "bval": f"{stem}.bval", "bvec": f"{stem}.bvec",
            "shape": list(data.shape),
            "voxel_mm": [float(v) for v in scan.img.header.get_zooms()[:3]],
            "n_seed_voxels": int(seed_mask.sum()), "csd": {**choice, "sh_order": order, **info},
            **timings}


def ours_worker(work, mode, n_seeds, n_jobs):
    """(In a fresh process) track ``n_seeds`` seeds with ours; print a JSON line."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline.tracking import propagation as tracking

    fields = np.load(work / "fields.npz")
    seed_mask, affine = fields["seed_mask"], fields["affine"]
    per_voxel = int(np.ceil(n_seeds / seed_mask.sum()))
    seeds = tracking.seeds_in_mask(seed_mask, affine, seeds_per_voxel=per_voxel, random_seed=0)
    seeds = seeds[np.random.default_rng(0).permutation(len(seeds))[:n_seeds]]
    common = {k: SETTINGS[k] for k in ("step_mm", "max_angle_deg", "min_length_mm",
                                       "max_length_mm", "fa_stop")}

    def track(some_seeds):
        if mode == "dti":
            return tracking.track_dti_deterministic(
                some_seeds, fields["v1"], fields["fa"], fields["mask"], affine, n_jobs=n_jobs,
                random_seed=1, **common)
        return tracking.track_csd(some_seeds, fields["sh"], fields["fa"], affine,
                                  direction=mode.split("_")[1], n_jobs=n_jobs, random_seed=1,
                                  pmf_threshold=SETTINGS["pmf_threshold"], **common)

    started = time.perf_counter()
    track(seeds[:1])
    startup = time.perf_counter() - started
    started = time.perf_counter()
    out = track(seeds)
    print(json.dumps({"seconds": time.perf_counter() - started, "kept": len(out),
                      "seeds": len(seeds), "startup_s": startup}))


def timed(command):
    """Run under /usr/bin/time: (wall s, peak RSS MiB, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *command],
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return wall, int(report.read().split()[-1]) / 1024, done.stdout


def run_ours(work, mode, n_seeds, n_jobs):
    _, rss, stdout = timed([sys.executable, __file__, "--worker", str(work), mode, str(n_seeds),
                            str(n_jobs)])
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": result["seconds"], "kept": result["kept"], "rss_mib": rss,
            "startup_s": result["startup_s"]}


def run_tckgen(work, prepared, mode, n_seeds, n_threads):
    source = (([prepared["dwi"], "-fslgrad", prepared["bvec"], prepared["bval"], "-cutoff",
                str(SETTINGS["fa_stop"]), "-mask", str(work / "brain.nii.gz")])
              if mode == "dti" else
              [str(work / "fod_tournier.nii"), "-cutoff", str(SETTINGS["pmf_threshold"]),
               "-mask", str(work / "stop.nii.gz")])

    def command(seeds):
        return ["tckgen", *source, str(work / f"{mode}.tck"), "-force", "-quiet",
                "-algorithm", MRTRIX_ALGORITHM[mode], "-seed_image", str(work / "seed.nii.gz"),
                "-seeds", str(seeds), "-select", "0", "-step", str(SETTINGS["step_mm"]),
                "-angle", str(SETTINGS["max_angle_deg"]),
                "-minlength", str(SETTINGS["min_length_mm"]),
                "-maxlength", str(SETTINGS["max_length_mm"]), "-nthreads", str(n_threads)]

    startup, _, _ = timed(command(1))
    wall, rss, _ = timed(command(n_seeds))
    info = subprocess.run(["tckinfo", str(work / f"{mode}.tck")], capture_output=True,
                          text=True).stdout
    kept = next(int(line.split()[-1]) for line in info.splitlines()
                if line.strip().startswith("count:"))
    return {"seconds": max(wall - startup, 1e-3), "kept": kept, "rss_mib": rss,
            "startup_s": startup}


def median_run(runs):
    """The run of median time (the lower middle one of an even number)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=REPO.parent / "shared" / "data" / "bids")
    parser.add_argument("--subject", default="philips01")
    parser.add_argument("--seeds", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each tool per row, the tools alternating; the row "
                             "reports each tool's median-time run")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        work, mode, n_seeds, n_jobs = args.worker
        return ours_worker(Path(work), mode, int(n_seeds), int(n_jobs))

    ensure_mrtrix()
    mrtrix_version = subprocess.run(["tckgen", "-version"], capture_output=True,
                                    text=True).stdout.splitlines()[0]
    subject = args.subject.removeprefix("sub-")
    with tempfile.TemporaryDirectory(prefix="cst-bench-tracking-") as tmp:
        work = Path(tmp)
        print(f"sub-{subject}: preparing (tensor and CSD fits) ...", flush=True)
        prepared = prepare(args.bids_dir, subject, work)
        print(f"  grid {prepared['shape']}, voxels {prepared['voxel_mm']} mm, "
              f"{prepared['n_seed_voxels']} seed voxels; tensor fit "
              f"{prepared['tensor_fit_s']:.1f} s, CSD (order {prepared['csd']['sh_order']}, "
              f"{prepared['csd']['n_directions']} directions) fit "
              f"{prepared['csd_fit_s_2_workers']:.1f} s with 2 workers", flush=True)
        rows = []
        for mode in args.modes:
            for n_seeds in args.seeds:
                for workers in args.workers:
                    # the two tools alternate, so that a slow spell of the machine hits both
                    runs = [(run_ours(work, mode, n_seeds, workers),
                             run_tckgen(work, prepared, mode, n_seeds, workers))
                            for _ in range(args.repeat)]
                    ours = median_run([r[0] for r in runs])
                    peer = median_run([r[1] for r in runs])
                    rows.append({"mode": mode, "peer": MRTRIX_ALGORITHM[mode], "seeds": n_seeds,
                                 "workers": workers, "ours": ours, "mrtrix": peer})
                    print(f"  {mode} {n_seeds} seeds, {workers} worker(s): ours "
                          f"{ours['seconds']:.1f} s, MRtrix {peer['seconds']:.1f} s", flush=True)

    print(f"\nsub-{subject}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"{mrtrix_version}")
    print("| ours | MRtrix3 | seeds | workers | ours seeds/s | MRtrix seeds/s | ratio | "
          "ours kept | MRtrix kept | ours RSS MiB | MRtrix RSS MiB | ours / MRtrix start-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, m = r["ours"], r["mrtrix"]
        print(f"| {r['mode']} | {r['peer']} | {r['seeds']} | {r['workers']} | "
              f"{r['seeds'] / o['seconds']:.0f} | {r['seeds'] / m['seconds']:.0f} | "
              f"{m['seconds'] / o['seconds']:.2f}x | {o['kept']} | {m['kept']} | "
              f"{o['rss_mib']:.0f} | {m['rss_mib']:.0f} | "
              f"{o['startup_s']:.2f} / {m['startup_s']:.2f} |")
    print("\nspeed-up of 2 workers over 1:")
    for r in rows:
        if r["workers"] != 1:
            continue
        two = next((q for q in rows if q["mode"] == r["mode"] and q["seeds"] == r["seeds"]
                    and q["workers"] == 2), None)
        if two:
            print(f"  {r['mode']} {r['seeds']} seeds: ours "
                  f"{r['ours']['seconds'] / two['ours']['seconds']:.2f}x, MRtrix "
                  f"{r['mrtrix']['seconds'] / two['mrtrix']['seconds']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"subject": subject, "prepared": prepared,
                                        "settings": SETTINGS, "mrtrix": mrtrix_version,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
