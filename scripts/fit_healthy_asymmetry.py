#!/usr/bin/env python3
"""Learn the healthy-asymmetry model of the calibrated detection from healthy real runs.

Reads the healthy runs that ``scripts/validate_lesions.py`` left under ``--validation``
(``runs/<run>/healthy/<condition>/``: the metrics JSON and the profiles TSV) for the
subjects of one half of its split, and writes ``pipeline/tractometry/healthy_asymmetry.json``:

- ``sd_by_level``: per atlas level, the SD of the asymmetry index that healthy CSTs
  show beyond the scan's own bootstrap noise, sqrt(mean(AI²) − mean(SE²)) over the
  nodes of that level in every run (a healthy mean asymmetry counts in it too);
- ``sd_default``: the largest of them, for nodes of unknown level;
- ``node_correlation``: the lag-one correlation of AI between neighbouring nodes;
- ``scale``: the SDs above are multiplied by the smallest factor (1.0, 1.1, ... 3.0)
  for which at most ``--target-rate`` of the runs get a finding from the calibrated
  rule (the pooled SDs assume Gaussian healthy asymmetry; real subjects have heavier
  tails). By default each volunteer's runs are judged by a model fitted without that
  volunteer (leave-one-volunteer-out), so the factor covers a person the SDs have not
  seen; ``--in-sample`` judges every run by the model fitted on all of them (which
  the first held-out test showed too optimistic: 0 of 37 tune runs, 4 of 37 held-out
  runs). Volunteers: a subject whose ``participants.tsv`` notes say "same volunteer
  as sub-X" belongs to X's. This needs each run's bootstrap replicates, kept in its
  work folder (``scripts/validate_lesions.py`` runs ``cst-report --keep-work``).

Usage (repository root, the README's venv)::

    .venv/bin/python scripts/fit_healthy_asymmetry.py --validation /tmp/cst-validation \\
        --split tune
"""

import argparse
import csv
import json
import re
import sys
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from validate_lesions import DEFAULT_BIDS, split_of  # noqa: E402

from pipeline.cst import SIDES, TRACT_NAMES  # noqa: E402
from pipeline.tractometry.localization import (  # noqa: E402
    DEFAULT_THRESHOLDS,
    HEALTHY_ASYMMETRY_FILE,
    LEVELS,
    calibrated_finding,
)

#: A level needs this many nodes over all runs for its own SD; else it takes the largest.
MIN_LEVEL_NODES = 30
#: No level's healthy SD is taken below this (AI units): a level where the bootstrap
#: happens to explain all the spread of a few runs still has some anatomical asymmetry.
MIN_SD = 0.01


def volunteers(bids_roots):
    """Subject label → volunteer label, from the ``notes`` of each ``participants.tsv``
    ("same volunteer as sub-X", "same volunteer and session as sub-X"); a subject
    not named there is its own volunteer."""
    same = re.compile(r"same volunteer(?: and session)? as sub-([A-Za-z0-9]+)")
    volunteer = {}
    for root in bids_roots:
        table = Path(root) / "participants.tsv"
        if not table.is_file():
            continue
        with open(table) as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                label = row["participant_id"].removeprefix("sub-")
                match = same.search(row.get("notes") or "")
                volunteer[label] = match.group(1) if match else label
    return volunteer


def healthy_runs(validation, half):
    """(run name, condition, AI (n,), SE (n,), left levels (n,), profiles JSON path) of
    every assessable healthy run of the subjects in ``half``."""
    for metrics_path in sorted(Path(validation).glob("runs/*/healthy/*/metrics.json")):
        condition_dir = metrics_path.parent
        run = condition_dir.parents[1].name
        label = run.split("_")[0].removeprefix("sub-")
        if half != "all" and split_of(label) != half:
            continue
        metrics = json.loads(metrics_path.read_text())
        asym = metrics["asymmetry"]
        if not metrics["qc"]["assessable"] or not asym.get("fa_ai_profile_se"):
            continue
        tsv = next(condition_dir.glob("out/sub-*/dwi/*_desc-profiles_tractometry.tsv"))
        with open(tsv) as handle:
            rows = [r for r in csv.DictReader(handle, delimiter="\t")
                    if r["tract"] == TRACT_NAMES["left"]]
        levels = [r["level"] for r in sorted(rows, key=lambda r: int(r["node"]))]
        profiles = next(condition_dir.glob("out/.cst-work/*/*/cst_wf/tract_profiles/"
                                           "profiles.json"), None)
        yield (run, condition_dir.name, _finite(asym["fa_ai_profile"]),
               _finite(asym["fa_ai_profile_se"]), levels, profiles)


def _finite(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def fit(runs):
    """The model's numbers from the runs of :func:`healthy_runs`."""
    squares = {level: [] for level in LEVELS}
    noise = {level: [] for level in LEVELS}
    lag_products, squares_all = 0.0, 0.0
    for _, _, ai, se, levels, _ in runs:
        for value, error, level in zip(ai, se, levels):
            if level in squares and np.isfinite(value) and np.isfinite(error):
                squares[level].append(value ** 2)
                noise[level].append(error ** 2)
        finite = np.nan_to_num(ai)
        lag_products += float(np.sum(finite[1:] * finite[:-1]))
        squares_all += float(np.sum(finite ** 2))
    sd = {level: float(np.sqrt(max(np.mean(squares[level]) - np.mean(noise[level]),
                                   MIN_SD ** 2)))
          for level in LEVELS if len(squares[level]) >= MIN_LEVEL_NODES}
    largest = max(sd.values())
    return {"sd_by_level": {level: round(sd.get(level, largest), 4) for level in LEVELS},
            "sd_default": round(largest, 4),
            "node_correlation": round(lag_products / squares_all, 3),
            "nodes_per_level": {level: len(squares[level]) for level in LEVELS}}


def findings(runs, model, rate=DEFAULT_THRESHOLDS["false_positive_rate"]):
    """Runs (name/condition) in which the calibrated rule with ``model`` finds damage."""
    found = []
    for run, condition, _, _, _, path in runs:
        profiles = json.loads(Path(path).read_text())
        xyz = {side: np.asarray(profiles["node_xyz"][side]) for side in SIDES}
        result = calibrated_finding(
            _finite(profiles["fa_ai_profile"]), np.asarray(profiles["fa_ai_bootstrap"], float),
            profiles["node_levels"], xyz, healthy_model=model, false_positive_rate=rate,
            window_nodes=DEFAULT_THRESHOLDS["window_nodes"],
            null_draws=DEFAULT_THRESHOLDS["null_draws"])
        if result.get("umn_damage"):
            found.append(f"{run}/{condition}")
    return found


def held_out_findings(runs, model_factor, volunteer_of):
    """Runs with a finding when each volunteer's runs are judged by the model fitted on
    the other volunteers' runs (scaled by ``model_factor``)."""
    groups = {}
    for entry in runs:
        label = entry[0].split("_")[0].removeprefix("sub-")
        groups.setdefault(volunteer_of.get(label, label), []).append(entry)
    found = []
    for own in groups.values():
        own_ids = {id(entry) for entry in own}
        others = [entry for entry in runs if id(entry) not in own_ids]
        found += findings(own, scaled(fit(others), model_factor))
    return found


def scaled(model, factor):
    """``model`` with every SD multiplied by ``factor``."""
    return {**model, "scale": factor,
            "sd_by_level": {k: round(v * factor, 4) for k, v in model["sd_by_level"].items()},
            "sd_default": round(model["sd_default"] * factor, 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validation", type=Path, required=True,
                        help="the --out folder of scripts/validate_lesions.py")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune")
    parser.add_argument("--out", type=Path, default=HEALTHY_ASYMMETRY_FILE)
    parser.add_argument("--target-rate", type=float, default=0.02,
                        help="largest share of these healthy runs with a finding (default 0.02)")
    parser.add_argument("--in-sample", action="store_true",
                        help="judge every run by the model fitted on all runs (default: "
                             "leave-one-volunteer-out)")
    parser.add_argument("--bids", type=Path, action="append",
                        help="BIDS datasets whose participants.tsv name the volunteers "
                             "(repeatable; default: those of scripts/validate_lesions.py)")
    args = parser.parse_args(argv)
    runs = list(healthy_runs(args.validation, args.split))
    if not runs:
        raise SystemExit(f"no assessable healthy run of the {args.split} half under "
                         f"{args.validation}")
    missing = [f"{run}/{condition}" for run, condition, *_, path in runs if path is None]
    if missing:
        raise SystemExit(f"no profiles.json (bootstrap replicates) in the work folder of "
                         f"{', '.join(missing)}: rerun scripts/validate_lesions.py with its "
                         f"default --keep-work")
    unscaled = fit(runs)
    volunteer_of = volunteers(args.bids or DEFAULT_BIDS)
    judged = "in sample" if args.in_sample else "leave-one-volunteer-out"
    for factor in np.round(np.arange(1.0, 3.01, 0.1), 1):
        model = scaled(unscaled, float(factor))
        found = (findings(runs, model) if args.in_sample
                 else held_out_findings(runs, float(factor), volunteer_of))
        print(f"scale {factor:.1f} ({judged}): findings in {len(found)} of {len(runs)} runs "
              f"{', '.join(found)}", flush=True)
        if len(found) <= args.target_rate * len(runs):
            break
    conditions = sorted({condition for _, condition, *_ in runs})
    n_volunteers = len({volunteer_of.get(label, label) for label in
                        (run.split("_")[0].removeprefix("sub-") for run, *_ in runs)})
    model["source"] = (f"scripts/fit_healthy_asymmetry.py, {date.today().isoformat()}: "
                       f"{len(runs)} healthy runs of the '{args.split}' half "
                       f"({len({run for run, *_ in runs})} scans of {n_volunteers} "
                       f"volunteers; {', '.join(conditions)}); scale chosen {judged}")
    args.out.write_text(json.dumps(model, indent=2) + "\n")
    print(json.dumps(model, indent=2))
    for run, condition, *_ in runs:
        print(f"  {run} {condition}")


if __name__ == "__main__":
    main()
