"""A run's files in the BIDS-Derivatives tree: their names after the run's stem, what
each holds (its sidecar's description), and the label table of the CST ROIs."""

import atlases

from ..cst import HEMI, ROI_REGIONS
from .outputs import write_text

#: Derivative file names (after the ``sub-X[_entities]`` stem) and what each holds.
DERIVATIVES = {
    "fa": ("_model-tensor_param-fa_dwimap.nii.gz", "Fractional anisotropy (DTI, WLS)"),
    "md": ("_model-tensor_param-md_dwimap.nii.gz", "Mean diffusivity, mm^2/s (DTI, WLS)"),
    "rd": ("_model-tensor_param-rd_dwimap.nii.gz", "Radial diffusivity, mm^2/s (DTI, WLS)"),
    "ad": ("_model-tensor_param-ad_dwimap.nii.gz", "Axial diffusivity, mm^2/s (DTI, WLS)"),
    "mask": ("_desc-brain_mask.nii.gz", "Brain mask (median Otsu on the mean b0 and the mean DWI)"),
    "rois": ("_desc-CSTrois_dseg.nii.gz", "CST ROIs warped from the MNI atlas (see atlases/); "
             "labels in the .tsv beside it"),
    "left": ("_hemi-L_desc-CST_tractography.trk",
             "Left CST streamlines, world RAS mm, inferior end first; TrackVis .trk and "
             "the same streamlines in TRX (.trx)"),
    "right": ("_hemi-R_desc-CST_tractography.trk",
              "Right CST streamlines, world RAS mm, inferior end first; TrackVis .trk and "
              "the same streamlines in TRX (.trx)"),
    "profiles_tsv": ("_desc-profiles_tractometry.tsv",
                     "100-node CST profiles; node 0 at the brainstem end; the .csv beside it "
                     "holds them in pyAFQ's tract-profile layout (for AFQ-Insight)"),
}
#: Sidecar fields of one derivative beyond the common ones: the Type BIDS recommends for a
#: mask, and the description of the column the ROIs' label table adds to BIDS's.
SIDECAR_FIELDS = {"mask": {"Type": "Brain"},
                  "rois": {"level": {"Description": "Level of the neuraxis the ROI lies at "
                                                    "(atlases/README.md)"}}}
#: Readable names of the CST ROIs' regions (atlases/README.md), for the ROIs' label table.


def write_roi_labels(dseg_path):
    """The label table (``_dseg.tsv``) of the CST ROI segmentation ``dseg_path``."""
    lines = ["index\tname\tabbreviation\tlevel"]
    for abbreviation, index in sorted(atlases.CST_ROI_LABELS.items(), key=lambda item: item[1]):
        region, hemi = abbreviation.rsplit("_", 1)
        side = {letter: name for name, letter in HEMI.items()}[hemi]
        lines.append(f"{index}\t{side} {ROI_REGIONS[region]}\t{abbreviation}\t"
                     f"{atlases.CST_ROI_LEVELS[abbreviation]}")
    return write_text(dseg_path.with_name(dseg_path.name.replace(".nii.gz", ".tsv")),
                      "\n".join(lines) + "\n")
