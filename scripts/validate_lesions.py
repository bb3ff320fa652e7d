#!/usr/bin/env python3
"""Validation protocol: healthy and lesioned real scans, native and degraded.

Datasets (``--bids``, repeatable): the research scans ``../shared/data/bids`` and the
clinical-protocol scans ``../shared/data/bids-clinical`` by default. Every DWI run of
every selected subject is one *run* (``sub-siemens03_dir-AP`` and ``_dir-PA`` are two),
each processed alone by ``cst-report`` from a one-run BIDS copy.

Conditions (``--degradations``; :mod:`pipeline.sims.degrade`): ``original``; ``3mm``
(3 mm isotropic); ``12dir`` (b0s + 12 well-spread directions of the lowest shell);
``5mm`` (5 mm slices along the voxel axis closest to world z); ``lowsnr`` (Rician
noise of √3 × the scan's MP-PCA σ, so the noise doubles; fixed seed per run); and
``xflip`` (x storage axis reversed: the same image, an invariance check). A
degradation that does not apply (the scan is already that coarse) is skipped and
listed.

1. **Healthy**: every run × every condition. Any finding (``localization.umn_damage``)
   is a false positive.
2. **Lesions**: on each assessable unmodified run, for each side × level the healthy
   profile covers (≥ ``MIN_LEVEL_NODES`` nodes inside the detection window; medulla,
   pons, cerebral peduncle, internal capsule, corona radiata) × severity (``severe``:
   FA −55 %, ``mild``: FA −27 %; ``--severe-fa-drop``/``--mild-fa-drop``), a 6 mm
   sphere centred on that side's profile node at the middle of the level gets a
   radial-diffusivity lesion (:mod:`pipeline.sims.lesion_model`). The lesion is implanted
   into the *native* scan and the lesioned scan is then degraded (a real lesion is
   there before the acquisition, so it is blurred by 3 mm or 5 mm voxels, sampled by
   12 directions and measured with the doubled noise like the tissue around it; the
   ``lowsnr`` copies of a run, healthy and lesioned, share one noise realisation).
   Success: found, side correct, level correct (the reported level, or any level in
   ``localization.levels_near_boundary`` when the pipeline lists one for a peak near a
   level boundary), peak within ``PEAK_TOLERANCE_MM`` (12 mm) of the lesion centre.

Held-out split (``--split``, default ``tune``): :data:`SPLIT` is a fixed list that
halves the 16 subjects, balanced across datasets (research 3 | 4, clinical 5 | 4)
and vendors (Philips 2 | 1, Siemens 3 | 4, Toshiba 3 | 2, UIH 0 | 1), with the
brainstem coverage needed for the lower levels in both halves (medulla: siemens04 |
philips01 and siemens02). philips02 and toshiba01, on whose lesions the detection
thresholds were set, are in ``tune``. Tune thresholds on ``tune`` only; ``report``
is for the numbers in the README. Caveat: toshiba01-05 are one volunteer and
siemens04-07 another, so the halves share volunteers (not protocols or positioning).
A subject not in the list goes to a half by the parity of the CRC-32 of its label.

Resumable: everything goes under ``--out``; each degraded or lesioned copy is written
once, each finished run's metrics JSON is kept as ``<run dir>/metrics.json`` and a
rerun skips it (``--refresh`` reruns ``cst-report`` anyway, which resumes from its work
folder, e.g. after a change of the detection settings). A failed run is recorded
(``failed.json``, ``cst-report.log``) and retried by the next invocation.
``--max-runs N`` stops after N ``cst-report`` invocations (0: only print the tables of
what is cached). ``--reassess`` judges the finished runs again with the current
detection code and settings, from the profiles and bootstrap replicates their work
folders keep (seconds per run, nothing rewritten): how a change of the statistic or
of the healthy model is tried on the cached runs. Runs are sequential; ``--n-jobs``
goes to ``cst-report``.

Layout: ``OUT/runs/<run>/healthy/<condition>/`` and
``OUT/runs/<run>/<side>-<level>-fa<drop %>/<condition>/`` hold ``bids/``, ``out/``,
``metrics.json``; the lesion folder holds ``truth.json``; ``OUT/runs/<run>/noise.json``
the run's σ. ``OUT/tables.md`` gets the printed tables, ``OUT/lesions.md`` the
per-lesion rows, ``OUT/validation.json`` all rows.

Usage (repository root, the README's venv)::

    .venv/bin/python scripts/validate_lesions.py --out /tmp/cst-validation --split tune
    .venv/bin/python scripts/validate_lesions.py --out /tmp/cst-validation --split report
    # small check of the harness:
    .venv/bin/python scripts/validate_lesions.py --out /tmp/cst-v --split all \\
        --subjects toshiba02 --degradations original lowsnr --levels internal_capsule \\
        --severity severe --sides left
"""

import argparse
import json
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import atlases  # noqa: E402
from pipeline.cst import SIDES  # noqa: E402
from pipeline.errors import EXIT_NOT_ASSESSABLE, EXIT_OK  # noqa: E402
from pipeline.io.bids import find_dwi_runs  # noqa: E402
from pipeline.io.dwi import read_fsl_gradients  # noqa: E402
from pipeline.sims import degrade  # noqa: E402
from pipeline.sims.lesion_model import implant_lesion, profile_lesion_site  # noqa: E402
from pipeline.steps.assessment import mirrored_rule  # noqa: E402
from pipeline.tractometry import localization  # noqa: E402
from pipeline.tractometry.localization import DEFAULT_THRESHOLDS  # noqa: E402
from pipeline.tractometry.normative import read_profiles  # noqa: E402

DEFAULT_BIDS = [REPO.parent / "shared" / "data" / "bids",
                REPO.parent / "shared" / "data" / "bids-clinical"]
#: The levels a lesion may be placed at: every CST level of the atlas below the cortex.
LEVELS = tuple(level for level in localization.LEVELS if level != "cortex")
CONDITIONS = ("original",) + degrade.DEGRADATIONS
#: Default FA drops (issue ranges: severe −50 to −60 %, mild −25 to −30 %).
SEVERITY_FA_DROP = {"severe": 0.55, "mild": 0.27}
RADIUS_MM = 6.0
#: A level needs this many profile nodes inside the detection window to host a lesion.
MIN_LEVEL_NODES = 4
#: A found peak this close to the lesion centre (mm) counts as localised.
PEAK_TOLERANCE_MM = 12.0
#: Fewest subjects with lesions the protocol asks for (both datasets together).
MIN_LESION_SUBJECTS = 6
B0_THRESHOLD = 50.0
#: The fixed held-out split (see the module docstring).
SPLIT = {
    "tune": ("philips02", "siemens01", "toshiba01",                      # research
             "philips03", "siemens04", "siemens06", "toshiba02", "toshiba04"),  # clinical
    "report": ("philips01", "siemens02", "siemens03", "uih01",            # research
               "siemens05", "siemens07", "toshiba03", "toshiba05"),       # clinical
}


def split_of(label):
    """``tune`` or ``report`` for a subject label (the list, else CRC-32 parity)."""
    for half, labels in SPLIT.items():
        if label in labels:
            return half
    return ("tune", "report")[zlib.crc32(label.encode()) % 2]


@dataclass(frozen=True)
class Run:
    """One DWI run of a source dataset."""

    dataset: Path
    label: str
    dwi: Path  # the image
    stem: str  # derivative prefix, e.g. sub-siemens03_dir-AP
    rel_dir: Path  # the image's folder relative to the dataset root

    @property
    def base(self):
        """The image's name without ``_dwi.nii[.gz]``."""
        name = self.dwi.name
        return name[: name.rindex("_dwi.nii")]

    @cached_property
    def gradients(self):
        return read_fsl_gradients(self.dwi.with_name(f"{self.base}_dwi.bval"),
                                  self.dwi.with_name(f"{self.base}_dwi.bvec"))

    @cached_property
    def affine(self):
        import nibabel as nib

        return nib.load(str(self.dwi)).affine

    @property
    def seed(self):
        """The run's noise seed (fixed: the same noise on every rerun and every copy)."""
        return zlib.crc32(self.stem.encode()) % (2 ** 31)

    def skip_reason(self, condition):
        if condition == "original":
            return None
        return degrade.skip_reason(condition, self.affine, *self.gradients,
                                   b0_threshold=B0_THRESHOLD)


def find_runs(datasets, subjects):
    """Every DWI run of ``subjects`` (labels; all subjects when None) in ``datasets``."""
    runs, seen = [], {}
    for dataset in datasets:
        dataset = Path(dataset).absolute()
        labels = sorted(p.name[4:] for p in dataset.glob("sub-*") if p.is_dir())
        for label in labels:
            if subjects is not None and label not in subjects:
                continue
            if label in seen:
                raise SystemExit(f"sub-{label} is in both {seen[label]} and {dataset}")
            seen[label] = dataset
            for run in find_dwi_runs(dataset, label):
                runs.append(Run(dataset, label, run.dwi, run.stem,
                                run.dwi.parent.relative_to(dataset)))
    missing = sorted(set(subjects or ()) - set(seen))
    if missing:
        raise SystemExit(f"not found in {', '.join(map(str, datasets))}: {', '.join(missing)}")
    return runs


class Runner:
    """``cst-report`` on one-run BIDS copies, with a budget of invocations."""

    def __init__(self, n_jobs, max_runs, refresh, keep_work=True, reassess=False):
        self.n_jobs, self.max_runs, self.refresh = n_jobs, max_runs, refresh
        self.reassess = reassess
        self.started = 0
        self.pending = 0  # runs wanted but left for a later invocation (budget)
        self.failed = []  # runs that failed in this invocation (retried by the next)
        exe = Path(sys.executable).with_name("cst-report")
        self.command = [str(exe) if exe.is_file() else "cst-report"]
        help_text = subprocess.run(self.command + ["--help"], capture_output=True,
                                   text=True).stdout
        self.keep_work = keep_work and "--keep-work" in help_text

    def budget_left(self):
        return self.max_runs is None or self.started < self.max_runs

    def result(self, run_dir, run, make_copy, what):
        """The cached or fresh metrics of the run in ``run_dir`` (None: not run now).

        ``make_copy(bids_root)`` writes the one-run BIDS copy when it is missing.
        """
        cached = run_dir / "metrics.json"
        if cached.is_file() and not self.refresh:
            metrics = json.loads(cached.read_text())
            return reassessed(metrics, run_dir) if self.reassess else metrics
        if not self.budget_left():
            self.pending += 1
            return json.loads(cached.read_text()) if cached.is_file() else None
        bids = run_dir / "bids"
        if not (bids / run.rel_dir / run.dwi.name).exists():
            make_copy(bids)
        out = run_dir / "out"
        self.started += 1
        clock = time.monotonic()
        command = self.command + [run.label, "--bids-dir", str(bids), "--out-dir", str(out),
                                  "--n-jobs", str(self.n_jobs)]
        if self.keep_work:
            command.append("--keep-work")
        done = subprocess.run(command, capture_output=True, text=True)
        (run_dir / "cst-report.log").write_text(
            f"$ {' '.join(command)}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}")
        metrics = out / run.rel_dir / f"{run.stem}_desc-cst_metrics.json"
        seconds = time.monotonic() - clock
        if done.returncode not in (EXIT_OK, EXIT_NOT_ASSESSABLE) or not metrics.is_file():
            (run_dir / "failed.json").write_text(json.dumps(
                {"exit": done.returncode, "stderr": done.stderr[-4000:]}, indent=1))
            self.failed.append(what)
            print(f"    FAILED {what} (exit {done.returncode}, {seconds:.0f} s): "
                  f"{done.stderr.strip().splitlines()[-1:] or ''}", flush=True)
            return None
        (run_dir / "failed.json").unlink(missing_ok=True)
        text = metrics.read_text()
        cached.write_text(text)
        print(f"    ran {what} in {seconds:.0f} s", flush=True)
        return json.loads(text)


def reassessed(metrics, run_dir):
    """``metrics`` with its localisation redone by the current detection code and default
    settings, from the profiles and bootstrap replicates kept in the run's work folder
    (nothing is written; QC and tracking stay as the run made them)."""
    if not metrics["qc"]["assessable"]:
        return metrics
    kept = sorted(run_dir.glob("out/.cst-work/*/*/cst_wf/tract_profiles/profiles.json"))
    if not kept:
        raise SystemExit(f"--reassess: no profiles.json in the work folder of {run_dir} "
                         f"(run without --no-keep-work)")
    found = localization.localize_profiles(json.loads(kept[0].read_text()))
    register = kept[0].parents[1] / "register_atlas"
    if found["thresholds"]["method"] == "calibrated":
        coords = register / "subject_coords_in_template.nii.gz"
        found = localization.with_mirrored_finding(found, mirrored_rule(
            nib.load(register / "fa_in_template.nii.gz").get_fdata(),
            nib.load(coords).get_fdata() if coords.is_file() else affine_subject_coords(register),
            found["thresholds"]))
    return {**metrics, "localization": found}


def affine_subject_coords(register):
    """For runs made before ``register_atlas`` kept the subject's position of each template
    voxel: that position through the registration's affine part alone (a few mm from
    the warp's)."""
    template = nib.load(atlases.template_fa_path())
    qc = json.loads((register / "registration_qc.json").read_text())
    to_subject = np.asarray(qc["affine_template_to_subject"]) @ template.affine
    ijk = np.moveaxis(np.indices(template.shape, dtype=np.float64), 0, -1)
    return nib.affines.apply_affine(to_subject, ijk)


def noise_sigma(run, run_root):
    """The unmodified run's MP-PCA noise σ (signal units), computed once."""
    path = run_root / "noise.json"
    run_root.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return json.loads(path.read_text())["noise_sigma"]
    series = degrade.read_series(run.dwi)
    sigma = degrade.estimate_noise_sigma(series.data, series.bvals, series.affine,
                                         b0_threshold=B0_THRESHOLD)
    path.write_text(json.dumps({"noise_sigma": sigma, "method": "MP-PCA median in brain mask"}))
    return sigma


def write_copy(series, run, bids_root, condition, *, sigma, note):
    """Degrade ``series`` (``condition``) and write it as the run in ``bids_root``."""
    degrade.start_bids_copy(run.dataset, bids_root)
    if condition != "original":
        series, info = degrade.degrade_series(series, condition, b0_threshold=B0_THRESHOLD,
                                              noise_sigma=sigma, seed=run.seed)
        note = {**note, **{k: v for k, v in info.items() if k != "volumes_kept"}}
    degrade.write_series(series, bids_root / run.rel_dir, run.base,
                         sidecar=run.dwi.with_name(f"{run.base}_dwi.json"),
                         note={"condition": condition, **note})


def healthy_copy(run, run_root, condition):
    """``make_copy`` for the healthy run of ``condition`` (originals: links)."""
    def make(bids_root):
        if condition == "original":
            degrade.start_bids_copy(run.dataset, bids_root)
            degrade.link_run(run.dwi, bids_root / run.rel_dir)
            return
        sigma = noise_sigma(run, run_root) if condition == "lowsnr" else None
        write_copy(degrade.read_series(run.dwi), run, bids_root, condition, sigma=sigma,
                   note={"source": str(run.dwi)})
    return make


def lesion_sites(profiles_tsv, levels, sides):
    """(side, level, node, centre RAS mm) for every level and side the profile allows."""
    profiles = read_profiles(profiles_tsv)
    sites = []
    for side in sides:
        for level in levels:
            site = profile_lesion_site(profiles[side]["level"], profiles[side]["xyz"], level,
                                       end_nodes=DEFAULT_THRESHOLDS["end_nodes"],
                                       min_nodes=MIN_LEVEL_NODES)
            if site is not None:
                sites.append((side, level, *site))
    return sites


class Lesion:
    """One implanted lesion of a run: its truth, and its native lesioned series on demand."""

    def __init__(self, run, run_root, site, fa_drop):
        side, level, node, centre = site
        self.run, self.root = run, run_root / f"{side}-{level}-fa{round(100 * fa_drop)}"
        self.site, self.fa_drop = site, fa_drop
        self._series = None
        truth_file = self.root / "truth.json"
        if truth_file.is_file():
            self.truth = json.loads(truth_file.read_text())
        else:
            self.truth = {"run": run.stem, "subject": run.label, "side": side, "level": level,
                          "node": node, "centre_ras_mm": [round(float(v), 2) for v in centre],
                          "radius_mm": RADIUS_MM, "fa_drop": fa_drop}

    def series(self):
        """The native scan with the lesion (implanted once per invocation; truth saved)."""
        if self._series is None:
            native = degrade.read_series(self.run.dwi)
            lesioned, info = implant_lesion(native.data, native.bvals, native.bvecs_fsl,
                                            native.affine, self.truth["centre_ras_mm"],
                                            radius_mm=RADIUS_MM, fa_drop=self.fa_drop,
                                            b0_threshold=B0_THRESHOLD)
            self._series = degrade.Series(lesioned, native.affine, native.bvals,
                                          native.bvecs_fsl, native.header)
            if "fa_before" not in self.truth:
                self.truth.update(info)
                self.root.mkdir(parents=True, exist_ok=True)
                (self.root / "truth.json").write_text(json.dumps(self.truth, indent=1))
        return self._series

    def make_copy(self, condition, run_root):
        def make(bids_root):
            sigma = noise_sigma(self.run, run_root) if condition == "lowsnr" else None
            write_copy(self.series(), self.run, bids_root, condition, sigma=sigma,
                       note={"source": str(self.run.dwi), "lesion": self.truth})
        return make


def score(truth, localization):
    """The lesion row: found, side, level and peak checks against ``truth``."""
    found = bool(localization.get("umn_damage"))
    row = {"assessable": bool(localization.get("assessable")), "found": found,
           "found_side": localization.get("affected_side") if found else None,
           "found_level": localization.get("level") if found else None,
           "peak_error_mm": None}
    if found:
        levels = [localization.get("level")] + list(localization.get("levels_near_boundary")
                                                     or [])
        row["side_ok"] = row["found_side"] == truth["side"]
        row["level_ok"] = truth["level"] in levels
        row["peak_error_mm"] = round(float(np.linalg.norm(
            np.subtract(localization["peak_ras_mm"], truth["centre_ras_mm"]))), 1)
        row["peak_ok"] = row["peak_error_mm"] <= PEAK_TOLERANCE_MM
    else:
        row.update(side_ok=False, level_ok=False, peak_ok=False)
    row["success"] = row["found"] and row["side_ok"] and row["level_ok"] and row["peak_ok"]
    # The profile test's finding is the verdict whenever it has one (localization module).
    row["detected_by"] = list(localization.get("detected_by") or [])
    row["success_profile_test"] = row["success"] and "profile" in row["detected_by"]
    return row


def _count(rows, key):
    return f"{sum(bool(r[key]) for r in rows)}/{len(rows)}"


def lesion_table(rows, groups):
    """Markdown: one row per (severity, group), the group from ``groups`` (name → conditions)."""
    lines = [f"| severity | data | lesions | found | side correct | level correct | peak ≤ "
             f"{PEAK_TOLERANCE_MM:g} mm | all four | all four, profile test alone | "
             f"peak error median / max (mm) | not assessable |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for severity in dict.fromkeys(r["severity"] for r in rows):
        for group, conditions in groups.items():
            mine = [r for r in rows if r["severity"] == severity and r["condition"] in conditions]
            if not mine:
                continue
            errors = [r["peak_error_mm"] for r in mine if r["found"]]
            error = f"{np.median(errors):.1f} / {max(errors):.1f}" if errors else "–"
            drop = round(100 * mine[0]["fa_drop"])
            lines.append(f"| {severity} (FA −{drop} %) | {group} | {len(mine)} | "
                         f"{_count(mine, 'found')} | {_count(mine, 'side_ok')} | "
                         f"{_count(mine, 'level_ok')} | {_count(mine, 'peak_ok')} | "
                         f"{_count(mine, 'success')} | {_count(mine, 'success_profile_test')} | "
                         f"{error} | "
                         f"{sum(not r['assessable'] for r in mine)} |")
    return "\n".join(lines)


def healthy_table(rows, conditions):
    lines = ["| data | runs | assessable | false findings | rate (of assessable) |",
             "|---|---|---|---|---|"]
    for name, mine in [(c, [r for r in rows if r["condition"] == c]) for c in conditions] + \
            [("all", rows)]:
        if not mine:
            continue
        assessable = sum(r["assessable"] for r in mine)
        false = sum(r["finding"] for r in mine)
        rate = f"{100 * false / assessable:.1f} %" if assessable else "–"
        lines.append(f"| {name} | {len(mine)} | {assessable} | {false} | {rate} |")
    return "\n".join(lines)


def lesion_details(rows):
    lines = ["| run | side | level | FA drop | data | FA in sphere | found | side | level | "
             "peak error mm | success |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fa = (f"{r['fa_before']:.2f} → {r['fa_after']:.2f}" if "fa_before" in r else "–")
        lines.append(
            f"| {r['run']} | {r['side']} | {r['level']} | {round(100 * r['fa_drop'])} % | "
            f"{r['condition']} | {fa} | {'yes' if r['found'] else 'no'} | "
            f"{r['found_side'] or '–'} | {r['found_level'] or '–'} | "
            f"{'–' if r['peak_error_mm'] is None else r['peak_error_mm']} | "
            f"{'yes' if r['success'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for the protocol.")
    parser.add_argument("--bids", type=Path, action="append",
                        help="BIDS dataset (repeatable; default: ../shared/data/bids and "
                             "../shared/data/bids-clinical)")
    parser.add_argument("--subjects", nargs="+",
                        help="subject labels (default: every subject of the datasets)")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune",
                        help="which half of the fixed subject split (default tune)")
    parser.add_argument("--degradations", nargs="+", choices=CONDITIONS,
                        default=list(CONDITIONS), help="conditions (default: all)")
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--severity", nargs="+", choices=sorted(SEVERITY_FA_DROP),
                        default=["severe", "mild"])
    parser.add_argument("--severe-fa-drop", type=float, default=SEVERITY_FA_DROP["severe"],
                        help="relative FA drop of a severe lesion (default 0.55)")
    parser.add_argument("--mild-fa-drop", type=float, default=SEVERITY_FA_DROP["mild"],
                        help="relative FA drop of a mild lesion (default 0.27)")
    parser.add_argument("--no-lesions", action="store_true", help="healthy runs only")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-jobs", type=int, default=1, help="passed to cst-report")
    parser.add_argument("--max-runs", type=int,
                        help="stop after this many cst-report runs (0: tables of the cache)")
    parser.add_argument("--refresh", action="store_true",
                        help="rerun cst-report on finished runs too (it resumes from its work "
                             "folder)")
    parser.add_argument("--reassess", action="store_true",
                        help="judge finished runs again with the current detection code and "
                             "defaults, from the profiles kept in their work folders, without "
                             "rerunning cst-report (seconds per run; nothing is written but the "
                             "tables)")
    parser.add_argument("--no-keep-work", action="store_true",
                        help="do not pass --keep-work to cst-report (saves disk: a run's work "
                             "folder is ~10x its input, but --refresh then redoes whole runs)")
    args = parser.parse_args(argv)
    drops = {"severe": args.severe_fa_drop, "mild": args.mild_fa_drop}
    for name, drop in drops.items():
        if not 0 < drop < 1:
            parser.error(f"--{name}-fa-drop must be between 0 and 1")
    subjects = None if args.subjects is None else \
        [s[4:] if s.startswith("sub-") else s for s in args.subjects]
    runs = find_runs(args.bids or DEFAULT_BIDS, subjects)
    if args.split != "all":
        left_out = sorted({r.label for r in runs if split_of(r.label) != args.split})
        runs = [r for r in runs if split_of(r.label) == args.split]
        if left_out and subjects is not None:
            print(f"not in the {args.split} half, left out: {', '.join(left_out)}")
    if not runs:
        raise SystemExit("no runs selected")
    conditions = [c for c in CONDITIONS if c in args.degradations]
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.n_jobs, args.max_runs, args.refresh, keep_work=not args.no_keep_work,
                    reassess=args.reassess)
    print(f"{len(runs)} runs of {len({r.label for r in runs})} subjects ({args.split}); "
          f"conditions {', '.join(conditions)}; cst-report "
          f"{'with' if runner.keep_work else 'without'} --keep-work", flush=True)

    healthy, skipped, originals = [], [], {}
    wanted = [c for c in conditions if c != "original"]
    if "original" in conditions or not args.no_lesions:  # the lesions' sites come from it
        wanted.insert(0, "original")
    for condition in wanted:
        for run in runs:
            run_root = args.out / "runs" / run.stem
            reason = run.skip_reason(condition)
            if reason is not None:
                skipped.append((run.stem, condition, reason))
                continue
            metrics = runner.result(run_root / "healthy" / condition, run,
                                    healthy_copy(run, run_root, condition),
                                    f"{run.stem} {condition}")
            if condition == "original":
                originals[run.stem] = metrics
            if metrics is None or condition not in conditions:
                continue
            loc = metrics["localization"]
            healthy.append({"run": run.stem, "condition": condition,
                            "assessable": bool(loc["assessable"]),
                            "finding": bool(loc["umn_damage"]),
                            "side": loc.get("affected_side"), "level": loc.get("level")})

    lesion_rows = []
    lesion_conditions = [c for c in conditions if c != "original"]
    if "original" in conditions:
        lesion_conditions.insert(0, "original")
    lesion_jobs = []  # (severity, condition, run, lesion)
    if not args.no_lesions:
        for run in runs:
            metrics = originals.get(run.stem)
            if metrics is None or not metrics["localization"]["assessable"]:
                continue
            run_root = args.out / "runs" / run.stem
            tsv = run_root / "healthy" / "original" / "out" / run.rel_dir / \
                f"{run.stem}_desc-profiles_tractometry.tsv"
            if not tsv.is_file():
                continue
            for site in lesion_sites(tsv, args.levels, args.sides):
                for severity in args.severity:
                    lesion = Lesion(run, run_root, site, drops[severity])
                    for condition in lesion_conditions:
                        if run.skip_reason(condition) is None:
                            lesion_jobs.append((severity, condition, run, lesion))
    order = {c: i for i, c in enumerate(CONDITIONS)}
    lesion_jobs.sort(key=lambda j: (args.severity.index(j[0]), order[j[1]]))
    for severity, condition, run, lesion in lesion_jobs:
        run_root = args.out / "runs" / run.stem
        side, level = lesion.site[:2]
        metrics = runner.result(lesion.root / condition, run,
                                lesion.make_copy(condition, run_root),
                                f"{run.stem} {side} {level} {severity} {condition}")
        if metrics is None:
            continue
        lesion_rows.append({**lesion.truth, "severity": severity, "condition": condition,
                            **score(lesion.truth, metrics["localization"])})

    # Tables.
    present = {r["condition"] for r in lesion_rows}
    degraded = [c for c in lesion_conditions if c not in ("original", "xflip") and c in present]
    groups = {"native": ["original"], "degraded (" + ", ".join(degraded) + ")": degraded,
              "xflip": ["xflip"]}
    half = "both halves" if args.split == "all" else f"{args.split} half"
    text = [f"## Validation ({half}): {len(runs)} runs of "
            f"{len({r.label for r in runs})} subjects", "",
            "Healthy runs (any finding is false):", "", healthy_table(healthy, conditions)]
    if lesion_rows:
        subjects_with = sorted({r["subject"] for r in lesion_rows})
        text += ["", f"Lesions ({len(subjects_with)} subjects: {', '.join(subjects_with)}; "
                 f"{RADIUS_MM:g} mm spheres; implanted into the native scan, then degraded):",
                 "", lesion_table(lesion_rows, groups), "", "Lesions per condition:", "",
                 lesion_table(lesion_rows, {c: [c] for c in lesion_conditions})]
        if len(subjects_with) < MIN_LESION_SUBJECTS:
            text += ["", f"(fewer than {MIN_LESION_SUBJECTS} subjects with lesions)"]
    if skipped:
        by_condition = {}
        for stem, condition, reason in skipped:
            by_condition.setdefault(condition, []).append(f"{stem[4:]} ({reason})")
        text += ["", "Not degraded (already that coarse): " + "; ".join(
            f"{condition}: {', '.join(items)}" for condition, items in by_condition.items()
            if condition in conditions)]
    if runner.failed:
        text += ["", f"FAILED (retried by the next invocation; see each run's "
                 f"cst-report.log): {'; '.join(runner.failed)}"]
    if runner.pending:
        text += ["", f"PARTIAL: {runner.pending} runs left for a later invocation "
                 f"(--max-runs {args.max_runs}); lesion runs of unfinished originals not "
                 f"counted."]
    text = "\n".join(text)
    print("\n" + text)
    false = [r for r in healthy if r["finding"]]
    if false:
        print("\nFalse findings: " + "; ".join(f"{r['run']} {r['condition']}: {r['side']} "
                                               f"{r['level']}" for r in false))
    (args.out / "tables.md").write_text(text + "\n")
    (args.out / "lesions.md").write_text(lesion_details(lesion_rows) + "\n")
    (args.out / "validation.json").write_text(json.dumps(
        {"split": args.split, "runs": [r.stem for r in runs], "healthy": healthy,
         "lesions": lesion_rows, "skipped": skipped, "pending": runner.pending},
        indent=1, default=str))


if __name__ == "__main__":
    main()
