"""Writing outputs atomically, with provenance (versions, parameters, checksums)."""

import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__

PIPELINE_NAME = "cst-integrity"
_VERSIONED_PACKAGES = ("dipy", "nibabel", "nipype", "numpy", "scipy", "joblib", "matplotlib")


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


def save_nifti(path, data, affine, *, header=None, dtype=np.float32):
    """Save an array as NIfTI (float32 by default), atomically."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header=header)
    img.set_data_dtype(dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_sidecar(output_path, *, description, sources, parameters=None, extra=None):
    """BIDS-Derivatives JSON sidecar next to ``output_path`` saying how it was made."""
    output_path = Path(output_path)
    name = output_path.name
    for ext in (".nii.gz", ".nii", ".trk", ".tsv", ".html", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    sidecar = {"Description": description, "Sources": [str(s) for s in sources],
               "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}],
               "SoftwareVersions": software_versions()}
    if parameters:
        sidecar["Parameters"] = parameters
    if extra:
        sidecar.update(extra)
    return write_json(output_path.with_name(name + ".json"), sidecar)


def write_dataset_description(out_dir, *, source_dataset=None):
    """The BIDS-Derivatives ``dataset_description.json`` of the output folder."""
    description = {
        "Name": "CST integrity derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                         "Description": "Corticospinal tract reconstruction and integrity "
                                        "metrics (research use, not a medical device)"}],
    }
    if source_dataset:
        description["SourceDatasets"] = [{"URL": Path(source_dataset).resolve().as_uri()}]
    return write_json(Path(out_dir) / "dataset_description.json", description)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
