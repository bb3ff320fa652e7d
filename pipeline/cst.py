"""The corticospinal tract as data, as pyAFQ's ``bundle_dict`` defines a bundle: its two
sides and their names, the atlas ROIs a streamline must pass from the brainstem up, those
of the other side it must not touch, and where its profiles may start.

The ROI images, labels and levels are the atlas's (:mod:`atlases`); this module says
which of them make the tract.
"""

#: The two CSTs, as every module names them: side, BIDS ``hemi-`` label, and the tract
#: name of the profiles TSV (pyAFQ-style ``tractID``).
SIDES = ("left", "right")
HEMI = {"left": "L", "right": "R"}
TRACT_NAMES = {"left": "CST_L", "right": "CST_R"}
#: pyAFQ's names of the two CSTs (its ``tractID`` values).
AFQ_TRACT_NAMES = {"left": "Left Corticospinal", "right": "Right Corticospinal"}

#: The CST's landmark ROIs from the brainstem up (atlas names without the hemisphere).
CST_WAYPOINTS = ("medulla", "pons", "peduncle", "plic", "motor")
#: The lowest MNI height (mm) a profile may start at, by inferior landmark: the bottom of
#: the JHU corticospinal label (medulla) or of the landmark's atlas level band.
LANDMARK_FLOOR_MNI_Z = {"medulla": -55.0, "pons": -43.5, "peduncle": -22.0}
#: The other side's ROIs a streamline of one side must not touch: above the decussation
#: a CST stays on its own side.
CONTRALATERAL_EXCLUDED = ("peduncle", "plic", "motor")
#: Readable names of the CST ROIs' regions (atlases/README.md), for the ROIs' label table.
ROI_REGIONS = {"motor": "motor target", "plic": "posterior limb of the internal capsule",
               "peduncle": "cerebral peduncle", "pons": "corticospinal tract in the pons",
               "medulla": "corticospinal tract in the medulla"}


def other_side(side):
    """The side opposite ``side`` ("left" or "right")."""
    return SIDES[1 - SIDES.index(side)]
