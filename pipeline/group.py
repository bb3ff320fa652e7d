"""Group level: one tidy row per subject/run from the participants' metrics JSONs."""

import csv
import io
import json
from pathlib import Path

from .outputs import write_text

GROUP_COLUMNS = ("participant_id", "run", "assessable", "umn_damage", "affected_side", "level",
                 "peak_x", "peak_y", "peak_z", "fa_ai_tract", "fa_ai_plic",
                 "n_streamlines_left", "n_streamlines_right", "fa_mean_left", "fa_mean_right",
                 "md_mean_left", "md_mean_right", "prognosis_category")


def group_rows(out_dir):
    """Rows of the group table, from every ``*_desc-cst_metrics.json`` under ``out_dir``."""
    rows = []
    for path in sorted(Path(out_dir).glob("sub-*/**/*_desc-cst_metrics.json")):
        m = json.loads(path.read_text())
        loc, cst = m["localization"], m["cst"]
        peak = loc.get("peak_ras_mm") or [None, None, None]
        rows.append({
            "participant_id": f"sub-{m['subject']}",
            "run": path.name[: -len("_desc-cst_metrics.json")],
            "assessable": m["qc"]["assessable"], "umn_damage": loc["umn_damage"],
            "affected_side": loc["affected_side"], "level": loc["level"],
            "peak_x": peak[0], "peak_y": peak[1], "peak_z": peak[2],
            "fa_ai_tract": m["asymmetry"]["fa_ai_tract"], "fa_ai_plic": m["asymmetry"]["fa_ai_plic"],
            "n_streamlines_left": cst["left"]["n_streamlines"],
            "n_streamlines_right": cst["right"]["n_streamlines"],
            "fa_mean_left": cst["left"]["fa_mean"], "fa_mean_right": cst["right"]["fa_mean"],
            "md_mean_left": cst["left"]["md_mean"], "md_mean_right": cst["right"]["md_mean"],
            "prognosis_category": m["prognosis"]["category"],
        })
    return rows


def write_group_table(out_dir):
    """Write ``OUT/group_desc-cst_metrics.tsv`` (n/a for missing values) and return its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GROUP_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in group_rows(out_dir):
        writer.writerow({k: "n/a" if v is None else v for k, v in row.items()})
    return write_text(Path(out_dir) / "group_desc-cst_metrics.tsv", buffer.getvalue())
