"""Stages from the tensor maps to the tract profiles: template registration, fibre ODFs,
CST tracking and the profiles with their bootstrap replicates."""

import json
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine

import atlases

from ..cst import AFQ_TRACT_NAMES, HEMI, LANDMARK_FLOOR_MNI_Z, SIDES, TRACT_NAMES
from ..errors import InputError
from ..io import outputs
from ..io.dwi import B0_THRESHOLD, load_dwi
from ..io.profiles_table import write_profiles_tsv
from ..reconstruction import fodf, registration, tensor
from ..stage import stage
from ..tracking import propagation, selection
from ..tractometry import profiles, uncertainty
from .files import load_array


@stage(outputs=("rois", "mni_z", "template_mask", "warped_fa", "subject_coords", "qc"))
def register_atlas(fa_file, mask_file, *, out_dir, n_jobs=1):
    """Register FA to the MNI FA template; bring the CST ROIs and MNI heights to the subject.

    ``n_jobs`` ≥ 2 puts SyN's field inversions on two threads (same result).

    Returns dict of paths: ``rois`` (subject grid, int16), ``mni_z`` (the MNI z
    coordinate, mm, of every subject voxel, from which the level bands follow;
    NaN outside the template grid), ``template_mask`` (the template brain mask on the subject
    grid, for QC), ``warped_fa`` (the FA on the template grid) with ``subject_coords``
    (the subject's world position of every template voxel) for the mirrored-asymmetry
    rule (:mod:`pipeline.tractometry.mirrored`), and ``qc`` (JSON: template
    correlation, per-ROI coverage).
    """
    out_dir = Path(out_dir)
    fa, fa_img = load_array(fa_file)
    mask, _ = load_array(mask_file, dtype=np.uint8)
    template_fa, template_img = load_array(atlases.template_fa_path())
    template_mask, _ = load_array(atlases.brain_mask_path(), dtype=np.uint8)
    template_rois, _ = load_array(atlases.cst_rois_path(), dtype=np.int16)

    mapping, affine_matrix = registration.register_fa_to_template(
        fa, fa_img.affine, template_fa, template_img.affine, n_threads=min(n_jobs, 2))
    warped_fa = registration.subject_to_template(mapping, fa)
    mask_in_template = registration.subject_to_template(mapping, mask, interpolation="nearest")
    template_in_subject = registration.labels_to_subject(mapping, template_mask)
    qc = {
        "template_fa_correlation": round(registration.registration_quality(
            warped_fa, template_fa, template_mask), 3),
        # On the subject grid, so only the scanned field of view counts.
        "template_mask_dice": round(registration.dice(template_in_subject, mask), 3),
        "roi_coverage": {name: round(value, 3) for name, value in registration.roi_coverage(
            mask_in_template, template_rois, atlases.CST_ROI_LABELS).items()},
        "parameters": registration.registration_parameters(),
        "affine_template_to_subject": np.round(affine_matrix, 5).tolist(),
        # Stretch factors of the affine part: an adult head is within ~15 % of the template.
        "affine_scales": np.round(np.linalg.svd(affine_matrix[:3, :3], compute_uv=False),
                                  3).tolist(),
    }
    rois = registration.labels_to_subject(mapping, template_rois) * (mask > 0)
    mni_z = registration.template_z_in_subject(mapping, template_img.affine, template_fa.shape)
    paths = {
        "rois": outputs.save_nifti(out_dir / "cst_rois.nii.gz", rois, fa_img.affine,
                                   dtype=np.int16),
        "mni_z": outputs.save_nifti(out_dir / "mni_z.nii.gz", mni_z, fa_img.affine),
        "warped_fa": outputs.save_nifti(out_dir / "fa_in_template.nii.gz", warped_fa,
                                        template_img.affine),
        "template_mask": outputs.save_nifti(out_dir / "template_mask_in_subject.nii.gz",
                                            template_in_subject, fa_img.affine, dtype=np.uint8),
        "subject_coords": outputs.save_nifti(
            out_dir / "subject_coords_in_template.nii.gz",
            registration.subject_coordinates_in_template(mapping, fa_img.affine, fa.shape),
            template_img.affine),
        "qc": outputs.write_json(out_dir / "registration_qc.json", qc),
    }
    return {k: str(v) for k, v in paths.items()}


@stage(outputs=("sh", "qc"))
def fit_fodf(dwi_file, bval_file, bvec_file, mask_file, fa_file, rois_file, outliers_file, *,
             out_dir, model="dti", fa_stop=0.2, b0_threshold=B0_THRESHOLD, n_jobs=1,
             md_file=None):
    """Choose the tracking model for the acquisition and, for CSD, fit the fibre ODFs.

    Parameters
    ----------
    model : {"dti", "csd", "auto"}
        See :func:`pipeline.reconstruction.fodf.choose_model`; "csd" on too few directions is an
        input error. On multi-shell data CSD is multi-shell multi-tissue
        (:func:`pipeline.reconstruction.fodf.fit_csd_msmt`), on single-shell data single-shell
        (:func:`pipeline.reconstruction.fodf.fit_csd`).
    md_file : path, optional
        The tensor's MD: needed for multi-shell CSD (its grey-matter and CSF responses).

    Returns dict of paths: ``sh`` (spherical-harmonic coefficients of the (white-matter)
    fibre ODF, or None for the tensor) and ``qc`` (JSON: the choice, its reason, the
    response functions).
    CSD is fitted in brain voxels with FA ≥ ``fa_stop`` (tracking stops elsewhere)
    inside :func:`pipeline.tracking.selection.cst_search_box`; outlier volumes are left out
    as for the tensor.
    """
    out_dir = Path(out_dir)
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    keep = np.ones(len(scan.bvals), dtype=bool)
    keep[list(excluded)] = False
    bvals, bvecs = scan.bvals[keep], scan.bvecs_fsl[keep]
    choice = fodf.choose_model(bvals, bvecs, b0_threshold, requested=model)
    if model == "csd" and choice["sh_order"] is None:
        raise InputError(
            f"CSD was asked for, but only {choice['n_directions']} distinct directions are on "
            f"the b={choice['shell_bvalue']:g} shell; order 4 needs "
            f"{fodf.SH_ORDER_BY_DIRECTIONS[-1][0]}.", path=dwi_file,
            fix="Track with the tensor (--model dti or auto).")
    qc = {**choice, "requested": model}
    sh_path = None
    if choice["model"] == "csd":
        mask = load_array(mask_file, dtype=np.uint8)[0] > 0
        fa, _ = load_array(fa_file)
        rois, _ = load_array(rois_file, dtype=np.int16)
        fit_mask = mask & (fa >= fa_stop) & selection.cst_search_box(rois, scan.affine)
        data = scan.img.get_fdata(dtype=np.float32)  # a memory map: the fits read their voxels
        if choice["csd_kind"] == "msmt":
            if md_file is None:
                raise ValueError("multi-shell CSD needs the tensor's MD (md_file)")
            md, _ = load_array(md_file)
            sh, info = fodf.fit_csd_msmt(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                                         fa, md, b0_threshold=b0_threshold,
                                         shells=choice["shells"], sh_order=choice["sh_order"],
                                         fit_mask=fit_mask, n_jobs=n_jobs, volumes=keep)
        else:
            sh, info = fodf.fit_csd(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask, fa,
                                    b0_threshold=b0_threshold, shell=choice["shell_bvalue"],
                                    sh_order=choice["sh_order"], fit_mask=fit_mask,
                                    n_jobs=n_jobs, volumes=keep)
        sh_path = str(outputs.save_nifti(out_dir / "fodf_sh.nii", sh, scan.affine))
        qc.update(info, n_fitted_voxels=int(fit_mask.sum()), sh_basis=fodf.SH_BASIS)
    return {"sh": sh_path, "qc": str(outputs.write_json(out_dir / "fodf_qc.json", qc))}


def _centroid_mm(region, affine):
    """World mm centroid of a boolean region (None when empty)."""
    ijk = np.argwhere(region)
    return apply_affine(affine, ijk.mean(axis=0)) if len(ijk) else None


@stage(outputs=("left", "right", "qc"))
def track_cst(fa_file, v1_file, mask_file, rois_file, registration_qc_file, mni_z_file, *,
              out_dir,
              sh_file=None, fodf_qc_file=None, direction="prob", fa_stop=0.2, gap_fa=0.1,
              corridor_radius_mm=8.0, max_angle_deg=45.0, step_mm=0.5, seeds_per_voxel=10,
              min_coverage=0.6, n_jobs=1, seed=0, dask_scheduler=None):
    """Track, select, orient, clip and clean CST_L and CST_R.

    With ``sh_file`` (CSD fibre ODFs from :func:`fit_fodf`) the tracking follows
    them, ``direction`` "prob" or "det"; without, the tensor's principal direction
    (deterministic). The model choice (``fodf_qc_file``) is kept in the tracking QC.

    The CST runs through its waypoint ROIs from the lowest brainstem level scanned
    on both sides and followed by both tracts
    (:func:`pipeline.tracking.selection.lowest_kept_landmark`: medulla, else pons, else
    peduncle) to the motor target. Tracking stops below ``fa_stop``, except inside each side's CST
    corridor (within ``corridor_radius_mm`` of the line through its waypoints'
    centroids), where it crosses FA down to ``gap_fa``
    (:func:`pipeline.tracking.propagation.bridge_low_fa`): a lesion must not erase the tract
    it damages. ``gap_fa`` ≥ ``fa_stop`` turns this off.

    The seed chunks are tracked over ``n_jobs`` local workers, or on the Dask
    cluster named by ``dask_scheduler`` (an address, or ``"slurm"``; see
    :func:`pipeline.parallel.dask_backend`); the streamlines are the same.

    Both sides are clipped from one MNI height (``mni_z_file``, from
    :func:`register_atlas`; :func:`pipeline.tracking.selection.common_start_height`: the
    landmark's floor, or higher where fewer than 80 % of either side's
    streamlines reach down) to their motor target, so that node 0 lies at the same
    anatomy on both sides, and on repeated scans.

    Returns dict of paths: ``left``, ``right`` (.trk, world mm, inferior end
    first, clipped as above) and ``qc``.
    """
    out_dir = Path(out_dir)
    fa, fa_img = load_array(fa_file)
    v1, _ = load_array(v1_file)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
    rois, _ = load_array(rois_file, dtype=np.int16)
    mni_z, _ = load_array(mni_z_file)
    coverage = json.loads(Path(registration_qc_file).read_text())["roi_coverage"]
    labels = atlases.CST_ROI_LABELS
    chains = selection.candidate_waypoints(coverage, min_coverage)
    affine = fa_img.affine

    seed_region = np.zeros(mask.shape, dtype=bool)
    for side in SIDES:
        for roi in chains[0][:-1]:  # every waypoint below the motor target
            seed_region |= rois == labels[f"{roi}_{HEMI[side]}"]
    seed_region &= fa >= fa_stop
    seeds = propagation.seeds_in_mask(seed_region, affine, seeds_per_voxel=seeds_per_voxel,
                                      random_seed=seed)
    corridor = np.zeros(mask.shape, dtype=bool)
    for side in SIDES:
        centroids = [_centroid_mm(rois == labels[f"{roi}_{HEMI[side]}"], affine)
                     for roi in chains[0]]
        centroids = [c for c in centroids if c is not None]
        if len(centroids) >= 2:
            corridor |= propagation.corridor_mask(np.array(centroids), mask.shape, affine,
                                                  radius_mm=corridor_radius_mm)
    corridor &= mask
    brain_fa = np.where(mask, fa, 0)
    stop_map = propagation.bridge_low_fa(brain_fa, corridor, fa_stop=fa_stop,
                                         gap_fa=gap_fa)
    common = dict(fa_stop=fa_stop, max_angle_deg=max_angle_deg, step_mm=step_mm, n_jobs=n_jobs,
                  random_seed=seed, dask_scheduler=dask_scheduler)
    choice = json.loads(Path(fodf_qc_file).read_text()) if fodf_qc_file else None
    if sh_file:
        sh, _ = load_array(sh_file)
        streamlines = propagation.track_csd(seeds, sh, stop_map, affine, direction=direction,
                                            **common)
        kind = ("multi-shell multi-tissue CSD (white-matter fODF)"
                if choice and choice.get("csd_kind") == "msmt" else "CSD")
        method = f"{kind}, {'probabilistic' if direction == 'prob' else 'deterministic'}"
    else:
        streamlines = propagation.track_dti_deterministic(seeds, v1, stop_map, mask, affine,
                                                          **common)
        method = "tensor, deterministic"

    qc = {"method": method, "n_seeds": int(len(seeds)), "n_streamlines_tracked": len(streamlines),
          "corridor_voxels": int(corridor.sum()),
          "bridged_voxels": int(np.count_nonzero(stop_map != brain_fa)),
          "sides": {}}
    if choice is not None:
        qc["model_choice"] = choice
    waypoints, chosen, qc["landmark_streamlines"] = selection.lowest_kept_landmark(
        streamlines, rois, affine, chains)
    qc["inferior_landmark"], qc["waypoints"] = waypoints[0], list(waypoints)
    selected = {side: selection.orient_inferior_first(
        chosen[side], selection.heights_along(chosen[side], mni_z, affine)) for side in SIDES}
    start_height = selection.common_start_height([selected[s][1] for s in SIDES],
                                                 floor=LANDMARK_FLOOR_MNI_Z[waypoints[0]])
    qc["profile_start_mni_z"] = round(start_height, 2) if np.isfinite(start_height) else None
    paths = {}
    for side in SIDES:
        h = HEMI[side]
        clipped = selection.clip_from_height(*selected[side], rois, affine,
                                             start_height=start_height,
                                             upper=labels[f"motor_{h}"])
        cleaned = selection.clean_bundle(clipped)
        qc["sides"][side] = {"selected": len(selected[side][0]), "clipped": len(clipped),
                             "cleaned": len(cleaned)}
        paths[side] = outputs.save_trk(out_dir / f"cst_{h}.trk", cleaned, fa_img)
    paths["qc"] = outputs.write_json(out_dir / "tracking_qc.json", qc)
    return {k: str(v) for k, v in paths.items()}


@stage(outputs=("tsv", "json"))
def tract_profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, mni_z_file,
                   rois_file, dwi_file, bval_file, bvec_file, outliers_file, *, out_dir, subject,
                   b0_threshold=B0_THRESHOLD, max_bvalue=tensor.DTI_MAX_BVALUE, seed=0):
    """100-node profiles of both CSTs (TSV), per-side summaries and asymmetry (JSON).

    The JSON also holds :data:`pipeline.tractometry.uncertainty.N_BOOTSTRAP` bootstrap
    replicates of the asymmetry profile (``fa_ai_bootstrap``; wild bootstrap of
    the tensor fit on the preprocessed series ``dwi_file``, with the volumes the
    tensor was fitted on, and resampled streamlines; same ``seed``, same replicates)
    and the per-node standard errors of FA and AI derived from them.

    Each node's level is the atlas band (:data:`atlases.LEVEL_Z_RANGES`) of its
    MNI height (``mni_z_file``, :func:`register_atlas`), also kept per node
    (``node_mni_z``).

    The TSV has our columns (``tract, node, fa, md, rd, ad, x, y, z, level``)
    and pyAFQ's (``subjectID, tractID, nodeID, dti_fa, dti_md, dti_rd, dti_ad``;
    ``tractID`` as pyAFQ names the CSTs, :data:`pipeline.cst.AFQ_TRACT_NAMES`), so scripts
    written for pyAFQ's tract profiles read it unchanged.
    """
    out_dir = Path(out_dir)
    maps = {}
    for name, path in zip(profiles.PROFILE_METRICS, (fa_file, md_file, rd_file, ad_file)):
        maps[name], img = load_array(path)
    affine = img.affine
    mni_z, _ = load_array(mni_z_file)
    rois, _ = load_array(rois_file, dtype=np.int16)

    rows, summary, node_levels, node_xyz, fa_profiles, bundles = [], {}, {}, {}, {}, {}
    node_mni_z = {}
    for side, trk in zip(SIDES, (left_trk, right_trk)):
        bundle = bundles[side] = outputs.load_streamlines(trk)
        prof = profiles.tract_profiles(bundle, maps, affine)
        summary[side] = profiles.bundle_summary(bundle, prof)
        xyz = prof["xyz"]
        node_mni_z[side] = profiles.values_at_points(mni_z, xyz, affine)
        node_levels[side] = profiles.levels_at_heights(node_mni_z[side],
                                                       atlases.LEVEL_Z_RANGES)
        summary[side]["fa_by_level"] = profiles.mean_by_level(prof["fa"], node_levels[side])
        node_xyz[side] = xyz
        fa_profiles[side] = prof["fa"]
        for node in range(profiles.N_NODES):
            row = {"tract": TRACT_NAMES[side], "node": node}
            row.update({m: _fmt(prof[m][node]) for m in profiles.PROFILE_METRICS})
            row.update({"x": _fmt(xyz[node, 0], 2), "y": _fmt(xyz[node, 1], 2),
                        "z": _fmt(xyz[node, 2], 2), "level": node_levels[side][node] or "n/a"})
            row.update({"subjectID": subject, "tractID": AFQ_TRACT_NAMES[side], "nodeID": node})
            row.update({f"dti_{m}": row[m] for m in profiles.PROFILE_METRICS})
            rows.append(row)

    plic = {side: profiles.roi_mean(maps["fa"], rois,
                                    atlases.CST_ROI_LABELS[f"plic_{HEMI[side]}"])
            for side in SIDES}
    ai_profile = profiles.asymmetry_index(fa_profiles["left"], fa_profiles["right"])
    result = {
        "cst": summary,
        "plic_fa": plic,
        "fa_ai_tract": _finite_or_none(profiles.asymmetry_index(
            summary["left"]["fa_mean"] or np.nan, summary["right"]["fa_mean"] or np.nan)),
        "fa_ai_plic": _finite_or_none(profiles.asymmetry_index(plic["left"], plic["right"])),
        "fa_ai_profile": [_finite_or_none(v) for v in ai_profile],
        "node_levels": node_levels,
        "node_xyz": {s: np.round(node_xyz[s], 2).tolist() for s in SIDES},
        "node_mni_z": {s: [_finite_or_none(v, 2) for v in node_mni_z[s]] for s in SIDES},
        **_profile_uncertainty(bundles, maps["fa"], affine, dwi_file, bval_file, bvec_file,
                               outliers_file, b0_threshold=b0_threshold,
                               max_bvalue=max_bvalue, seed=seed),
    }
    tsv = write_profiles_tsv(out_dir / "profiles.tsv", rows)
    return {"tsv": str(tsv),
            "json": str(outputs.write_json(out_dir / "profiles.json", result))}


def _profile_uncertainty(bundles, fa, affine, dwi_file, bval_file, bvec_file, outliers_file, *,
                         b0_threshold, max_bvalue, seed):
    """Bootstrap replicates of the AI profile and per-node standard errors (JSON-ready)."""
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    use, _ = tensor.dti_volumes(scan.bvals, b0_threshold=b0_threshold,
                                max_bvalue=max_bvalue, excluded=excluded)
    series = scan.img.dataobj

    def signal_of(ijk):
        # Only the sampled voxels' bounding box is read from the (uncompressed) series.
        low, high = ijk.min(axis=0), ijk.max(axis=0) + 1
        box = np.asarray(series[low[0]:high[0], low[1]:high[1], low[2]:high[2]],
                         dtype=np.float32)
        return box[tuple((ijk - low).T)][:, use]

    replicates = uncertainty.asymmetry_replicates(
        bundles, fa, signal_of, affine, bvals=scan.bvals[use], bvecs_fsl=scan.bvecs_fsl[use],
        b0_threshold=b0_threshold, random_seed=seed)
    if not replicates:
        return {"fa_ai_bootstrap": None, "fa_ai_se": None, "fa_se": None}
    return {"fa_ai_bootstrap": np.round(replicates["ai"], 5).tolist(),
            "fa_ai_se": [_finite_or_none(v) for v in np.nanstd(replicates["ai"], axis=0)],
            "fa_se": {side: [_finite_or_none(v) for v in np.nanstd(replicates["fa"][side], axis=0)]
                      for side in SIDES}}


def _fmt(value, digits=6):
    return "n/a" if not np.isfinite(value) else round(float(value), digits)


def _finite_or_none(value, digits=5):
    value = float(value)
    return round(value, digits) if np.isfinite(value) else None
