"""Every known silent-failure pattern makes the CST 'not assessable', never 'normal'."""

import copy

import pytest

from pipeline.tractometry.qc import (
    DEFAULT_QC_LIMITS,
    MOTION_NOTICE_LIMITS,
    motion_notices,
    quality_control,
)

GOOD_REGISTRATION = {
    "template_fa_correlation": 0.85, "template_mask_dice": 0.95,
    "affine_scales": [1.04, 0.99, 0.96],
    "roi_coverage": {f"{roi}_{h}": 1.0 for roi in ("motor", "plic", "peduncle", "pons")
                     for h in "LR"},
}
GOOD_SUMMARY = {"left": {"n_streamlines": 500}, "right": {"n_streamlines": 480}}


def _qc(registration=GOOD_REGISTRATION, summary=GOOD_SUMMARY):
    return quality_control(registration, {}, summary, DEFAULT_QC_LIMITS)


def test_good_data_is_assessable():
    assert _qc() == (True, [])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_side_with_too_few_streamlines(side):
    summary = copy.deepcopy(GOOD_SUMMARY)
    summary[side]["n_streamlines"] = 5  # e.g. no streamline reached both cortex and brainstem
    assessable, reasons = _qc(summary=summary)
    assert not assessable and reasons == [f"Too few {side} CST streamlines (5 < 20)."]


@pytest.mark.parametrize("key, value", [("template_fa_correlation", 0.1),
                                        ("template_mask_dice", 0.3)])
def test_failed_registration(key, value):
    registration = {**GOOD_REGISTRATION, key: value}
    assessable, reasons = _qc(registration=registration)
    assert not assessable and "Registration to the MNI FA template looks failed" in reasons[0]


@pytest.mark.parametrize("roi, words", [("peduncle", "brainstem"), ("motor", "motor cortex"),
                                        ("plic", "internal capsules")])
def test_field_of_view_missing_part_of_the_cst(roi, words):
    registration = copy.deepcopy(GOOD_REGISTRATION)
    registration["roi_coverage"][f"{roi}_L"] = 0.1
    assessable, reasons = _qc(registration=registration)
    assert not assessable
    assert words in reasons[0] and "(left)" in reasons[0]


@pytest.mark.parametrize("scales", [[1.03, 0.92, 0.82], [1.3, 1.0, 0.98]])
def test_implausible_affine_stretch(scales):
    assessable, reasons = _qc(registration={**GOOD_REGISTRATION, "affine_scales": scales})
    assert not assessable and "stretched implausibly" in reasons[0]


# Motion: a notice in qc.notices, never a reason to call the CST not assessable.
# Measured on the raw series of ../shared/data (affine, to the mean b0): mean FD / largest
# translation, mm.
PHILIPS01 = {"mean_framewise_displacement_mm": 1.37, "max_translation_mm": 4.61}
PHILIPS02 = {"mean_framewise_displacement_mm": 0.67, "max_translation_mm": 0.76}
SIEMENS02 = {"mean_framewise_displacement_mm": 2.66, "max_translation_mm": 3.54}


def test_heavy_motion_is_a_notice_with_its_values_limits_and_sources():
    (notice,) = motion_notices(PHILIPS01)
    assert "largest translation from the reference 4.61 mm (notice above 2 mm)" in notice
    assert "mean framewise displacement (Power et al. 2012) 1.37 mm (notice above 1.5 mm)" \
        in notice
    assert "Yendiki et al. 2014" in notice and "no fixed cut-off" in notice
    (both,) = motion_notices(SIEMENS02)
    assert "2.66 mm" in both and "3.54 mm" in both


def test_ordinary_motion_or_no_motion_correction_gives_no_notice():
    assert motion_notices(PHILIPS02) == []
    assert motion_notices(None) == []  # --motion none
    assert motion_notices({"mean_framewise_displacement_mm": 1.5,
                           "max_translation_mm": 2.0}) == []  # at the limit: no notice
    assert motion_notices(PHILIPS02, {"max_translation_mm": 0.5})  # the limits can be set
    assert MOTION_NOTICE_LIMITS == {"mean_framewise_displacement_mm": 1.5,
                                    "max_translation_mm": 2.0}

