"""Pipeline stages as file-in/file-out functions, by phase of the run.

Each stage reads its inputs from files, writes its outputs into ``out_dir``
(a Nipype node's working folder when run from ``workflows``) and returns the
paths. Keeping the stages file-based is what lets Nipype cache them, resume a
killed run and ship them to other processes or cluster nodes.

Each stage names its results once (:func:`pipeline.stage.stage`); its Nipype node is
built from that and its signature (:func:`workflows.base.stage_node`), so the names of
its parameters are those of the node's inputs. The science they call lives in the
domain subpackages; here are only the files in and out. All stages are imported here,
so that the workflows name each one as ``steps.<stage>``.
"""

from .assessment import assess, make_report, write_derivatives
from .preprocessing import (
    brain_mask,
    check_gradients,
    collect_preprocessing_qc,
    combine_runs,
    correct_motion,
    denoise,
    detect_outliers,
    fit_tensor,
    remove_gibbs,
)
from .tractography import fit_fodf, register_atlas, track_cst, tract_profiles

__all__ = [
    "assess", "brain_mask", "check_gradients", "collect_preprocessing_qc", "combine_runs",
    "correct_motion", "denoise", "detect_outliers", "fit_fodf", "fit_tensor", "make_report",
    "register_atlas", "remove_gibbs", "track_cst", "tract_profiles", "write_derivatives",
]
