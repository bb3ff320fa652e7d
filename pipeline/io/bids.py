"""Finding a subject's diffusion runs in a BIDS dataset and naming derivatives."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
# BIDS entity order for file names (subset that occurs in DWI file names).
_ENTITY_ORDER = ("sub", "ses", "acq", "rec", "dir", "run", "part", "chunk")


def normalize_subject_label(subject):
    """Return the bare BIDS label of ``subject`` (``sub-01`` and ``01`` give ``01``)."""
    label = subject[4:] if subject.startswith("sub-") else subject
    if not _LABEL.fullmatch(label):
        # repr() shows hidden characters (a trailing newline, a tab) the user cannot see
        raise InputError(
            f"{subject!r} is not a BIDS subject label (letters and digits only).",
            fix="Pass the label as it appears in the folder name, e.g. 'sub-01' or '01'.",
        )
    return label


def parse_entities(filename):
    """Entities of a BIDS file name, in file-name order, e.g. ``{'sub': '01', 'dir': 'AP'}``."""
    stem = Path(filename).name.split(".")[0]
    entities = {}
    for part in stem.split("_")[:-1]:
        if "-" in part:
            key, value = part.split("-", 1)
            entities[key] = value
    return entities


class _RunNaming:
    """Derivative names from ``self.entities`` (shared by single and combined runs)."""

    @property
    def stem(self):
        """File-name prefix for this run's derivatives, e.g. ``sub-01_dir-AP``."""
        keys = [k for k in _ENTITY_ORDER if k in self.entities]
        keys += [k for k in self.entities if k not in _ENTITY_ORDER]
        return "_".join(f"{k}-{self.entities[k]}" for k in keys)

    @property
    def subject(self):
        return self.entities["sub"]

    def derivatives_dir(self, out_dir):
        """``OUT/sub-X[/ses-Y]/dwi`` for this run."""
        path = Path(out_dir) / f"sub-{self.subject}"
        if "ses" in self.entities:
            path = path / f"ses-{self.entities['ses']}"
        return path / "dwi"


@dataclass(frozen=True)
class DwiRun(_RunNaming):
    """One diffusion-weighted run and its gradient files."""

    dwi: Path
    bval: Path
    bvec: Path
    sidecar: Path | None
    entities: dict = field(hash=False)

    @property
    def source_files(self):
        return [self.dwi, self.bval, self.bvec]

    def metadata(self):
        """The JSON sidecar as a dict ({} when there is none)."""
        if self.sidecar is None:
            return {}
        try:
            return json.loads(self.sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(
                f"The JSON sidecar cannot be read: {exc}", path=self.sidecar,
                fix="Repair or remove the sidecar file.",
            ) from exc


def _companion(dwi, suffix):
    name = dwi.name
    base = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return dwi.with_name(base + suffix)


def find_dwi_runs(bids_dir, subject):
    """All DWI runs of ``subject`` in ``bids_dir`` (sessions included), sorted by name.

    Raises
    ------
    InputError
        The dataset or subject is missing, no DWI run exists, or a run lacks
        its ``.bval``/``.bvec`` file.
    """
    bids_dir = Path(bids_dir).absolute()  # steps run in other working directories
    label = normalize_subject_label(subject)
    if not bids_dir.is_dir():
        raise InputError("The BIDS directory does not exist.", path=bids_dir,
                         fix="Pass --bids-dir pointing at the dataset root.")
    subject_dir = bids_dir / f"sub-{label}"
    if not subject_dir.is_dir():
        known = sorted(p.name for p in bids_dir.glob("sub-*") if p.is_dir())
        raise InputError(
            f"Subject 'sub-{label}' not found in the BIDS dataset.", path=subject_dir,
            fix=f"Use one of: {', '.join(known) or '(no subjects found)'}.",
        )
    candidates = sorted(
        set(subject_dir.glob("dwi/*_dwi.nii*")) | set(subject_dir.glob("ses-*/dwi/*_dwi.nii*"))
    )
    candidates = [p for p in candidates if p.name.endswith((".nii", ".nii.gz"))]
    if not candidates:
        orphans = sorted(p for pattern in ("dwi/*_dwi.bval", "dwi/*_dwi.bvec",
                                           "ses-*/dwi/*_dwi.bval", "ses-*/dwi/*_dwi.bvec")
                         for p in subject_dir.glob(pattern))
        if orphans:
            image = orphans[0].with_name(orphans[0].name[: -len(".bval")] + ".nii.gz")
            raise InputError(
                f"{orphans[0].name} has no diffusion image next to it (expected {image.name}).",
                path=image, fix="Put the 4D DWI image (.nii or .nii.gz) next to its .bval/.bvec.",
            )
        raise InputError(
            f"No diffusion run (*_dwi.nii[.gz]) for sub-{label}.", path=subject_dir,
            fix="Put the DWI in sub-<label>/[ses-<label>/]dwi/ with a BIDS name.",
        )
    by_base = {}
    for dwi in candidates:
        by_base.setdefault(_companion(dwi, ""), []).append(dwi)
    for base, images in by_base.items():
        if len(images) > 1:
            raise InputError(
                f"The run {base.name} has two images: {' and '.join(p.name for p in images)}.",
                path=images[0], fix="Keep one of them (.nii or .nii.gz), not both.",
            )
    runs = []
    for dwi in candidates:
        bval, bvec = _companion(dwi, ".bval"), _companion(dwi, ".bvec")
        for needed in (bval, bvec):
            if not needed.is_file():
                raise InputError(
                    f"The gradient file for {dwi.name} is missing.", path=needed,
                    fix="Provide FSL-format .bval and .bvec files next to the image.",
                )
        sidecar = _companion(dwi, ".json")
        runs.append(DwiRun(dwi=dwi, bval=bval, bvec=bvec,
                           sidecar=sidecar if sidecar.is_file() else None,
                           entities=parse_entities(dwi.name)))
    return runs


@dataclass(frozen=True)
class CombinedRuns(_RunNaming):
    """Several runs of one subject and session processed as one series (``--combine-runs``).

    Named by the entities all runs share (``sub-01_dir-AP`` + ``sub-01_dir-PA`` →
    ``sub-01``); the first run is the reference the others are aligned to.
    """

    runs: tuple

    @property
    def entities(self):
        first = self.runs[0].entities
        return {k: v for k, v in first.items()
                if all(r.entities.get(k) == v for r in self.runs[1:])}

    @property
    def source_files(self):
        return [path for run in self.runs for path in run.source_files]


def combine_by_session(runs):
    """Group runs for ``--combine-runs``: one CombinedRuns per session with several runs."""
    sessions = {}
    for run in runs:
        sessions.setdefault(run.entities.get("ses"), []).append(run)
    return [group[0] if len(group) == 1 else CombinedRuns(runs=tuple(group))
            for group in sessions.values()]
