#!/usr/bin/env python
"""Write the synthetic CST phantom as a BIDS dataset (see pipeline/sims/phantom.py).

Usage: python scripts/make_demo_dataset.py BIDS_DIR [--no-lesion] [--subject X] [--seed N]
       [--lesion-side left|right] [--lesion-level internal_capsule] [--radius-mm 6]
       [--fa-drop 0.5] [--snr 30] [--n-directions 30] [--bvalues 1000 [2000 ...]]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sims.phantom import make_phantom_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Synthetic CST phantom as a BIDS dataset")
    p.add_argument("bids_dir")
    p.add_argument("--subject", default="subject01")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lesion", action="store_true")
    p.add_argument("--lesion-side", default="left", choices=["left", "right"])
    p.add_argument("--lesion-level", default="internal_capsule")
    p.add_argument("--radius-mm", type=float, default=6.0)
    p.add_argument("--fa-drop", type=float, default=0.5)
    p.add_argument("--snr", type=float, default=30.0)
    p.add_argument("--n-directions", type=int, default=30)
    p.add_argument("--bvalues", type=float, nargs="+", default=[1000.0],
                   help="shells (s/mm²), each with the --n-directions directions "
                        "(default 1000; several make a multi-shell scan)")
    a = p.parse_args(argv)
    lesion = None if a.no_lesion else {
        "side": a.lesion_side, "level": a.lesion_level, "radius_mm": a.radius_mm,
        "fa_drop": a.fa_drop}
    truth = make_phantom_dataset(a.bids_dir, subject=a.subject, lesion=lesion, seed=a.seed,
                                 n_directions=a.n_directions, snr=a.snr,
                                 bvalues=tuple(a.bvalues))
    print(json.dumps({"subject": truth["subject"], "lesion": truth["lesion"],
                      "groundtruth": str(Path(a.bids_dir) / "sourcedata" / "phantom"
                                         / f"{truth['subject']}_groundtruth.json")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
