"""Bundled MNI152 (FSL) 2 mm atlas files for CST analysis.

All images share one grid: 91 x 109 x 91 voxels, 2 mm isotropic, RAS+ storage,
origin (-90, -126, -72) mm.  Rebuild with ``python scripts/build_atlas.py``; see
``README.md`` and ``provenance.json`` in this folder for sources and licences.
"""

from __future__ import annotations

import csv
from importlib.resources import files
from pathlib import Path

ATLAS_DIR = Path(str(files(__name__)))

TEMPLATE_FA = "tpl-MNI152_res-2_FA.nii.gz"
BRAIN_MASK = "tpl-MNI152_res-2_desc-brain_mask.nii.gz"
CST_ROIS = "tpl-MNI152_res-2_desc-CST_dseg.nii.gz"
CST_ROIS_TSV = "tpl-MNI152_res-2_desc-CST_dseg.tsv"
LEVELS = "tpl-MNI152_res-2_desc-levels_dseg.nii.gz"
LEVELS_TSV = "tpl-MNI152_res-2_desc-levels_dseg.tsv"
MIRRORED_AI_MODEL = "tpl-MNI152_res-2_desc-mirroredAI_model.nii.gz"


def template_fa_path() -> Path:
    """FA template (float32) on the 2 mm MNI grid."""
    return ATLAS_DIR / TEMPLATE_FA


def brain_mask_path() -> Path:
    """Brain mask (uint8) on the 2 mm MNI grid."""
    return ATLAS_DIR / BRAIN_MASK


def cst_rois_path() -> Path:
    """CST ROI labels (int16); see ``CST_ROI_LABELS``."""
    return ATLAS_DIR / CST_ROIS


def levels_path() -> Path:
    """Level bands along the neuraxis (int16); see ``LEVEL_LABELS``."""
    return ATLAS_DIR / LEVELS


def mirrored_ai_model_path() -> Path:
    """Healthy mirrored-FA-asymmetry model (float32, 4 volumes; JSON sidecar beside it),
    learned by ``scripts/fit_mirrored_asymmetry.py``."""
    return ATLAS_DIR / MIRRORED_AI_MODEL


def _read_tsv(name: str) -> list[dict]:
    with open(ATLAS_DIR / name, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _cst_table() -> list[dict]:
    return _read_tsv(CST_ROIS_TSV)


def _levels_table() -> list[dict]:
    return _read_tsv(LEVELS_TSV)


#: ROI name -> label value, e.g. ``{"motor_L": 1, ..., "pons_R": 8}``
CST_ROI_LABELS: dict[str, int] = {r["name"]: int(r["index"]) for r in _cst_table()}
#: ROI name -> level name, e.g. ``{"plic_L": "internal_capsule", ...}``
CST_ROI_LEVELS: dict[str, str] = {r["name"]: r["level"] for r in _cst_table()}
#: level value -> name, e.g. ``{1: "medulla", ..., 6: "cortex"}``
LEVEL_LABELS: dict[int, str] = {int(r["index"]): r["name"] for r in _levels_table()}
#: level name -> (z_min_mm, z_max_mm), half-open band in MNI z
LEVEL_Z_RANGES: dict[str, tuple[float, float]] = {
    r["name"]: (float(r["z_min_mm"]), float(r["z_max_mm"])) for r in _levels_table()
}

__all__ = [
    "ATLAS_DIR", "template_fa_path", "brain_mask_path", "cst_rois_path", "levels_path",
    "mirrored_ai_model_path",
    "CST_ROI_LABELS", "CST_ROI_LEVELS", "LEVEL_LABELS", "LEVEL_Z_RANGES",
]
