"""A corpus of untrustworthy inputs, each built from a real scan and broken in one way (issue 7).

Every case copies ``sub-toshiba01`` (the smallest real scan: 3 mm, 13 volumes) from
``../shared/data/bids`` into a one-subject BIDS dataset under ``tmp_path``, breaks it
in one way, runs ``cst-report`` on it and checks that the run ends in ONE clear
message: exit code 2, "input error", the offending file's name (or the subject
label), a "fix:" line, no traceback, no output or work directory created, and the
input files byte-for-byte unchanged.

All cases run the real command-line entry point in-process (argparse, validation,
error printing and exit code, as a user gets them); a handful also run in a fresh
process to cover the process boundary (exit status, nothing else printed).
"""

import functools
import gzip
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import EXIT_BAD_INPUT, InputError
from pipeline.io.bids import find_dwi_runs
from pipeline.io.dwi import available_memory_bytes, load_dwi
from pipeline.memory import estimated_memory_bytes

from .conftest import SHARED_BIDS, run_cst_report

pytestmark = pytest.mark.realdata

SUBJECT = "toshiba01"
STEM = f"sub-{SUBJECT}_dwi"
SOURCE = SHARED_BIDS / f"sub-{SUBJECT}" / "dwi"
IMAGE, BVAL, BVEC = f"{STEM}.nii.gz", f"{STEM}.bval", f"{STEM}.bvec"


# --------------------------------------------------------------------------- building the cases

@dataclass
class Dataset:
    """The copied one-subject BIDS dataset a case breaks."""

    root: Path

    @property
    def dwi_dir(self):
        return self.root / f"sub-{SUBJECT}" / "dwi"

    @property
    def image(self):
        return self.dwi_dir / IMAGE

    @property
    def bval(self):
        return self.dwi_dir / BVAL

    @property
    def bvec(self):
        return self.dwi_dir / BVEC

    def read_bvals(self):
        return np.loadtxt(self.bval, ndmin=1)

    def read_bvecs(self):
        return np.loadtxt(self.bvec, ndmin=2)  # (3, N), FSL rows

    def write_bvals(self, bvals):
        self.bval.write_text(" ".join(b if isinstance(b, str) else f"{b:g}" for b in bvals) + "\n")

    def write_bvecs(self, rows):
        self.bvec.write_text("".join(" ".join(f"{v:g}" for v in row) + "\n" for row in rows))


@functools.lru_cache(maxsize=1)
def _source_scan():
    img = nib.load(str(SOURCE / IMAGE))
    data = img.get_fdata(dtype=np.float32)
    data.setflags(write=False)
    return data, img.affine.copy()


def _write_nifti(path, data, *, affine=None, zooms=None, compress=True, dtype=np.float32,
                 edit=None):
    """Write a NIfTI-1 file byte by byte, so that broken headers are stored as given
    (nibabel would repair or refuse a NaN or singular affine, or a zero pixdim, on save).

    ``data`` is stored as ``dtype``, unscaled; ``edit(header)``, when given, changes the
    header last (scaling, xform codes, a second affine).
    """
    src_data, src_affine = _source_scan()
    affine = src_affine if affine is None else np.asarray(affine, dtype=float)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "sec")
    if np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-6:
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
    else:  # store the broken sform as is; no qform to fall back on
        hdr["qform_code"] = 0
        hdr["sform_code"] = 1
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
        hdr["pixdim"][1:4] = np.linalg.norm(src_affine[:3, :3], axis=0)
    if zooms is not None:
        pixdim = hdr["pixdim"]
        pixdim[1:4] = zooms
        hdr["pixdim"] = pixdim
    hdr["vox_offset"] = 352
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    if edit is not None:
        edit(hdr)
    payload = (hdr.binaryblock + b"\0" * 4
               + np.asarray(data, dtype=hdr.get_data_dtype()).tobytes(order="F"))
    path.write_bytes(gzip.compress(payload, compresslevel=1) if compress else payload)


def _with_data(edit, dtype=np.float32, header=None):
    """A case that rewrites the image with edited voxel values, stored as ``dtype``
    (``header``: an edit of the header, see :func:`_write_nifti`)."""
    def build(ds):
        data = np.array(_source_scan()[0])
        _write_nifti(ds.image, edit(data), dtype=dtype, edit=header)
        return IMAGE
    return build


def _with_header(affine=None, zooms=None, edit=None):
    """A case that rewrites the image with the same voxels and a broken header
    (``affine`` may be a function of the scan's affine: nothing is read at import)."""
    def build(ds):
        _write_nifti(ds.image, _source_scan()[0], zooms=zooms, edit=edit,
                     affine=affine(_source_scan()[1]) if callable(affine) else affine)
        return IMAGE
    return build


def _fields(**values):
    """A header edit setting raw header fields (codes, scaling) to the given values."""
    def edit(hdr):
        for name, value in values.items():
            hdr[name] = value
    return edit


def _rgb(data):
    """The scan as RGB24 voxels (grey: the same byte in R, G and B)."""
    grey = np.clip(data / data.max() * 255, 0, 255).astype(np.uint8)
    rgb = np.empty(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rgb["G"] = rgb["B"] = grey
    return rgb


def _float64_with_huge_voxel(data):
    return _set(data.astype(np.float64), (30, 30, 20, 2), 1e300)


def _with_bvals(edit):
    def build(ds):
        ds.write_bvals(edit(ds.read_bvals()))
        return BVAL
    return build


def _with_bvecs(edit):
    def build(ds):
        ds.write_bvecs(edit(ds.read_bvecs()))
        return BVEC
    return build


def _set(array, index, value):
    array = np.array(array, dtype=float)
    array[index] = value
    return array


def _zero_column(affine):
    return _set(affine, (slice(0, 3), 1), 0.0)


def _repeated_axis(affine):
    return _set(affine, (slice(0, 3), 2), affine[:3, 0])


def _scaled(factor):
    return lambda affine: affine @ np.diag([factor, factor, factor, 1.0])


def _three_directions(rows):
    # one b0, then the first three diffusion directions repeated (sign flips included)
    dirs = rows[:, 1:4]
    reps = [dirs, -dirs, dirs, -dirs]
    return np.hstack([rows[:, :1]] + reps)


def _missing(name):
    def build(ds):
        (ds.dwi_dir / name).unlink()
        return name
    return build


def _rewrite_bytes(edit):
    def build(ds):
        ds.image.write_bytes(edit(ds.image.read_bytes()))
        return IMAGE
    return build


def _plain_and_gz(ds):
    # the same run stored twice: sub-X_dwi.nii next to sub-X_dwi.nii.gz
    (ds.dwi_dir / f"{STEM}.nii").write_bytes(gzip.decompress(ds.image.read_bytes()))
    return f"{STEM}.nii"


def _no_dwi_folder(ds):
    shutil.rmtree(ds.dwi_dir)
    (ds.root / f"sub-{SUBJECT}" / "anat").mkdir()
    return f"sub-{SUBJECT}"


def _image_is_a_folder(ds):
    ds.image.unlink()
    ds.image.mkdir()
    return IMAGE


def _participants_with(column, value):
    def build(ds):
        (ds.root / "participants.tsv").write_text(
            f"participant_id\t{column}\nsub-{SUBJECT}\t{value}\n")
        return "participants.tsv"
    return build


#: name -> (how to break the copy, what the message must say about why)
CASES = {
    # ---- missing or unreadable files
    "missing-bval": (_missing(BVAL), "gradient file"),
    "missing-bvec": (_missing(BVEC), "gradient file"),
    "missing-image": (_missing(IMAGE), "no diffusion image"),
    "image-empty-file": (_rewrite_bytes(lambda b: b""), "empty file"),
    "image-truncated-gzip": (_rewrite_bytes(lambda b: b[: len(b) // 2]), "truncated"),
    "image-not-nifti": (_rewrite_bytes(lambda b: gzip.compress(b"not an image\n" * 100)),
                        "cannot be read"),
    "image-plain-nii-named-gz": (_rewrite_bytes(gzip.decompress), "not gzip-compressed"),
    "image-is-a-folder": (_image_is_a_folder, "cannot be opened"),
    "image-stored-twice": (_plain_and_gz, "two images"),
    # ---- image shape and header
    "image-3d": (_with_data(lambda d: d[..., 0]), "3D"),
    "image-one-volume": (_with_data(lambda d: d[..., :1]), "1 volume"),
    "image-tiny-grid": (_with_data(lambda d: d[:4, :4, :4]), "too small"),
    "voxels-0.01mm-in-header": (_with_header(zooms=(0.01, 0.01, 0.01)), "Implausible voxel"),
    "voxels-50mm": (_with_header(affine=_scaled(50 / 3), zooms=(50.0, 50.0, 50.0)),
                    "Implausible voxel"),
    "voxels-50mm-in-affine-only": (_with_header(affine=_scaled(50 / 3), zooms=(3.0, 3.0, 3.0)),
                                   "in the affine"),
    "voxel-size-nan": (_with_header(zooms=(np.nan, 3.0, 3.0)), "not a number"),
    "affine-zero-column": (_with_header(affine=_zero_column), "singular"),
    "affine-repeated-axis": (_with_header(affine=_repeated_axis), "singular"),
    "affine-nan": (_with_header(affine=lambda a: _set(a, (1, 3), np.nan)), "NaN"),
    # ---- header validation (issue 20): voxel type, dimensions, pixdim, scaling, orientation
    "header-no-orientation": (_with_header(edit=_fields(qform_code=0, sform_code=0)),
                              "left is unknown"),
    # nibabel reads codes outside the NIfTI list as 0, so this is the same unknown orientation
    "header-invalid-xform-codes": (_with_header(edit=_fields(qform_code=9, sform_code=7)),
                                   "left is unknown"),
    "pixdim-zero": (_with_header(zooms=(3.0, 0.0, 3.0)), "is zero, negative"),
    "pixdim-negative": (_with_header(zooms=(-3.0, 3.0, 3.0)), "is zero, negative"),
    "pixdim-infinite": (_with_header(zooms=(3.0, 3.0, np.inf)), "infinite"),
    "image-2d": (_with_data(lambda d: d[:, :, 20, 0]), "2D"),
    "image-5d-two-series": (_with_data(lambda d: np.stack([d, d], axis=-1)), "5D"),
    "image-5d-volumes-on-fifth-axis": (_with_data(lambda d: d[:, :, :, None, :]), "5D"),
    "image-complex64": (_with_data(lambda d: d * (1 + 1j), dtype=np.complex64), "complex"),
    "image-complex128": (_with_data(lambda d: d * (1 + 1j), dtype=np.complex128), "complex"),
    "image-rgb24": (_with_data(_rgb, dtype="RGB"), "non-numeric"),
    "scl-slope-infinite": (_with_header(edit=_fields(scl_slope=np.inf)), "scl_slope is infinite"),
    "scl-inter-infinite": (_with_header(edit=_fields(scl_inter=np.inf)), "header is invalid"),
    # finite float32 voxels times a finite slope: beyond float32 once scaled (nibabel scales
    # in float64, the pipeline computes in float32)
    "data-beyond-float32-after-scaling": (_with_header(edit=_fields(scl_slope=1e36)),
                                          "beyond the float32 range"),
    # a finite float64 voxel times a finite slope: infinite once scaled
    "data-infinite-after-scaling": (_with_data(_float64_with_huge_voxel, dtype=np.float64,
                                               header=_fields(scl_slope=1e30)), "infinite"),
    # ---- voxel values
    "data-nan-voxels": (_with_data(lambda d: _set(d, (30, 30, 20, slice(None)), np.nan)), "NaN"),
    "data-inf-voxels": (_with_data(lambda d: _set(d, (10, 40, 5, 3), np.inf)), "infinite"),
    "data-all-zero": (_with_data(np.zeros_like), "all zeros"),
    # ---- gradient tables
    "bval-one-fewer": (_with_bvals(lambda b: b[:-1]), "13 volumes but the file lists 12"),
    "bval-empty": (_with_bvals(lambda b: []), "empty"),
    "bval-non-numeric": (_with_bvals(lambda b: [*b[:5], "b1500", *b[6:]]), "cannot be read"),
    "bval-nan": (_with_bvals(lambda b: _set(b, 4, np.nan)), "NaN"),
    "bval-negative": (_with_bvals(lambda b: _set(b, 4, -1500)), "Negative"),
    "bval-si-units": (_with_bvals(lambda b: b * 1e6), "s/mm"),
    "bval-no-b0": (_with_bvals(lambda b: np.full_like(b, 1500.0)), "No b0"),
    "bval-all-b0": (_with_bvals(np.zeros_like), "Every volume is a b0"),
    "bvec-one-column-fewer": (_with_bvecs(lambda r: r[:, :-1]), "lists 12 b-vectors"),
    "bvec-two-rows": (_with_bvecs(lambda r: r[:2]), "three rows"),
    "bvec-ragged-rows": (_with_bvecs(lambda r: [r[0], r[1], r[2][:-1]]), "cannot be read"),
    "bvec-nan": (_with_bvecs(lambda r: _set(r, (0, 3), np.nan)), "NaN"),
    "bvec-zero-for-dw-volume": (_with_bvecs(lambda r: _set(r, (slice(None), 5), 0.0)),
                                "zero or non-unit"),
    "bvec-length-3": (_with_bvecs(lambda r: _set(r, (slice(None), 5), r[:, 5] * 3)),
                      "zero or non-unit"),
    "bvec-three-directions": (_with_bvecs(_three_directions), "Only 3 distinct"),
    # ---- dataset and subject
    "subject-folder-without-dwi": (_no_dwi_folder, "No diffusion run"),
    # ---- bedside scores for PREP2
    "participants-safe-score-12": (_participants_with("safe_score", "12"),
                                   "'safe_score' is '12'"),
    "participants-mep-unknown-word": (_participants_with("mep_status", "weak"),
                                      "must be positive or negative"),
}

#: subject-level cases: (subject argument, text naming it, why)
SUBJECT_CASES = {
    "subject-not-found": ("sub-nobody", "sub-nobody", "not found"),
    "subject-path-traversal": ("../x", "../x", "not a BIDS subject label"),
    "subject-underscore": ("a_b", "a_b", "not a BIDS subject label"),
    "subject-trailing-newline": ("sub-01\n", r"sub-01\n", "not a BIDS subject label"),
    "subject-with-slash": (f"sub-{SUBJECT}/dwi", f"sub-{SUBJECT}/dwi", "not a BIDS subject label"),
}

ALL_CASES = sorted(CASES) + sorted(SUBJECT_CASES) + ["bids-dir-missing"]

#: cases that also run in a fresh process (exit status and stderr as a shell sees them)
SUBPROCESS_CASES = ["image-truncated-gzip", "bval-one-fewer", "data-nan-voxels",
                    "affine-zero-column", "subject-path-traversal", "missing-bvec",
                    "header-no-orientation", "pixdim-zero", "image-complex64"]


@pytest.fixture
def dataset(tmp_path):
    """A writable one-subject copy of the real BIDS dataset."""
    root = tmp_path / "bids"
    (root / f"sub-{SUBJECT}").mkdir(parents=True)
    shutil.copyfile(SHARED_BIDS / "dataset_description.json", root / "dataset_description.json")
    shutil.copytree(SOURCE, root / f"sub-{SUBJECT}" / "dwi")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return Dataset(root)


def _tree_digest(root):
    """Every path under ``root`` with the hash of its bytes (folders as None)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _prepare(case, ds, tmp_path):
    """Break the copy for ``case``; return (subject, bids_dir, text the message must name, why)."""
    if case in SUBJECT_CASES:
        subject, named, why = SUBJECT_CASES[case]
        return subject, ds.root, named, why
    if case == "bids-dir-missing":
        return SUBJECT, tmp_path / "no_such_bids", "no_such_bids", "does not exist"
    build, why = CASES[case]
    return SUBJECT, ds.root, build(ds), why


def _check_refusal(code, stderr, named, why, tmp_path, before, ds):
    assert code == EXIT_BAD_INPUT, stderr
    assert stderr.count("cst-integrity:") == 1, stderr  # one message
    assert "input error" in stderr
    assert named in stderr, stderr
    assert why in stderr, stderr
    assert "\n  fix:  " in stderr, stderr
    assert "Traceback" not in stderr
    # nothing written: neither the output nor the work directory, nothing else beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bids"]
    assert _tree_digest(ds.root) == before  # inputs never modified


def _cli_args(subject, bids_dir, tmp_path, *extra):
    return [subject, "--bids-dir", str(bids_dir), "--out-dir", str(tmp_path / "out"),
            "--work-dir", str(tmp_path / "work"), *extra]


# --------------------------------------------------------------------------- the tests

def test_the_unbroken_copy_is_accepted(dataset):
    """Control: every refusal below comes from the one thing each case breaks."""
    (run,) = find_dwi_runs(dataset.root, SUBJECT)
    scan = load_dwi(run.dwi, run.bval, run.bvec)
    assert scan.img.shape == (64, 64, 40, 13)
    assert scan.n_unique_directions >= 6


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input_is_refused_with_one_clear_message(case, dataset, tmp_path, capsys):
    from workflows.cli import cst_report_main

    subject, bids_dir, named, why = _prepare(case, dataset, tmp_path)
    before = _tree_digest(dataset.root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cst_report_main(_cli_args(subject, bids_dir, tmp_path))
    captured = capsys.readouterr()
    assert captured.out == ""
    _check_refusal(exited.value.code, captured.err, named, why, tmp_path, before, dataset)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_in_a_fresh_process(case, dataset, tmp_path):
    subject, bids_dir, named, why = _prepare(case, dataset, tmp_path)
    before = _tree_digest(dataset.root)
    result = run_cst_report(subject, bids_dir, tmp_path / "out", work_dir=tmp_path / "work")
    assert result.stdout == ""
    _check_refusal(result.returncode, result.stderr, named, why, tmp_path, before, dataset)


def test_debug_shows_the_traceback_of_a_refusal(dataset, tmp_path):
    _prepare("image-truncated-gzip", dataset, tmp_path)
    result = run_cst_report(SUBJECT, dataset.root, tmp_path / "out", "--debug",
                            work_dir=tmp_path / "work")
    assert result.returncode == EXIT_BAD_INPUT
    assert "Traceback" in result.stderr and "input error" in result.stderr
    assert not (tmp_path / "out").exists()


def test_memory_estimate_refuses_before_reading_voxels(dataset):
    itemsize = nib.load(str(dataset.image)).get_data_dtype().itemsize
    needed = estimated_memory_bytes((64, 64, 40, 13), input_itemsize=itemsize,
                                    memory_bytes=2 ** 30)
    assert needed == estimated_memory_bytes((64, 64, 40, 13), input_itemsize=itemsize,
                                            memory_bytes=needed - 1)  # chunks not at their limit
    with pytest.raises(InputError) as info:
        load_dwi(dataset.image, dataset.bval, dataset.bvec, memory_limit_bytes=needed - 1)
    err = info.value
    assert err.exit_code == EXIT_BAD_INPUT
    assert err.path == dataset.image
    assert f"needs about {needed / 2 ** 30:.2f} GiB but only" in err.message
    assert "more memory" in err.fix and "crop" in err.fix
    # refused from the header alone: even a truncated image gets the memory message
    dataset.image.write_bytes(dataset.image.read_bytes()[:4096])
    with pytest.raises(InputError, match="needs about"):
        load_dwi(dataset.image, dataset.bval, dataset.bvec, memory_limit_bytes=10 ** 6)
    # ... and with enough memory the truncation itself is reported
    with pytest.raises(InputError, match="truncated"):
        load_dwi(dataset.image, dataset.bval, dataset.bvec, memory_limit_bytes=needed)


def test_available_memory_is_known_on_linux():
    available = available_memory_bytes()
    assert available is None or available > 0
    if Path("/proc/meminfo").is_file():
        assert available is not None


def test_cli_refuses_a_scan_too_big_for_this_machine(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.io.dwi.available_memory_bytes", lambda: 2 ** 20)
    from workflows.cli import cst_report_main

    before = _tree_digest(dataset.root)
    with pytest.raises(SystemExit) as exited:
        cst_report_main(_cli_args(SUBJECT, dataset.root, tmp_path))
    itemsize = nib.load(str(dataset.image)).get_data_dtype().itemsize
    needed = estimated_memory_bytes((64, 64, 40, 13), input_itemsize=itemsize,
                                    memory_bytes=2 ** 20)  # one job, the CLI's default
    _check_refusal(exited.value.code, capsys.readouterr().err, IMAGE,
                   f"needs about {needed / 2 ** 30:.2f} GiB but only <0.01 GiB are available",
                   tmp_path, before, dataset)
    # the pipeline's own reloads (check_data=False) do not repeat the estimate
    load_dwi(dataset.image, dataset.bval, dataset.bvec, check_data=False)


# --------------------------------------------------------------------------- headers accepted

def _turned(degrees):
    """``affine`` -> the same affine with its voxel axes turned about the world z axis
    (its origin kept)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def make(affine):
        turned = np.array(affine, dtype=float)
        turned[:3, :3] = turn @ affine[:3, :3]
        return turned
    return make


def _shifted(mm):
    """``affine`` -> the same affine with its origin moved by ``mm`` along x, y and z."""
    return lambda affine: affine + np.pad(np.full((3, 1), mm), ((0, 1), (3, 0)))


def _sform(make):
    """A header edit replacing the sform (code 1) by ``make(qform)``; the qform stays."""
    def edit(hdr):
        hdr.set_sform(make(hdr.get_qform()), code=1)
    return edit


def _both(first, then):
    """Two header edits, in order."""
    def edit(hdr):
        first(hdr)
        then(hdr)
    return edit


def _load_rewritten(ds, **write):
    """``load_dwi`` of the copy rewritten by :func:`_write_nifti` (same voxels) with ``write``."""
    _write_nifti(ds.image, _source_scan()[0], **write)
    return load_dwi(ds.image, ds.bval, ds.bvec)


def test_real_scans_raise_no_header_warning():
    """Every real scan's header is accepted without a warning, among them sub-philips03's,
    whose qform is 0.054° from its sform: all a float32 quaternion can do for that rotation."""
    runs = [run for root in (SHARED_BIDS, SHARED_BIDS.parent / "bids-clinical")
            for subject in sorted(root.glob("sub-*"))
            for run in find_dwi_runs(root, subject.name[len("sub-"):])]
    assert any(run.subject == "philips03" for run in runs)
    for run in runs:
        assert load_dwi(run.dwi, run.bval, run.bvec, check_data=False).header_warnings == ()


def test_qform_alone_is_used_when_the_sform_code_is_0(dataset):
    # an sform that would be refused (NaN) is not looked at when its code is 0
    scan = _load_rewritten(dataset, edit=_both(_sform(lambda q: np.full((4, 4), np.nan)),
                                               _fields(sform_code=0)))
    assert int(scan.img.header["sform_code"]) == 0
    np.testing.assert_allclose(scan.affine, _source_scan()[1], atol=1e-4)
    assert scan.header_warnings == ()


def test_sform_is_used_when_the_qform_code_is_0(dataset):
    scan = _load_rewritten(dataset, edit=_both(_sform(_shifted(5.0)), _fields(qform_code=0)))
    np.testing.assert_allclose(scan.affine, _shifted(5.0)(_source_scan()[1]), atol=1e-4)
    assert scan.header_warnings == ()


@pytest.mark.parametrize("make, named", [
    (_shifted(2.0), "origins 3.46 mm apart, axes 0° apart"),
    (_turned(1.0), "origins 0 mm apart, axes 1° apart"),
], ids=["shifted-2mm", "rotated-1deg"])
def test_disagreeing_sform_and_qform_warn_and_the_sform_is_used(dataset, make, named):
    scan = _load_rewritten(dataset, edit=_sform(make))
    np.testing.assert_allclose(scan.affine, make(scan.img.header.get_qform()), atol=1e-4)
    (warning,) = scan.header_warnings
    assert "sform and qform disagree" in warning and named in warning
    assert "sform is used" in warning and "fslorient -copysform2qform" in warning


def test_sform_and_qform_mirroring_each_other_warn_about_left_and_right(dataset):
    nx = _source_scan()[0].shape[0]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = nx - 1
    scan = _load_rewritten(dataset, edit=_sform(lambda q: q @ flip))
    assert np.linalg.det(scan.affine[:3, :3]) * np.linalg.det(_source_scan()[1][:3, :3]) < 0
    (warning,) = scan.header_warnings
    assert "mirror images" in warning and "left" in warning


def test_unusable_qform_beside_a_valid_sform_warns(dataset):
    scan = _load_rewritten(dataset, edit=_fields(quatern_b=np.nan))
    np.testing.assert_allclose(scan.affine, _source_scan()[1], atol=1e-4)
    assert scan.header_warnings == (
        "The header's qform holds NaN or infinite values; the sform is used.",)


def test_tolerances_allow_float32_rounding_but_not_a_tenth_of_a_millimetre(dataset):
    assert _load_rewritten(dataset, edit=_sform(_turned(0.05))).header_warnings == ()
    assert _load_rewritten(dataset, edit=_sform(_shifted(0.005))).header_warnings == ()
    assert len(_load_rewritten(dataset, edit=_sform(_shifted(0.1))).header_warnings) == 1


def _sheared(affine, degrees=2.0):
    """``affine`` with its second voxel axis tilted towards the first (lengths kept)."""
    sheared = np.array(affine, dtype=float)
    first = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    second = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    tilt = np.radians(degrees)
    sheared[:3, 1] = np.linalg.norm(affine[:3, 1]) * (np.cos(tilt) * second
                                                      + np.sin(tilt) * first)
    return sheared


def test_sheared_affine_is_accepted_with_a_warning(dataset):
    scan = _load_rewritten(dataset, affine=_sheared(_source_scan()[1]))
    # nibabel strips the shear from the qform it writes: the two still agree
    (warning,) = scan.header_warnings
    assert "sheared" in warning and "2° from perpendicular" in warning
    np.testing.assert_allclose(scan.affine, _sheared(_source_scan()[1]), atol=1e-4)


def test_pixdim_unlike_the_affine_is_accepted_with_a_warning(dataset):
    scan = _load_rewritten(dataset, zooms=(2.5, 3.0, 3.0))
    (warning,) = scan.header_warnings
    assert "pixdim: [2.5, 3.0, 3.0] mm" in warning and "[3.0, 3.0, 3.0] mm" in warning


def test_header_faults_nibabel_repairs_become_warnings(dataset):
    scan = _load_rewritten(dataset, edit=_fields(sform_code=7))
    assert scan.header_warnings == (
        "Header fault, repaired by nibabel on reading: sform_code 7 not valid.",)
    assert int(scan.img.header["sform_code"]) == 0  # so the qform is used


def test_scl_slope_and_inter_are_applied(dataset):
    """int16 voxels stored with scl_slope 2, scl_inter 10 load (and fit) exactly as the
    float32 image of the scaled values does: the loader and the pipeline's reads
    (``get_fdata``, ``np.asarray(img.dataobj)``) all go through nibabel's scaling."""
    from dipy.reconst.dti import TensorModel

    from pipeline.steps.files import load_array, load_scan

    raw = np.round(np.array(_source_scan()[0]) / 2).astype(np.int16)
    loaded = {}
    for name, data, write in (("scaled", raw, dict(dtype=np.int16,
                                                   edit=_fields(scl_slope=2.0, scl_inter=10.0))),
                              ("plain", raw * 2.0 + 10.0, {})):
        path = dataset.dwi_dir / f"{name}_dwi.nii.gz"
        _write_nifti(path, data, **write)
        load_dwi(path, dataset.bval, dataset.bvec)  # the full check, voxels included
        scan, series = load_scan(path, dataset.bval, dataset.bvec, 50.0)
        np.testing.assert_array_equal(load_array(path)[0], series)
        box = series[24:40, 24:40, 16:24]
        loaded[name] = (series, TensorModel(scan.gradient_table()).fit(box).fa)
    np.testing.assert_array_equal(loaded["scaled"][0], loaded["plain"][0])
    assert loaded["scaled"][0].max() == raw.max() * 2 + 10
    np.testing.assert_array_equal(loaded["scaled"][1], loaded["plain"][1])


def test_trailing_singleton_fifth_axis_is_read_as_4d(dataset):
    source = np.array(_source_scan()[0])
    _write_nifti(dataset.image, source[..., None])
    scan = load_dwi(dataset.image, dataset.bval, dataset.bvec)
    assert scan.img.shape == source.shape and scan.header_warnings == ()
    np.testing.assert_array_equal(scan.img.get_fdata(dtype=np.float32), source)


def test_header_warnings_reach_the_preprocessing_qc_and_its_notices(dataset, tmp_path):
    from pipeline.io import outputs
    from pipeline.steps import collect_preprocessing_qc, denoise
    from pipeline.tractometry.qc import preprocessing_notices

    _write_nifti(dataset.image, _source_scan()[0], affine=_sheared(_source_scan()[1]))
    mask = outputs.save_nifti(tmp_path / "mask.nii.gz", np.ones(_source_scan()[0].shape[:3]),
                              _source_scan()[1], dtype=np.uint8)
    noise_qc = denoise(dataset.image, dataset.bval, dataset.bvec, mask, out_dir=tmp_path,
                       method="none")["qc"]
    (warning,) = json.loads(Path(noise_qc).read_text())["header"]["warnings"]
    assert "sheared" in warning
    pre_qc = json.loads(Path(collect_preprocessing_qc(
        out_dir=tmp_path, denoise_qc=noise_qc, motion_qc=None, outliers_qc=None,
        gradient_qc=None, tensor_qc=None)).read_text())
    assert pre_qc["header"] == [{"file": IMAGE, "warnings": [warning]}]
    assert preprocessing_notices(pre_qc) == [f"Image header ({IMAGE}): {warning}"]
    # combined runs: one entry per run, from the merged denoising QC
    merged = tmp_path / "merged_qc.json"
    merged.write_text(json.dumps({"method": "none", "per_run": [
        {"header": {"file": "a_dwi.nii.gz", "warnings": []}},
        {"header": {"file": "b_dwi.nii.gz", "warnings": ["odd"]}}]}))
    combined = json.loads(Path(collect_preprocessing_qc(
        out_dir=tmp_path, denoise_qc=merged, motion_qc=None, outliers_qc=None,
        gradient_qc=None, tensor_qc=None)).read_text())
    assert preprocessing_notices(combined) == ["Image header (b_dwi.nii.gz): odd"]
