"""Fibre orientation distributions by constrained spherical deconvolution (DIPY's CSD),
and the choice between them and the tensor that the acquisition allows.

The tensor has one direction per voxel, so deterministic tensor tracking stops or
turns where the CST crosses the callosal and association fibres of the corona
radiata. CSD resolves those crossings, but needs enough directions on one shell
for its spherical-harmonic order: 15 coefficients at order 4, 28 at 6, 45 at 8.

With several shells (and b0 volumes), CSD is DIPY's multi-shell multi-tissue CSD
(Jeurissen et al., NeuroImage 2014; :func:`fit_csd_msmt`): white-matter, grey-matter and CSF
responses estimated from the data on every shell, so that partial volume with grey
matter and CSF (next to the ventricles, at the cortex) goes to the isotropic
compartments instead of blurring the white-matter fODF. Single-shell data keep
single-shell CSD (:func:`fit_csd`).
"""

import warnings

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst import mcsd
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, response_from_mask_ssst
from dipy.reconst.shm import convert_sh_from_legacy
from scipy import ndimage

from ..errors import InputError
from ..io.dwi import count_unique_directions, fsl_bvecs_to_voxel_frame
from ..parallel import parallel_map

#: (distinct directions on the shell, spherical-harmonic order): the highest order whose
#: coefficients the directions outnumber. Fewer than the last entry: tensor only.
SH_ORDER_BY_DIRECTIONS = ((45, 8), (28, 6), (16, 4))
#: FA of the single-fibre voxels whose signal gives the response function.
RESPONSE_FA = 0.7
#: Fewest single-fibre voxels for a response estimate; below it, the most anisotropic
#: voxels of the brain are used instead.
MIN_RESPONSE_VOXELS = 100
#: Voxels per CSD fitting chunk (the chunks are spread over the workers).
FIT_CHUNK_VOXELS = 4000
#: Spherical-harmonic basis of the coefficients: Descoteaux 2007 in DIPY's current,
#: non-legacy form (DIPY's CSD fits in the legacy form, which DIPY is retiring).
SH_BASIS = "descoteaux07"
#: Multi-shell multi-tissue CSD needs at least this many shells, each with the directions
#: of order 4 (the last entry of :data:`SH_ORDER_BY_DIRECTIONS`), and b0 volumes.
MSMT_MIN_SHELLS = 2
#: Tissue voxels for the multi-tissue responses, from the tensor's FA and MD (mm²/s):
#: grey matter and CSF are isotropic (FA below this) ...
ISOTROPIC_MAX_FA = 0.2
#: ... grey matter diffuses slowly (adult cortex and deep nuclei: MD 0.7-0.9e-3) ...
GM_MAX_MD = 1.1e-3
#: ... and CSF fast (free water at body temperature: 3.0e-3).
CSF_MIN_MD = 2.5e-3
#: The tissue voxels are taken this many voxels inside the brain mask's surface and the
#: image's edges: partial volume with the background, and edge slices, make FA high and S0
#: low there (the multi-shell phantom's FA ≥ 0.7 voxels: mean b0 757 in the whole mask,
#: 997 inside; the tissue's is 1000).
RESPONSE_EROSION_VOXELS = 2
#: At most this many voxels per tissue, spread evenly over those that qualify: a response
#: is a mean, and DIPY fits a tensor to every voxel it is given (a brain's grey matter and
#: CSF: some 250 000 voxels, 19 s).
MAX_RESPONSE_VOXELS = 10000
#: Voxels per multi-shell fitting chunk: DIPY solves one quadratic programme per voxel
#: (cvxpy), some 40 ms each, so smaller chunks than :data:`FIT_CHUNK_VOXELS` keep both
#: workers busy to the end.
MSMT_CHUNK_VOXELS = 500


def acquisition_shells(bvals, bvecs_fsl, b0_threshold):
    """The non-b0 shells: list of (b-value rounded to 100 s/mm², distinct directions),
    lowest b first. A shell holds the volumes within 100 s/mm² of its b-value."""
    bvals = np.asarray(bvals, dtype=float)
    shells = np.unique(np.round(bvals[bvals > b0_threshold], -2))
    found = []
    for shell in shells:
        on_shell = np.abs(bvals - shell) <= 100
        n_dirs = count_unique_directions(np.asarray(bvecs_fsl)[on_shell], bvals[on_shell],
                                         b0_threshold)
        found.append((float(shell), n_dirs))
    return found


def csd_shell(bvals, bvecs_fsl, b0_threshold):
    """The shell single-shell CSD uses: b-value (s/mm²) and its number of distinct directions.

    The shell with the most distinct directions (ties: the higher b-value).
    """
    best = (0.0, 0)
    for shell, n_dirs in acquisition_shells(bvals, bvecs_fsl, b0_threshold):
        if (n_dirs, shell) > (best[1], best[0]):
            best = (shell, n_dirs)
    return best


def sh_order_for(n_directions):
    """Spherical-harmonic order CSD can use with ``n_directions`` (None: tensor only)."""
    for needed, order in SH_ORDER_BY_DIRECTIONS:
        if n_directions >= needed:
            return order
    return None


def _bvalues_words(values):
    return ", ".join(f"{v:g}" for v in values)


def choose_model(bvals, bvecs_fsl, b0_threshold, requested="auto"):
    """Tracking model for this acquisition.

    Parameters
    ----------
    requested : {"auto", "dti", "csd"}
        ``auto``: CSD when the best shell's directions allow an order ≥ 4, else the
        tensor. ``csd`` on too few directions is refused by the caller.

    CSD is multi-shell multi-tissue (``csd_kind`` "msmt", :func:`fit_csd_msmt`) when
    the scan has b0 volumes and at least :data:`MSMT_MIN_SHELLS` shells with the
    directions of order 4; it uses those shells, at the highest order that each of
    them allows (the fODF is fitted to every shell's directions). Otherwise it is
    single-shell (``csd_kind`` "single-shell", :func:`fit_csd`) on the shell with the
    most directions.

    Returns
    -------
    dict: ``model`` ("dti" or "csd"), ``csd_kind`` ("msmt", "single-shell", or None
    for "dti"), ``shell_bvalue`` and ``n_directions`` (the shell with the most
    directions), ``sh_order`` (None for "dti"), ``shells`` and ``directions_per_shell``
    (those the CSD fit uses; empty for "dti"), ``n_b0`` and ``reason`` (one sentence
    for the report).
    """
    shell, n_dirs = csd_shell(bvals, bvecs_fsl, b0_threshold)
    order = sh_order_for(n_dirs)
    n_b0 = int(np.count_nonzero(np.asarray(bvals, dtype=float) <= b0_threshold))
    if requested == "dti" or (requested == "auto" and order is None):
        why = ("tensor asked for" if requested == "dti" else
               f"{n_dirs} directions on the b={shell:g} shell are too few for CSD "
               f"(order 4 needs {SH_ORDER_BY_DIRECTIONS[-1][0]})")
        return {"model": "dti", "csd_kind": None, "shell_bvalue": shell,
                "n_directions": n_dirs, "sh_order": None, "shells": [],
                "directions_per_shell": [], "n_b0": n_b0, "reason": why}
    found = acquisition_shells(bvals, bvecs_fsl, b0_threshold)
    usable = [(b, n) for b, n in found if sh_order_for(n) is not None]
    if n_b0 and len(usable) >= MSMT_MIN_SHELLS:
        msmt_order = min(sh_order_for(n) for _, n in usable)
        shells, dirs = [b for b, _ in usable], [n for _, n in usable]
        return {"model": "csd", "csd_kind": "msmt", "shell_bvalue": shell,
                "n_directions": n_dirs, "sh_order": msmt_order, "shells": shells,
                "directions_per_shell": dirs, "n_b0": n_b0,
                "reason": f"{len(shells)} shells (b = {_bvalues_words(shells)} s/mm²; "
                          f"{_bvalues_words(dirs)} directions) and {n_b0} b0 volumes allow "
                          f"multi-shell multi-tissue CSD of order {msmt_order}"}
    why = f"{n_dirs} directions on the b={shell:g} shell allow CSD of order {order}"
    if len(found) >= MSMT_MIN_SHELLS:  # several shells, but not for multi-shell CSD
        why += (f" (single-shell: multi-shell CSD needs b0 volumes and "
                f"{MSMT_MIN_SHELLS} shells of {SH_ORDER_BY_DIRECTIONS[-1][0]} or more "
                f"directions; here {n_b0} b0 volumes, shells b = "
                f"{_bvalues_words(b for b, _ in found)} with "
                f"{_bvalues_words(n for _, n in found)} directions)")
    return {"model": "csd", "csd_kind": "single-shell", "shell_bvalue": shell,
            "n_directions": n_dirs, "sh_order": order, "shells": [shell],
            "directions_per_shell": [n_dirs], "n_b0": n_b0, "reason": why}


def _shell_volumes(bvals, b0_threshold, shell):
    bvals = np.asarray(bvals, dtype=float)
    return (bvals <= b0_threshold) | (np.abs(bvals - shell) <= 100)


def response_mask(fa, mask):
    """Single-fibre voxels for the response: FA ≥ :data:`RESPONSE_FA` in the brain,
    or the :data:`MIN_RESPONSE_VOXELS` most anisotropic brain voxels when fewer qualify
    (low-resolution scans, where partial volume keeps FA lower)."""
    mask = np.asarray(mask, dtype=bool)
    chosen = mask & (fa >= RESPONSE_FA)
    if chosen.sum() < MIN_RESPONSE_VOXELS:
        values = np.where(mask, fa, -1.0)
        cut = np.sort(values, axis=None)[-MIN_RESPONSE_VOXELS]
        chosen = mask & (values >= cut)
    return chosen


def _fit_chunk(signals, gtab, response, sh_order):
    with warnings.catch_warnings():  # DIPY's CSD fits in the legacy basis; converted below
        warnings.filterwarnings("ignore", message="The legacy descoteaux07",
                                category=PendingDeprecationWarning)
        # noisy voxels (e.g. outside the white matter) that reach the iteration limit keep
        # their last estimate; a warning per voxel would say nothing more
        warnings.filterwarnings("ignore", message="maximum number of iterations exceeded")
        model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=sh_order)
        legacy = model.fit(signals).shm_coeff
    return convert_sh_from_legacy(legacy, SH_BASIS).astype(np.float32)


def fit_csd(data, bvals, bvecs_fsl, affine, mask, fa, *, b0_threshold, shell, sh_order,
            fit_mask=None, n_jobs=1, volumes=None):
    """Fibre ODFs by single-shell constrained spherical deconvolution.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    bvals : (N,) s/mm² ; bvecs_fsl : (N, 3), FSL/BIDS convention
    affine : (4, 4) ; mask : bool (X, Y, Z), brain ; fa : (X, Y, Z), for the response
    b0_threshold, shell : s/mm², the b0 limit and the shell used (:func:`csd_shell`)
    sh_order : int, even
    fit_mask : bool (X, Y, Z), optional
        Voxels to fit (default ``mask``); tracking only needs the white matter.
    n_jobs : int
        Workers; the voxel chunks are fixed, so the result does not depend on it.
    volumes : bool (N,), optional
        The volumes to fit with (e.g. without outliers), as if only they were given
        (default all); ``bvals`` and ``bvecs_fsl`` are the whole series', so that the
        series is not copied: only the response voxels' and the fitted voxels' signals
        are.

    Returns
    -------
    sh : float32 (X, Y, Z, n_coefficients), voxel frame, :data:`SH_BASIS` (non-legacy)
    info : dict, ``response_evals`` (mm²/s), ``response_s0``, ``n_response_voxels``
    """
    use = _shell_volumes(bvals, b0_threshold, shell) & _chosen(volumes, len(bvals))
    gtab = gradient_table(np.asarray(bvals)[use],
                          bvecs=fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl)[use], affine),
                          b0_threshold=b0_threshold)
    single_fibre = response_mask(fa, mask)
    response, _ = response_from_mask_ssst(gtab, *_voxel_list(data, use, single_fibre))
    fit_mask = np.asarray(mask if fit_mask is None else fit_mask, dtype=bool)
    signals = _voxel_signals(data, fit_mask, use, dtype=np.float64)
    chunks = [signals[i:i + FIT_CHUNK_VOXELS] for i in range(0, len(signals), FIT_CHUNK_VOXELS)]
    fitted = parallel_map(_fit_chunk, [(c, gtab, response, sh_order) for c in chunks],
                          n_jobs=n_jobs)
    n_coef = (sh_order + 1) * (sh_order + 2) // 2
    sh = np.zeros(fit_mask.shape + (n_coef,), dtype=np.float32)
    if fitted:
        sh[fit_mask] = np.nan_to_num(np.concatenate(fitted))
    info = {"response_evals": [float(v) for v in response[0]],
            "response_s0": float(response[1]), "n_response_voxels": int(single_fibre.sum())}
    return sh, info


def _chosen(volumes, n_volumes):
    """``volumes`` as a bool (N,) selection (None: all)."""
    return np.ones(n_volumes, dtype=bool) if volumes is None else np.asarray(volumes, bool)


def _voxel_list(data, use, *masks, dtype=None):
    """The volumes ``use`` of the voxels in any of ``masks`` as a (V, 1, 1, N') series, and
    each mask on it (V, 1, 1): what DIPY's response estimates need, without copying the
    series. They take each mask's voxels in C order, as from the whole grid, so the
    responses are the same."""
    union = np.any(masks, axis=0)
    signal = _voxel_signals(data, union, use, dtype=dtype)
    return (signal[:, None, None, :], *(m[union][:, None, None] for m in masks))


def _voxel_signals(data, voxels, use, *, dtype=None):
    """The volumes ``use`` of the ``voxels`` (bool mask) of ``data``, (V, N'), C-ordered as
    a copy of the whole selection would be (DIPY's fits give other last bits on other
    layouts)."""
    return np.ascontiguousarray(data[voxels][:, use], dtype=dtype)


def _most(values, candidates, n):
    """The ``n`` candidate voxels of highest ``values`` (all of them when fewer)."""
    ranked = np.where(candidates, values, -np.inf)
    order = np.argsort(ranked, axis=None, kind="stable")[::-1][:min(n, int(candidates.sum()))]
    chosen = np.zeros(candidates.shape, dtype=bool)
    chosen.flat[order] = True
    return chosen


def _spread(chosen, n):
    """At most ``n`` of the ``chosen`` voxels, evenly spaced in index order."""
    index = np.flatnonzero(chosen)
    if len(index) <= n:
        return chosen
    spread = np.zeros(chosen.shape, dtype=bool)
    spread.flat[index[np.linspace(0, len(index) - 1, n).round().astype(int)]] = True
    return spread


def tissue_response_masks(fa, md, mask, min_voxels=MIN_RESPONSE_VOXELS,
                          max_voxels=MAX_RESPONSE_VOXELS, erosion=RESPONSE_EROSION_VOXELS):
    """White-matter, grey-matter and CSF voxels for the multi-tissue responses.

    Inside ``mask`` eroded by ``erosion`` voxels, the image's edges included (the whole
    mask if that leaves none):
    white matter: :func:`response_mask` (single-fibre voxels, as for single-shell CSD);
    grey matter: FA < :data:`ISOTROPIC_MAX_FA` and MD ≤ :data:`GM_MAX_MD`; CSF:
    FA < :data:`ISOTROPIC_MAX_FA` and MD ≥ :data:`CSF_MIN_MD`. When fewer than
    ``min_voxels`` qualify, grey matter is the ``min_voxels`` least anisotropic voxels
    with MD below :data:`CSF_MIN_MD`, and CSF the ``min_voxels`` of highest MD. The
    three sets do not overlap; each keeps at most ``max_voxels``, evenly spread.

    Returns (wm, gm, csf), bool arrays of ``mask``'s shape.

    Raises
    ------
    InputError
        A tissue has no voxel (a mask too small for multi-tissue responses).
    """
    mask = np.asarray(mask, dtype=bool)
    if erosion:
        inner = ndimage.binary_erosion(mask, iterations=erosion)
        mask = inner if inner.any() else mask
    fa = np.nan_to_num(np.asarray(fa, dtype=float))
    md = np.nan_to_num(np.asarray(md, dtype=float))
    wm = response_mask(fa, mask)
    rest = mask & ~wm & (md > 0)
    csf = rest & (fa < ISOTROPIC_MAX_FA) & (md >= CSF_MIN_MD)
    if csf.sum() < min_voxels:
        csf = _most(md, rest, min_voxels)
    rest &= ~csf
    gm = rest & (fa < ISOTROPIC_MAX_FA) & (md <= GM_MAX_MD)
    if gm.sum() < min_voxels:
        gm = _most(-fa, rest & (md < CSF_MIN_MD), min_voxels)
    tissues = tuple(_spread(t, max_voxels) for t in (wm, gm, csf))
    for name, voxels in zip(("white-matter", "grey-matter", "CSF"), tissues):
        if not voxels.any():
            raise InputError(f"No {name} voxels for the multi-shell CSD responses in the brain "
                             f"mask ({int(mask.sum())} voxels).",
                             fix="Check the brain mask, or track with --model dti.")
    return tissues


def _fit_msmt_chunk(signals, gtab, response, sh_order):
    with warnings.catch_warnings():
        # voxels whose quadratic programme fails come back as NaN; counted by the caller
        warnings.filterwarnings("ignore", message="Voxel could not be solved")
        model = mcsd.MultiShellDeconvModel(gtab, response, sh_order_max=sh_order)
        return np.asarray(model.fit(signals).all_shm_coeff, dtype=np.float64)


def fit_csd_msmt(data, bvals, bvecs_fsl, affine, mask, fa, md, *, b0_threshold, shells,
                 sh_order, fit_mask=None, n_jobs=1, min_response_voxels=MIN_RESPONSE_VOXELS,
                 volumes=None):
    """Fibre ODFs by multi-shell multi-tissue CSD (DIPY's ``MultiShellDeconvModel``).

    The b0 volumes and those of ``shells`` are used, each volume's b-value set to its
    shell's (:func:`acquisition_shells`: within 100 s/mm²; b0 volumes to 0), so that
    DIPY groups them by shell. WM, GM and CSF responses come from the data: DIPY's
    ``response_from_mask_msmt`` on the voxels of :func:`tissue_response_masks` (FA and
    MD of the pipeline's tensor, i.e. its b ≤ ``--dti-max-bvalue`` fit), then
    ``multi_shell_fiber_response``. The fit is a quadratic programme per voxel
    (cvxpy): non-negative WM fODF on DIPY's default sphere, non-negative GM and CSF
    fractions.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    bvals : (N,) s/mm² ; bvecs_fsl : (N, 3), FSL/BIDS convention
    affine : (4, 4) ; mask : bool (X, Y, Z), brain
    fa, md : (X, Y, Z), the tensor's FA and MD (mm²/s), for the tissue responses
    b0_threshold : s/mm² ; shells : the shells' b-values (``choose_model``'s ``shells``)
    sh_order : int, even; the WM fODF's order
    fit_mask : bool (X, Y, Z), optional
        Voxels to fit (default ``mask``).
    n_jobs : int
        Workers; the voxel chunks (:data:`MSMT_CHUNK_VOXELS`) are fixed, so the result
        does not depend on it.
    min_response_voxels : int
        See :func:`tissue_response_masks`.
    volumes : bool (N,), optional
        The volumes to fit with (e.g. without outliers), as if only they were given
        (default all); ``bvals`` and ``bvecs_fsl`` are the whole series', so that the
        series is not copied: only the response voxels' and the fitted voxels' signals
        are.

    Returns
    -------
    sh : float32 (X, Y, Z, n_coefficients), the WM fODF as :func:`fit_csd` gives it
        (voxel frame, :data:`SH_BASIS` non-legacy), for the same tracking.
    info : dict, ``responses`` (per tissue and shell: ``bvalue``, ``evals`` mm²/s,
        ``s0``), ``n_response_voxels`` (WM), ``n_response_voxels_gm``,
        ``n_response_voxels_csf``, ``mean_volume_fractions`` (WM, GM, CSF: DIPY's
        volume fractions, averaged over the fitted voxels) and ``n_unsolved_voxels``
        (quadratic programme failed: fODF set to 0).
    """
    if not mcsd.have_cvxpy:
        raise InputError("Multi-shell CSD needs the Python package 'cvxpy', which is not "
                         "installed.", fix="pip install cvxpy (a dependency of "
                         "cst-integrity), or track with --model dti.")
    bvals = np.asarray(bvals, dtype=float)
    chosen = _chosen(volumes, len(bvals))
    nominal = np.zeros(len(bvals))
    use = (bvals <= b0_threshold) & chosen
    for shell in shells:
        on_shell = (np.abs(bvals - shell) <= 100) & (bvals > b0_threshold) & chosen
        nominal[on_shell] = shell
        use |= on_shell
    gtab = gradient_table(nominal[use],
                          bvecs=fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl)[use], affine),
                          b0_threshold=b0_threshold)
    tissues = tissue_response_masks(fa, md, mask, min_voxels=min_response_voxels)
    # DIPY's response estimation copies its input per shell and tissue: give it only the
    # tissue voxels
    signal, *tissue_masks = _voxel_list(data, use, *tissues, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        rf_wm, rf_gm, rf_csf = mcsd.response_from_mask_msmt(
            gtab, signal, *(t.astype(np.int64) for t in tissue_masks))
    response = mcsd.multi_shell_fiber_response(
        sh_order, bvals=np.r_[0.0, np.asarray(shells, dtype=float)],
        wm_rf=rf_wm, gm_rf=rf_gm, csf_rf=rf_csf)
    fit_mask = np.asarray(mask if fit_mask is None else fit_mask, dtype=bool)
    signals = _voxel_signals(data, fit_mask, use, dtype=np.float64)
    chunks = [signals[i:i + MSMT_CHUNK_VOXELS]
              for i in range(0, len(signals), MSMT_CHUNK_VOXELS)]
    fitted = parallel_map(_fit_msmt_chunk, [(c, gtab, response, sh_order) for c in chunks],
                          n_jobs=n_jobs)
    n_iso = response.iso
    n_coef = (sh_order + 1) * (sh_order + 2) // 2
    coeff = np.concatenate(fitted) if fitted else np.zeros((0, n_iso + n_coef))
    unsolved = ~np.all(np.isfinite(coeff), axis=1)
    coeff[unsolved] = 0.0
    sh = np.zeros(fit_mask.shape + (n_coef,), dtype=np.float32)
    sh[fit_mask] = convert_sh_from_legacy(coeff[:, n_iso:], SH_BASIS)
    # DIPY's volume fractions (CSF, GM, WM: 1 in a voxel of that tissue alone)
    fractions = coeff[~unsolved][:, :n_iso + 1] / mcsd.SH_CONST
    mean_fractions = (fractions.mean(axis=0).tolist() if len(fractions) else
                      [None] * (n_iso + 1))

    def per_shell(rf):
        return [{"bvalue": float(b), "evals": [float(v) for v in row[:3]],
                 "s0": float(row[3])} for b, row in zip(shells, rf)]

    info = {"responses": {"wm": per_shell(rf_wm), "gm": per_shell(rf_gm),
                          "csf": per_shell(rf_csf)},
            "n_response_voxels": int(tissues[0].sum()),
            "n_response_voxels_gm": int(tissues[1].sum()),
            "n_response_voxels_csf": int(tissues[2].sum()),
            "mean_volume_fractions": {"wm": mean_fractions[2], "gm": mean_fractions[1],
                                      "csf": mean_fractions[0]},
            "n_unsolved_voxels": int(unsolved.sum())}
    return sh, info
