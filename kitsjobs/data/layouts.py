"""Find the cases of a dataset folder in the KiTS23 or the flat layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

LAYOUTS = ("kits23", "flat")
NIFTI_SUFFIX = ".nii.gz"
# Image and label paths of each layout, named in the message about a wrong --layout.
LAYOUT_FILES = {
    "kits23": "ROOT/CASE/imaging.nii.gz",
    "flat": "ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz",
}


@dataclass(frozen=True)
class Case:
    """One case: its name, image file and, when present, label file."""

    name: str
    image: Path
    label: Optional[Path]


def find_cases(root: str | Path, layout: str, require_labels: bool = True) -> list[Case]:
    """List the cases under ``root``, sorted by name.

    Args:
        root: dataset folder.
        layout: "kits23" (ROOT/CASE/imaging.nii.gz and segmentation.nii.gz) or
            "flat" (ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz).
        require_labels: when true, an image without its label is an error.

    Returns:
        The cases; ``label`` is None only when ``require_labels`` is false.

    Raises:
        UserError: unknown layout, missing or empty folder, or (with
            ``require_labels``) images without labels, all named in one message.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown data layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; set data.root to an existing folder")

    pairs = _kits23_pairs(root) if layout == "kits23" else _flat_pairs(root)
    if not pairs:
        raise UserError(f"no cases found in {root} for data layout '{layout}'; {layout_hint(layout)}")

    unlabeled = sorted(name for name, (_, label) in pairs.items() if label is None)
    if require_labels and unlabeled:
        raise UserError(
            f"{len(unlabeled)} image(s) in {root} have no label file: {', '.join(unlabeled[:10])}"
            f"{' ...' if len(unlabeled) > 10 else ''}; add the labels or remove those images"
        )
    return [Case(name, image, label) for name, (image, label) in sorted(pairs.items())]


def layout_hint(layout: str) -> str:
    """Describe where the files of ``layout`` are expected, and the other layout's switch."""
    if layout == "kits23":
        return "expected ROOT/case_XXXXX/imaging.nii.gz (use data=flat for ROOT/volume/ and ROOT/seg/)"
    return "expected ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz (use data=kits23 for case folders)"


def no_cases_message(root: Path, layout: str, root_option: str = "") -> str:
    """Describe a dataset folder without cases in ``layout`` for a command with a ``--layout`` option.

    The other layout is searched too, so a folder in the wrong layout gets the switch that fixes it.

    Args:
        root: the dataset folder.
        layout: the layout that found no case.
        root_option: the flag that names ``root``, such as ``--input``; "" for a positional argument.

    Returns:
        One line, starting with "no cases found", that ends with the fix.
    """
    other = next(name for name in LAYOUTS if name != layout)
    try:
        other_count = len(find_cases(root, other, require_labels=False))
    except UserError:
        other_count = 0
    named_root = f"{root_option} {root}" if root_option else str(root)
    message = f"no cases found in {named_root} for --layout {layout} (expected {LAYOUT_FILES[layout]})"
    if other_count:
        return f"{message}, but {other_count} in the {other} layout ({LAYOUT_FILES[other]}); pass --layout {other}"
    return f"{message} nor for --layout {other} ({LAYOUT_FILES[other]}); pass a dataset folder in one of them"


def _kits23_pairs(root: Path) -> dict[str, tuple[Path, Optional[Path]]]:
    pairs: dict[str, tuple[Path, Optional[Path]]] = {}
    for folder in root.iterdir():
        image = folder / f"imaging{NIFTI_SUFFIX}"
        if not folder.is_dir() or not image.is_file():
            continue
        label = folder / f"segmentation{NIFTI_SUFFIX}"
        pairs[folder.name] = (image, label if label.is_file() else None)
    return pairs


def _flat_pairs(root: Path) -> dict[str, tuple[Path, Optional[Path]]]:
    pairs: dict[str, tuple[Path, Optional[Path]]] = {}
    image_dir, label_dir = root / "volume", root / "seg"
    if not image_dir.is_dir():
        return pairs
    for image in image_dir.glob(f"*{NIFTI_SUFFIX}"):
        name = image.name[: -len(NIFTI_SUFFIX)]
        label = label_dir / image.name
        pairs[name] = (image, label if label.is_file() else None)
    return pairs


def find_images(root: str | Path) -> list[tuple[str, Path]]:
    """List (case name, image path) for inference, whatever the layout.

    Accepts the KiTS23 layout, the flat layout, or a folder of NAME.nii.gz files.

    Raises:
        UserError: missing folder or no image found.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"input folder {root} not found; pass an existing folder")
    if (root / "volume").is_dir():
        cases = find_cases(root, "flat", require_labels=False)
        return [(case.name, case.image) for case in cases]
    kits = _kits23_pairs(root)
    if kits:
        return [(name, image) for name, (image, _) in sorted(kits.items())]
    files = sorted(root.glob(f"*{NIFTI_SUFFIX}"))
    if not files:
        raise UserError(
            f"no images found in {root}; expected case folders with imaging.nii.gz, "
            "a volume/ folder, or NAME.nii.gz files"
        )
    return [(path.name[: -len(NIFTI_SUFFIX)], path) for path in files]
