"""Writing outputs atomically, with provenance (versions, parameters, checksums)."""

import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
from trx import trx_file_memmap

from .. import __version__

PIPELINE_NAME = "cst-integrity"
_VERSIONED_PACKAGES = ("dipy", "nibabel", "nipype", "numpy", "scipy", "joblib", "matplotlib",
                       "trx-python", "cvxpy")
#: NIfTI xform code of scanner-based anatomical coordinates.
_SCANNER_CODE = 1
#: ``DatasetLinks`` name of the BIDS dataset the derivatives are computed from.
RAW_DATASET = "raw"
#: Outputs BIDS (1.11) has no file names for yet, for the validator to skip (gitignore syntax).
BIDSIGNORE = """\
# cst-integrity outputs for which BIDS has no file names yet.
# DTI parameter maps and streamlines (.trk, .trx): names proposed for BIDS
# (BEP016, diffusion derivatives), not yet in the specification.
*_dwimap.*
*_tractography.*
# Tract profiles (TSV; CSV in pyAFQ's layout), norms and normative comparisons.
*_tractometry.*
*_localization.json
# Per-run results (a JSON data file, not a sidecar) and the group table.
*_metrics.*
# HTML reports and run logs.
/*.html
/sub-*/log
"""


def _file_mode():
    """Mode of a newly created file under the process umask (0644 for umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A reader never sees a half-written file, and a crash leaves no file that
    looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); outputs get the mode any new file would.
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return Path(path)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_nifti(path, data, affine, *, reference=None, dtype=np.float32):
    """Save an array as NIfTI (float32 by default), atomically.

    Every affine here maps voxels to millimetres, so the spatial unit is mm.
    The qform and the sform both hold ``affine`` (the qform, which cannot hold a
    shear, its nearest shear-free transform), with one code: that of the
    transform ``reference``'s own affine came from. Tools differ in which of
    the two forms they read; with both equal, every tool puts the image in the
    same space as its source.

    Parameters
    ----------
    path : path-like
        Output file (``.nii`` or ``.nii.gz``).
    data : array-like
        Image data, cast to ``dtype``.
    affine : (4, 4) array
        Voxel to world (RAS+ mm) transform.
    reference : nibabel.Nifti1Image or nibabel.Nifti1Header, optional
        The image this one derives from, on the same grid or in the same space:
        its xform code, and its time unit for 4D data. Without it the code is
        scanner (1), the space of the scanner-made images the pipeline reads,
        and the time unit is left unknown (the 4th axis of our 4D images is
        volumes or components, not time).
    dtype : numpy dtype, optional
        Data type on disk.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    img = _in_space(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), affine, reference,
                    dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def _in_space(img, affine, reference, dtype):
    """``img`` with data type ``dtype`` on disk, its sform and qform holding ``affine`` and
    its units set, as :func:`save_nifti` describes."""
    img.set_data_dtype(dtype)
    code, time_unit = _SCANNER_CODE, "unknown"
    if reference is not None:
        header = getattr(reference, "header", reference)
        code = _affine_code(header)
        if img.ndim > 3:
            time_unit = header.get_xyzt_units()[1]
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units(xyz="mm", t=time_unit)
    return img


class _NiftiBlocks:
    """Writes blocks of a float32 4D NIfTI's data in place in its open file
    (:func:`nifti_volume_writer`)."""

    def __init__(self, handle, offset, shape):
        self.handle, self.offset, self.shape = handle, offset, tuple(int(n) for n in shape)
        self.slice_bytes = self.shape[0] * self.shape[1] * 4
        self.volume_bytes = self.slice_bytes * self.shape[2]

    def volume(self, index, volume):
        """Volume ``index`` (X, Y, Z)."""
        self.slices(0, np.asarray(volume)[..., None], first_volume=int(index))

    def slices(self, z_start, block, *, first_volume=0):
        """Slices ``z_start`` … of the volumes ``first_volume`` … (``block``: (X, Y, t, n)):
        one contiguous piece of the file per volume."""
        block = np.asarray(block, dtype=np.float32)
        for v in range(block.shape[3]):
            os.pwrite(self.handle.fileno(), block[..., v].tobytes(order="F"),
                      self.offset + (first_volume + v) * self.volume_bytes
                      + int(z_start) * self.slice_bytes)


@contextmanager
def nifti_volume_writer(path, shape, affine, *, reference=None):
    """Write a float32 4D NIfTI (``.nii``) block by block, atomically.

    Yields a writer whose ``volume(index, volume)`` puts a volume (X, Y, Z) and whose
    ``slices(z_start, block)`` puts whole slices of every volume ((X, Y, t, N)) at their
    place in the file: NIfTI stores each volume as one block and each slice of it as one
    piece, so the series is never whole in this process's memory. The file (header
    included) is the one :func:`save_nifti` writes for the same series; it appears under
    ``path`` when the block ends without an error.
    """
    dtype = np.dtype(np.float32)
    img = _in_space(nib.Nifti1Image(np.zeros((1, 1, 1, 1), dtype=dtype), affine), affine,
                    reference, dtype)
    header = img.header.copy()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_slope_inter(1.0, 0.0)  # as nibabel stores unscaled float data
    with atomic_path(path) as tmp, open(tmp, "r+b") as handle:
        header.write_to(handle)  # sets the data offset too
        writer = _NiftiBlocks(handle, int(header.get_data_offset()), shape)
        handle.truncate(writer.offset + writer.volume_bytes * int(shape[3]))
        yield writer


def _affine_code(header):
    """The xform code of the transform that nibabel takes as ``header``'s affine.

    nibabel uses the sform when its code is set, else the qform; a header with
    neither is taken as scanner space.
    """
    for field in ("sform_code", "qform_code"):
        code = int(header[field])
        if code > 0:
            return code
    return _SCANNER_CODE


def save_trk(path, streamlines, reference_img):
    """Save world-mm streamlines as TrackVis .trk referenced to ``reference_img``, atomically."""
    tractogram = nib.streamlines.Tractogram(list(streamlines), affine_to_rasmm=np.eye(4))
    header = {
        nib.streamlines.Field.VOXEL_TO_RASMM: reference_img.affine,
        nib.streamlines.Field.VOXEL_SIZES: reference_img.header.get_zooms()[:3],
        nib.streamlines.Field.DIMENSIONS: reference_img.shape[:3],
        nib.streamlines.Field.VOXEL_ORDER: "".join(nib.aff2axcodes(reference_img.affine)),
    }
    with atomic_path(path) as tmp:
        nib.streamlines.save(tractogram, str(tmp), header=header)
    return Path(path)


def save_trx(path, streamlines, reference_img):
    """Save world-mm streamlines as TRX (trx-python) referenced to ``reference_img``, atomically.

    TRX stores RAS+ mm positions with the reference grid's affine and
    dimensions, so readers need no separate reference image.
    """
    tractogram = nib.streamlines.Tractogram(list(streamlines), affine_to_rasmm=np.eye(4))
    trx = trx_file_memmap.TrxFile.from_tractogram(tractogram, reference=reference_img)
    try:
        with atomic_path(path) as tmp:
            trx_file_memmap.save(trx, str(tmp))
    finally:
        trx.close()  # removes trx-python's temporary memory-mapped copy
    return Path(path)


def load_streamlines(path):
    """Streamlines of a tractogram file, in world RAS+ mm."""
    return list(nib.streamlines.load(str(path)).streamlines)


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def software_versions():
    versions = {PIPELINE_NAME: __version__, "python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(*, inputs, parameters):
    """Provenance block: software versions, parameters and input checksums."""
    return {
        "software": software_versions(),
        "parameters": parameters,
        "inputs": {str(Path(p).name): {"path": str(p), "sha256": file_sha256(p)} for p in inputs},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def dataset_roots(path):
    """The BIDS datasets that a file at ``path`` can name in BIDS URIs.

    Parameters
    ----------
    path : path-like
        A file in a dataset (it need not exist yet).

    Returns
    -------
    dict
        Dataset name -> root folder: ``""`` for the dataset holding ``path``
        (the nearest folder up with a ``dataset_description.json``), then each
        of its ``DatasetLinks`` that is a local folder. Empty when ``path`` is
        in no dataset.
    """
    for folder in Path(path).resolve().parents:
        description = folder / "dataset_description.json"
        if description.is_file():
            roots = {"": folder}
            for name, link in json.loads(description.read_text()).get("DatasetLinks", {}).items():
                local = _local_folder(link, folder)
                if local is not None:
                    roots[name] = local
            return roots
    return {}


def _local_folder(link, base):
    """The folder a ``DatasetLinks`` value names: a file URI or a path (relative to
    ``base``, the dataset root); None for a remote location."""
    parsed = urlparse(link)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme:
        return None
    return (base / link).resolve()


def bids_uri(path, roots):
    """``path`` as a BIDS URI, ``bids:<dataset>:<path within it>``.

    Parameters
    ----------
    path : path-like
    roots : dict
        Dataset name -> root folder, as :func:`dataset_roots` returns; the
        first root that holds ``path`` names it (the current dataset comes
        first, so that a derivatives folder inside the raw dataset names its
        own files ``bids::...``).

    Returns
    -------
    str or None
        None when no root holds ``path``.
    """
    path = Path(path).resolve()
    for name, root in roots.items():
        if path.is_relative_to(root):
            return f"bids:{name}:{path.relative_to(root).as_posix()}"
    return None


def write_sidecar(output_path, *, description, sources, spatial_reference=None,
                  parameters=None, extra=None):
    """BIDS-Derivatives JSON sidecar next to ``output_path`` saying how it was made.

    Parameters
    ----------
    output_path : path-like
        The data file; the sidecar replaces its extension with ``.json``.
    description : str
    sources : list of path-like
        Files it was computed from, written as BIDS URIs against the datasets of
        :func:`dataset_roots` (a file in none of them keeps its path: BIDS has no
        URI for it).
    spatial_reference : path-like, optional
        The image whose grid and space the output shares (``SpatialReference``),
        written like ``sources``.
    parameters : dict, optional
    extra : dict, optional
        Further fields.

    Returns
    -------
    pathlib.Path
        The sidecar.
    """
    output_path = Path(output_path)
    name = output_path.name
    for ext in (".nii.gz", ".nii", ".trk", ".tsv", ".html", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    roots = dataset_roots(output_path)

    def uri(path):
        return bids_uri(path, roots) or str(path)

    versions = software_versions()
    sidecar = {"Description": description, "Sources": [uri(s) for s in sources],
               "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}],
               # BIDS defines SoftwareVersions as one string.
               "SoftwareVersions": ", ".join(f"{package} {version}"
                                             for package, version in versions.items() if version)}
    if spatial_reference is not None:
        sidecar["SpatialReference"] = uri(spatial_reference)
    if parameters:
        sidecar["Parameters"] = parameters
    if extra:
        sidecar.update(extra)
    return write_json(output_path.with_name(name + ".json"), sidecar)


def write_dataset_description(out_dir, *, source_dataset=None):
    """The dataset-level files of the BIDS-Derivatives output folder.

    ``dataset_description.json``, with the input dataset linked as
    :data:`RAW_DATASET` (``DatasetLinks``; a relative path when the output folder
    lies inside it, so that moving the study keeps the link) for the sidecars'
    ``bids:raw:`` URIs, and ``.bidsignore`` (:data:`BIDSIGNORE`).
    """
    out_dir = Path(out_dir).resolve()
    description = {
        "Name": "CST integrity derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                         "Description": "Corticospinal tract reconstruction and integrity "
                                        "metrics (research use, not a medical device)"}],
    }
    if source_dataset:
        source = Path(source_dataset).resolve()
        description["SourceDatasets"] = [{"URL": source.as_uri()}]
        description["DatasetLinks"] = {RAW_DATASET: os.path.relpath(source, out_dir)
                                       if out_dir.is_relative_to(source) else source.as_uri()}
    write_text(out_dir / ".bidsignore", BIDSIGNORE)
    return write_json(out_dir / "dataset_description.json", description)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
