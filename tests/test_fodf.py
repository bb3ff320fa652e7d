"""The tracking model chosen from the acquisition (pipeline/reconstruction/fodf.py,
pipeline.steps.fit_fodf)."""

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.data import get_sphere

from pipeline import steps
from pipeline.errors import InputError
from pipeline.reconstruction import fodf
from pipeline.tracking.selection import cst_search_box


def _table(n_dirs, bvalue=1000.0, n_b0=2, repeats=1):
    dirs = get_sphere(name="repulsion200").vertices[:n_dirs]
    bvecs = np.r_[np.zeros((n_b0, 3)), np.tile(dirs, (repeats, 1))]
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs * repeats, bvalue)]
    return bvals, bvecs


@pytest.mark.parametrize("n_dirs, order", [(12, None), (15, None), (16, 4), (27, 4), (28, 6),
                                           (44, 6), (45, 8), (64, 8)])
def test_order_follows_the_number_of_directions(n_dirs, order):
    bvals, bvecs = _table(n_dirs)
    choice = fodf.choose_model(bvals, bvecs, 50.0)
    assert choice["n_directions"] == n_dirs and choice["sh_order"] == order
    assert choice["model"] == ("dti" if order is None else "csd")
    assert choice["reason"]


def test_repeated_directions_count_once_and_the_richest_shell_is_used():
    # b=1000 with 12 directions (6 of them twice) is too few for multi-shell CSD: single-shell
    # CSD on the richest shell. (With 16 or more there, this is multi-shell CSD: see below.)
    low, low_vecs = _table(12, bvalue=1000.0, repeats=2)
    high, high_vecs = _table(30, bvalue=2000.0, n_b0=0)
    choice = fodf.choose_model(np.r_[low, high], np.r_[low_vecs, high_vecs], 50.0)
    assert (choice["shell_bvalue"], choice["n_directions"], choice["sh_order"]) == (2000.0, 30, 6)
    assert choice["csd_kind"] == "single-shell" and choice["shells"] == [2000.0]
    assert "multi-shell CSD needs" in choice["reason"]
    low, low_vecs = _table(20, bvalue=1000.0, repeats=2)   # 20 directions, twice
    choice = fodf.choose_model(np.r_[low, high], np.r_[low_vecs, high_vecs], 50.0)
    assert (choice["shell_bvalue"], choice["n_directions"]) == (2000.0, 30)
    assert choice["csd_kind"] == "msmt" and choice["directions_per_shell"] == [20, 30]


def test_dti_when_asked_even_with_many_directions():
    bvals, bvecs = _table(64)
    assert fodf.choose_model(bvals, bvecs, 50.0, requested="dti")["model"] == "dti"


def test_csd_on_too_few_directions_is_an_input_error(tmp_path):
    bvals, bvecs = _table(12)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.full((32, 32, 20, len(bvals)), 100.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "dwi.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", bvecs.T, fmt="%.6f")
    (tmp_path / "outliers.json").write_text(json.dumps({"excluded": []}))
    args = [tmp_path / "dwi.nii.gz", tmp_path / "dwi.bval", tmp_path / "dwi.bvec", None, None,
            None, tmp_path / "outliers.json"]
    with pytest.raises(InputError, match="only 12 distinct directions"):
        steps.fit_fodf(*args, out_dir=tmp_path, model="csd")
    out = steps.fit_fodf(*args, out_dir=tmp_path, model="auto")
    assert out["sh"] is None
    assert json.loads(open(out["qc"]).read())["model"] == "dti"


def test_response_mask_falls_back_to_the_most_anisotropic_voxels():
    fa = np.linspace(0.0, 0.6, 1000).reshape(10, 10, 10)  # nothing reaches FA 0.7
    chosen = fodf.response_mask(fa, np.ones(fa.shape, dtype=bool))
    assert chosen.sum() == fodf.MIN_RESPONSE_VOXELS
    assert fa[chosen].min() >= np.sort(fa, axis=None)[-fodf.MIN_RESPONSE_VOXELS]


def test_search_box_covers_the_rois_with_a_margin():
    rois = np.zeros((40, 40, 40), dtype=np.int16)
    rois[10, 12, 14] = 3
    rois[20, 25, 30] = 1
    box = cst_search_box(rois, np.diag([2.0, 2.0, 2.0, 1.0]), margin_mm=4.0)
    idx = np.argwhere(box)
    assert idx.min(axis=0).tolist() == [8, 10, 12] and idx.max(axis=0).tolist() == [22, 27, 32]


def _shells_table(dirs_per_shell, n_b0=3):
    """b0s, then one shell per entry of ``dirs_per_shell`` ({b-value: directions})."""
    bvals, bvecs = [np.zeros(n_b0)], [np.zeros((n_b0, 3))]
    for bvalue, n_dirs in dirs_per_shell.items():
        bvecs.append(get_sphere(name="repulsion200").vertices[:n_dirs])
        bvals.append(np.full(n_dirs, bvalue))
    return np.concatenate(bvals), np.concatenate(bvecs)


@pytest.mark.parametrize("shells, n_b0, kind, order", [
    ({1000: 32, 2000: 32, 3000: 32}, 3, "msmt", 6),
    ({1000: 30, 2000: 64}, 3, "msmt", 6),        # the order every shell allows
    ({1000: 64, 2000: 64}, 3, "msmt", 8),
    ({700: 16, 2500: 45}, 1, "msmt", 4),
    ({1000: 64, 2000: 64}, 0, "single-shell", 8),  # DIPY's multi-shell CSD needs b0s
    ({300: 6, 1000: 64}, 3, "single-shell", 8),   # one shell with the directions of order 4
])
def test_multi_shell_csd_needs_two_shells_of_order_4_and_b0s(shells, n_b0, kind, order):
    bvals, bvecs = _shells_table(shells, n_b0=n_b0)
    for requested in ("auto", "csd"):
        choice = fodf.choose_model(bvals, bvecs, 50.0, requested=requested)
        assert (choice["model"], choice["csd_kind"], choice["sh_order"]) == ("csd", kind, order)
        assert choice["n_b0"] == n_b0
        if kind == "msmt":
            assert choice["shells"] == [float(b) for b in shells]
            assert choice["directions_per_shell"] == list(shells.values())
            assert "multi-shell multi-tissue CSD of order" in choice["reason"]
        else:
            assert choice["shells"] == [choice["shell_bvalue"]]
    assert fodf.choose_model(bvals, bvecs, 50.0, requested="dti")["model"] == "dti"


def test_single_shell_choice_is_as_before():
    bvals, bvecs = _table(64)
    choice = fodf.choose_model(bvals, bvecs, 50.0, requested="csd")
    assert choice["csd_kind"] == "single-shell"
    assert choice["reason"] == "64 directions on the b=1000 shell allow CSD of order 8"



def test_tissue_voxels_are_inside_the_mask_capped_and_fall_back():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:18, 2:18, 2:18] = True
    fa = np.full(mask.shape, 0.1)
    md = np.full(mask.shape, 0.8e-3)          # grey matter everywhere ...
    fa[2:18, 2:18, 2:6] = 0.8                 # ... but white matter below,
    md[2:18, 2:18, 14:18] = 3.0e-3            # CSF above
    fa[2:18, 2:18, 2] = 0.99                  # the mask's surface: partial volume
    wm, gm, csf = fodf.tissue_response_masks(fa, md, mask, max_voxels=100)
    inner = np.zeros(mask.shape, dtype=bool)
    inner[4:16, 4:16, 4:16] = True            # 2 voxels inside the surface
    assert not ((wm | gm | csf) & ~inner).any() and not (wm & gm).any()
    # WM z 4-5: 288 voxels of FA ≥ 0.7; GM z 6-13 (1152); CSF z 14-15 (288): 100 of each,
    # spread over all of them
    assert wm.sum() == gm.sum() == csf.sum() == 100
    assert np.ptp(np.argwhere(gm)[:, 2]) == 7 and not (csf & (md < 3e-3)).any()
    md[2:18, 2:18, 14:18] = 0.8e-3            # no CSF: the 100 voxels of highest MD
    md[10, 10, 10] = 1.5e-3
    _, _, csf = fodf.tissue_response_masks(fa, md, mask, max_voxels=100)
    assert csf.sum() == 100 and csf[10, 10, 10]
    with pytest.raises(InputError, match="No white-matter voxels"):
        fodf.tissue_response_masks(fa, md, np.zeros(mask.shape, dtype=bool))

# --- multi-shell multi-tissue CSD on a phantom ----------------------------------------------

MS_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # positive determinant: FSL b-vectors flip x
MS_SHAPE = (12, 12, 16)
#: (z slices, what): single fibre along A; A crossed at 90° by B; A crossed at 70° by C;
#: grey-matter-like and CSF-like isotropic voxels. The responses come from 2 voxels inside
#: the mask's surface (the whole image): z 2-3 for WM, 8-10 GM, 11-13 CSF; x, y 2-9.
MS_LAYOUT = {"single": (0, 4), "cross90": (4, 6), "cross70": (6, 8), "gm": (8, 11),
             "csf": (11, 16)}
#: Fitted: a 4 × 4 column in z 2 (single), 4-5, 6-7 (crossings), 9 (GM), 13 (CSF).
MS_FIT_Z = [2, 4, 5, 6, 7, 9, 13]
WM_EVALS = np.array([1.7e-3, 0.3e-3, 0.3e-3])


def _unit(v):
    return np.asarray(v, dtype=float) / np.linalg.norm(v)


def _fibres():
    """Oblique fibre directions (voxel frame), so that a lost x flip would move them."""
    a = _unit([0.75, 0.43, 0.5])
    across = _unit(np.cross(a, [0.0, 0.0, 1.0]))
    b = across                                    # 90° from a
    c = _unit(np.cos(np.deg2rad(70)) * a + np.sin(np.deg2rad(70)) * np.cross(a, across))
    return a, b, c


def _angles(v):
    return np.rad2deg(np.arccos(v[2])), np.rad2deg(np.arctan2(v[1], v[0]))


@pytest.fixture(scope="module")
def msmt_phantom(tmp_path_factory):
    """b = 1000, 2000, 3000 s/mm² (32 directions each) and 6 b0s, SNR 30, written as files;
    the tensor (b ≤ 1500) gives FA and MD. The arrays are those read back from the files."""
    from dipy.core.gradients import gradient_table
    from dipy.core.sphere import HemiSphere, disperse_charges
    from dipy.sims.voxel import multi_tensor

    from pipeline.io.dwi import read_fsl_gradients, voxel_frame_to_fsl_bvecs
    from pipeline.reconstruction import tensor

    rng = np.random.default_rng(0)
    bvals, bvecs = [np.zeros(6)], [np.zeros((6, 3))]
    for bvalue in (1000.0, 2000.0, 3000.0):
        start = rng.normal(size=(32, 3))
        hemi, _ = disperse_charges(
            HemiSphere(xyz=start / np.linalg.norm(start, axis=1, keepdims=True)), 200)
        bvals.append(np.full(32, bvalue))
        bvecs.append(hemi.vertices)
    bvals, bvecs_voxel = np.concatenate(bvals), np.concatenate(bvecs)
    gtab = gradient_table(bvals, bvecs=bvecs_voxel)
    a, b, c = _fibres()
    kinds = {"single": ([WM_EVALS], [a], [100], 100.0),
             "cross90": ([WM_EVALS] * 2, [a, b], [50, 50], 100.0),
             "cross70": ([WM_EVALS] * 2, [a, c], [50, 50], 100.0),
             "gm": ([[0.8e-3] * 3], [a], [100], 100.0),
             "csf": ([[3.0e-3] * 3], [a], [100], 150.0)}
    data = np.zeros(MS_SHAPE + (len(bvals),), dtype=np.float32)
    for kind, (z0, z1) in MS_LAYOUT.items():
        evals, dirs, fractions, s0 = kinds[kind]
        for index in np.ndindex(MS_SHAPE[0], MS_SHAPE[1], z1 - z0):
            data[index[0], index[1], z0 + index[2]], _ = multi_tensor(
                gtab, np.array(evals), S0=s0, angles=[_angles(d) for d in dirs],
                fractions=fractions, snr=30, rng=rng)
    folder = tmp_path_factory.mktemp("msmt")
    paths = {name: folder / f"{name}.nii.gz" for name in ("dwi", "mask", "fa", "md", "rois")}
    nib.save(nib.Nifti1Image(data, MS_AFFINE), paths["dwi"])
    np.savetxt(folder / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / "dwi.bvec", voxel_frame_to_fsl_bvecs(bvecs_voxel, MS_AFFINE).T,
               fmt="%.8f")
    (folder / "outliers.json").write_text(json.dumps({"excluded": []}))
    bvals, bvecs_fsl = read_fsl_gradients(folder / "dwi.bval", folder / "dwi.bvec")
    data = np.asarray(nib.load(paths["dwi"]).dataobj, dtype=np.float32)
    mask = np.ones(MS_SHAPE, dtype=bool)
    maps = tensor.fit_dti(data, bvals, bvecs_fsl, MS_AFFINE, mask, b0_threshold=50,
                          use=bvals <= 1500)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), MS_AFFINE), paths["mask"])
    for name in ("fa", "md"):
        nib.save(nib.Nifti1Image(maps[name].astype(np.float32), MS_AFFINE), paths[name])
    rois = np.zeros(MS_SHAPE, dtype=np.int16)
    rois[0, 0, 0] = 1  # the fit box (10 mm margin): x, y, z < 6
    nib.save(nib.Nifti1Image(rois, MS_AFFINE), paths["rois"])
    return {"data": data, "bvals": bvals, "bvecs_fsl": bvecs_fsl, "mask": mask,
            "fa": np.asarray(nib.load(paths["fa"]).dataobj, dtype=np.float32),
            "md": np.asarray(nib.load(paths["md"]).dataobj, dtype=np.float32),
            "paths": paths, "folder": folder}


@pytest.fixture(scope="module")
def msmt_fit(msmt_phantom):
    """The fit of :data:`MS_FIT_Z`, serial and on 2 workers (3 chunks)."""
    from pipeline import parallel

    p = msmt_phantom
    choice = fodf.choose_model(p["bvals"], p["bvecs_fsl"], 50.0, requested="csd")
    fit_mask = np.zeros(MS_SHAPE, dtype=bool)
    fit_mask[:4, :4, MS_FIT_Z] = True
    fits = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fodf, "MSMT_CHUNK_VOXELS", 48)
        mp.setattr(parallel, "WORKER_START_SECONDS", 0.0)  # 2 workers really used
        for n_jobs in (1, 2):
            fits[n_jobs] = fodf.fit_csd_msmt(
                p["data"], p["bvals"], p["bvecs_fsl"], MS_AFFINE, p["mask"], p["fa"], p["md"],
                b0_threshold=50, shells=choice["shells"], sh_order=choice["sh_order"],
                fit_mask=fit_mask, n_jobs=n_jobs)
    return {"choice": choice, "fit_mask": fit_mask, "fits": fits}


def _peaks(sh, sh_order):
    from dipy.data import get_sphere
    from dipy.direction import peak_directions
    from dipy.reconst.shm import sh_to_sf

    sphere = get_sphere(name="repulsion724")
    odf = sh_to_sf(sh, sphere, sh_order_max=sh_order, basis_type=fodf.SH_BASIS, legacy=False)
    directions, _, _ = peak_directions(odf, sphere, relative_peak_threshold=0.5,
                                       min_separation_angle=25)
    return directions


def _angle_deg(u, v):
    return float(np.rad2deg(np.arccos(min(1.0, abs(float(np.dot(u, v)))))))


def test_multi_shell_phantom_is_fitted_by_msmt(msmt_fit):
    choice = msmt_fit["choice"]
    assert (choice["model"], choice["csd_kind"]) == ("csd", "msmt")
    assert choice["shells"] == [1000.0, 2000.0, 3000.0]
    assert choice["directions_per_shell"] == [32, 32, 32] and choice["n_b0"] == 6
    assert choice["sh_order"] == 6  # 28 coefficients ≤ 32 directions < 45


def test_msmt_wm_fodf_peaks_are_the_fibres_in_single_and_crossing_voxels(msmt_fit):
    sh, _ = msmt_fit["fits"][1]
    order = msmt_fit["choice"]["sh_order"]
    assert sh.dtype == np.float32 and sh.shape == MS_SHAPE + (28,)
    a, b, c = _fibres()
    worst = {}
    for kind, truth in (("single", [a]), ("cross90", [a, b]), ("cross70", [a, c])):
        z0, z1 = MS_LAYOUT[kind]
        errors = []
        for index in np.argwhere(msmt_fit["fit_mask"][..., z0:z1]):
            peaks = _peaks(sh[index[0], index[1], z0 + index[2]], order)
            assert len(peaks) == len(truth), (kind, index)  # one peak, or both fibres
            errors += [min(_angle_deg(t, p) for p in peaks) for t in truth]
        worst[kind] = max(errors)
    # measured (worst voxel): 1.2°, 8.1°, 8.2°
    assert max(worst.values()) < 12.0, worst


def test_msmt_gives_grey_matter_and_csf_to_the_isotropic_tissues(msmt_fit):
    sh, info = msmt_fit["fits"][1]
    mean_l0 = {kind: float(sh[..., z0:z1, 0][msmt_fit["fit_mask"][..., z0:z1]].mean())
               for kind, (z0, z1) in MS_LAYOUT.items()}
    # measured: WM 0.30, GM 0.086, CSF 0.027 (single-shell CSD has no isotropic compartment)
    assert mean_l0["gm"] < 0.4 * mean_l0["single"] and mean_l0["csf"] < 0.2 * mean_l0["single"]
    # responses from the data: one per tissue and shell, near the simulated diffusivities
    assert [r["bvalue"] for r in info["responses"]["wm"]] == [1000.0, 2000.0, 3000.0]
    wm = info["responses"]["wm"][0]["evals"]
    assert wm[0] == pytest.approx(1.7e-3, rel=0.1) and wm[1] == pytest.approx(0.3e-3, rel=0.2)
    assert np.mean(info["responses"]["gm"][0]["evals"]) == pytest.approx(0.8e-3, rel=0.1)
    assert np.mean(info["responses"]["csf"][0]["evals"]) == pytest.approx(3.0e-3, rel=0.1)
    # the layers' voxels inside the mask's surface (8 × 8 × 2, 3, 3), but noisy CSF voxels
    # of FA ≥ 0.2 or MD < 2.5e-3 (measured: 181)
    assert (info["n_response_voxels"], info["n_response_voxels_gm"]) == (128, 192)
    assert 150 <= info["n_response_voxels_csf"] <= 192
    assert info["n_unsolved_voxels"] == 0


def test_msmt_fit_does_not_depend_on_n_jobs(msmt_fit):
    (sh1, info1), (sh2, info2) = msmt_fit["fits"][1], msmt_fit["fits"][2]
    assert np.array_equal(sh1, sh2) and info1 == info2
    assert np.count_nonzero(sh1[msmt_fit["fit_mask"]].any(axis=-1)) == msmt_fit["fit_mask"].sum()


def test_fit_fodf_runs_msmt_on_multi_shell_data(msmt_phantom, msmt_fit, tmp_path):
    p = msmt_phantom["paths"]
    folder = msmt_phantom["folder"]
    out = steps.fit_fodf(p["dwi"], folder / "dwi.bval", folder / "dwi.bvec", p["mask"], p["fa"],
                         p["rois"], folder / "outliers.json", out_dir=tmp_path, model="csd",
                         fa_stop=0.7, md_file=p["md"])
    qc = json.loads(open(out["qc"]).read())
    assert (qc["model"], qc["csd_kind"], qc["requested"]) == ("csd", "msmt", "csd")
    assert qc["shells"] == [1000.0, 2000.0, 3000.0] and qc["sh_basis"] == fodf.SH_BASIS
    assert set(qc["responses"]) == {"wm", "gm", "csf"}
    # fitted: FA ≥ 0.7 (the single-fibre layer, z < 4) in the box around the ROI
    fitted = np.zeros(MS_SHAPE, dtype=bool)
    fitted[:6, :6, :4] = True
    assert np.array_equal(fitted, (msmt_phantom["fa"] >= 0.7) & (np.indices(MS_SHAPE) < 6).all(0))
    assert qc["n_fitted_voxels"] == fitted.sum() == 144
    sh = np.asarray(nib.load(out["sh"]).dataobj)
    assert not sh[~fitted].any()
    # voxel by voxel the same fit as pipeline.reconstruction.fodf.fit_csd_msmt's
    both = fitted & msmt_fit["fit_mask"]
    assert both.sum() == 16
    np.testing.assert_allclose(sh[both], msmt_fit["fits"][1][0][both], rtol=0, atol=1e-6)


def test_fit_fodf_keeps_single_shell_csd_for_single_shell_data(tmp_path, monkeypatch):
    """--model csd on one shell: pipeline.reconstruction.fodf.fit_csd, as before, never the
    multi-shell fit."""
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import multi_tensor

    from pipeline.reconstruction import tensor

    def no_msmt(*args, **kwargs):
        raise AssertionError("single-shell data went to multi-shell CSD")

    monkeypatch.setattr(fodf, "fit_csd_msmt", no_msmt)
    bvals, bvecs = _table(45)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    gtab = gradient_table(bvals, bvecs=bvecs)
    rng = np.random.default_rng(2)
    data = np.zeros((8, 8, 8, len(bvals)), dtype=np.float32)
    for index in np.ndindex(8, 8, 8):
        crossing = index[2] >= 4
        data[index], _ = multi_tensor(
            gtab, np.array([WM_EVALS] * 2), S0=100, angles=[(90, 0), (90, 90)],
            fractions=[50, 50] if crossing else [100, 0], snr=30, rng=rng)
    mask = np.ones(data.shape[:3], dtype=bool)
    maps = tensor.fit_dti(data, bvals, bvecs, affine, mask, b0_threshold=50)
    rois = np.zeros(mask.shape, dtype=np.int16)
    rois[4, 4, 4] = 1
    for name, image in (("dwi", data), ("mask", mask.astype(np.uint8)), ("fa", maps["fa"]),
                        ("rois", rois)):
        nib.save(nib.Nifti1Image(image, affine), tmp_path / f"{name}.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", bvecs.T, fmt="%.6f")
    (tmp_path / "outliers.json").write_text(json.dumps({"excluded": []}))
    out = steps.fit_fodf(*(tmp_path / f for f in ("dwi.nii.gz", "dwi.bval", "dwi.bvec",
                                                  "mask.nii.gz", "fa.nii.gz", "rois.nii.gz",
                                                  "outliers.json")),
                         out_dir=tmp_path, model="csd")
    qc = json.loads(open(out["qc"]).read())
    assert (qc["model"], qc["csd_kind"], qc["sh_order"]) == ("csd", "single-shell", 8)
    assert qc["reason"] == "45 directions on the b=1000 shell allow CSD of order 8"
    assert "response_evals" in qc and "responses" not in qc
    fa = np.asarray(nib.load(tmp_path / "fa.nii.gz").dataobj)
    bvals_read = np.loadtxt(tmp_path / "dwi.bval")
    bvecs_read = np.loadtxt(tmp_path / "dwi.bvec").T
    expected, _ = fodf.fit_csd(data, bvals_read, bvecs_read, affine, mask, fa, b0_threshold=50,
                               shell=1000.0, sh_order=8, fit_mask=mask & (fa >= 0.2))
    assert np.array_equal(np.asarray(nib.load(out["sh"]).dataobj), expected)


def test_methods_say_multi_shell_multi_tissue_csd():
    from pipeline import report

    bvals, bvecs = _shells_table({1000: 32, 2000: 32, 3000: 32}, n_b0=6)
    choice = {**fodf.choose_model(bvals, bvecs, 50.0, requested="csd"),
              "n_response_voxels": 310, "n_response_voxels_gm": 1200,
              "n_response_voxels_csf": 450}
    metrics = {"qc": {"tracking": {"model_choice": choice}},
               "provenance": {"software": {"dipy": "1.12.1", "cvxpy": "1.9.3"},
                              "parameters": {"tracking": {"direction": "prob"}}}}
    text = report.methods_text(metrics)
    assert ("multi-shell multi-tissue constrained spherical deconvolution" in text
            and "of order 6 on the b = 1000, 2000, 3000 s/mm² shells (32, 32, 32 directions) "
                "and 6 b0 volumes" in text)
    assert "white-matter, grey-matter and CSF responses from the data (from 310, 1200 and 450" \
        in text
    assert "Probabilistic CSD tractography on the white-matter fODF" in text
    assert "cvxpy 1.9.3" in text
    choice = fodf.choose_model(*_table(45), 50.0, requested="csd")
    metrics["qc"]["tracking"]["model_choice"] = choice
    text = report.methods_text(metrics)
    assert "multi-tissue" not in text and "on the b = 1000 s/mm² shell (45 directions)" in text
