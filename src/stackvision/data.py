"""Listing a data set into image paths, labels and the problems found on the way.

Three layouts: a folder with one subfolder per class (Keras ``flow_from_directory``), a
``labels.csv`` plus an image folder (Kaggle dog-breed layout), or unlabelled paths/folders for
prediction. Nothing is decoded here; unreadable images are found later, by the decoder.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from .errors import StackvisionError
from .images import is_image_file


@dataclass(frozen=True)
class Problem:
    """A file that was left out, and why."""

    path: str
    reason: str


@dataclass
class Listing:
    """Paths (and labels, for labelled data) in a stable order, plus what was left out."""

    paths: list[str]
    labels: list[str] | None = None
    problems: list[Problem] = field(default_factory=list)
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels or []))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels or []).items()))

    def __len__(self) -> int:
        return len(self.paths)


def _require_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise StackvisionError(f"{what} not found: {path}", "check the path")
    if not os.path.isdir(path):
        raise StackvisionError(f"{what} is not a folder: {path}", "give a folder of images")


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(
    root: str, seen: set[tuple[int, int]] | None = None
) -> tuple[list[str], list[Problem]]:
    """Image files below ``root``, following symlinked folders but entering each real folder
    once (by device and inode): a symlink loop or a second link to a folder adds no rows.
    ``seen``: folders not to enter (shared between the class folders of one data set)."""
    images, problems = [], []
    seen = set() if seen is None else seen
    seen.discard(_dir_id(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        ident = _dir_id(dirpath)
        if ident is None or ident in seen:
            dirnames[:] = []
            problems.append(
                Problem(
                    dirpath,
                    "a link to a folder listed elsewhere in the data (or a symlink loop); skipped",
                )
            )
            continue
        seen.add(ident)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if is_image_file(name):
                images.append(full)
            elif not name.lower().endswith((".csv", ".txt", ".json", ".md")):
                problems.append(Problem(full, "not an image file extension; skipped"))
    return images, problems


def from_folder(root: str) -> Listing:
    """One subfolder per class; every image below a class folder (recursively) has that class."""
    _require_dir(root, "data folder")
    classes = sorted(
        d
        for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    if not classes:
        raise StackvisionError(
            f"no class subfolders in {root}",
            "put each class's images in its own subfolder (DATA/<class>/*.jpg), "
            "or use --labels labels.csv --images DIR",
        )
    paths, labels, problems = [], [], []
    # the root and every class folder are entered only as themselves: a link from one class
    # into another (or up to the root) never relabels the other class's images
    seen = {_dir_id(os.path.join(root, d)) for d in ["", *classes]} - {None}
    for cls in classes:
        found, bad = _walk_images(os.path.join(root, cls), seen)
        paths += found
        labels += [cls] * len(found)
        problems += bad
    if not paths:
        raise StackvisionError(
            f"no images found under {root}", "supported: jpg png webp bmp gif tif"
        )
    return Listing(paths, labels, problems, source=os.path.abspath(root))


_ID_COLUMNS = ("id", "image", "image_id", "file", "filename", "path", "image_path", "img")
_LABEL_COLUMNS = ("label", "breed", "class", "category", "species", "target", "y")


def _pick_column(
    header: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, csv_path: str
) -> str:
    if wanted:
        if wanted not in header:
            raise StackvisionError(
                f"column '{wanted}' not in {csv_path} (columns: {', '.join(header)})",
                f"pass an existing column name with --{what}-col",
            )
        return wanted
    lowered = {h.lower().strip(): h for h in header}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    raise StackvisionError(
        f"cannot tell which column of {csv_path} holds the {what} (columns: {', '.join(header)})",
        f"name it with --{what}-col",
    )


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text(path: str) -> str:
    """A text file as str: UTF-8, or UTF-8/16/32 with a byte-order mark (Excel's "Unicode text"
    is UTF-16); anything else is refused naming the first bad byte, never guessed."""
    with open(path, "rb") as fh:
        data = fh.read()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None and len(data) >= 4 and data[1:4:2] == b"\0\0" and b"\0" not in data[0:4:2]:
        encoding = "utf-16-le"  # UTF-16 without a BOM: every ASCII character followed by NUL
    try:
        return data.decode(encoding or "utf-8")
    except UnicodeDecodeError as exc:
        raise StackvisionError(
            f"{path} is not {encoding or 'UTF-8'} text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})",
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 labels.csv > labels-utf8.csv)",
        ) from None


def _control_chars(text: str) -> str:
    """The control characters in ``text`` (NUL, newline, escape, DEL, ...), as escapes; '' if none."""
    bad = dict.fromkeys(ch for ch in text if unicodedata.category(ch) in ("Cc", "Zl", "Zp"))
    return " ".join(repr(ch)[1:-1] for ch in bad)


def _shown(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _check_row(csv_path: str, line: int, ident: str, label: str) -> None:
    """Refuse an id or label holding control characters: a NUL or an escape sequence in a class
    name ends up in the manifest, the terminal and the report; no real label has one."""
    for what, value in (("label", label), ("id", ident)):
        bad = _control_chars(value)
        if bad:
            raise StackvisionError(
                f"{csv_path} line {line}: the {what} {_shown(value)} holds control "
                f"character(s) {bad}",
                f"remove them from the {what} column (labels and ids are plain text)",
            )


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder``, by the names alone (``..`` resolved, symlinks not:
    a folder of symlinks into a shared image pool stays usable)."""
    folder = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([folder, path]) == folder


def from_csv(
    csv_path: str,
    images_dir: str | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
    allow_outside: bool = False,
    skip_missing: bool = False,
) -> Listing:
    """A labels CSV (e.g. Kaggle's ``id,breed``) plus the folder that holds the images.

    Ids may carry an extension or not (``.jpg`` and the other image extensions are tried); they may
    be paths relative to ``images_dir`` (default: the CSV's folder). A row whose file is missing is
    an error naming the first few, because a silently smaller training set is worse than a stop.

    An id that leads outside ``images_dir`` (``../../etc/passwd``, an absolute path) is refused
    naming its line, unless ``allow_outside``; so is a label or id with control characters.
    """
    if not os.path.isfile(csv_path):
        raise StackvisionError(f"labels file not found: {csv_path}", "check the --labels path")
    base = images_dir or os.path.dirname(os.path.abspath(csv_path))
    _require_dir(base, "images folder")
    reader = csv.DictReader(io.StringIO(read_text(csv_path), newline=""), skipinitialspace=True)
    try:
        header = list(reader.fieldnames or [])
        if len(header) < 2:
            raise StackvisionError(
                f"{csv_path} needs a header row with an id/path column and a label column",
                "e.g. 'id,breed'",
            )
        idc = _pick_column(header, id_col, _ID_COLUMNS, "id", csv_path)
        rest = [h for h in header if h != idc]
        if label_col or len(rest) != 1:
            lbl = _pick_column(rest, label_col, _LABEL_COLUMNS, "label", csv_path)
        else:
            lbl = rest[0]
        rows = []
        for r in reader:  # line_num: the line where the record ends (a quoted field may span lines)
            rows.append((reader.line_num, r[idc], r[lbl]))
    except csv.Error as exc:
        raise StackvisionError(
            f"{csv_path} line {reader.line_num}: {exc}",
            "a labels CSV holds short ids and labels: check that it is the right file and that "
            "every quote is closed (an unclosed quote turns the rest of the file into one field)",
        ) from None
    paths, labels, missing = [], [], []
    exts = (
        "",
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".JPG",
        ".JPEG",
        ".PNG",
    )
    for line, ident, label in rows:
        ident = (ident or "").strip()
        label = (label or "").strip()
        _check_row(csv_path, line, ident, label)
        if not ident or not label:
            what = f"row with id '{ident}' and label '{label}' is incomplete"
            missing.append((f"{csv_path}:{line}", what, what))
            continue
        if not allow_outside and not _inside(os.path.join(base, ident), base):
            raise StackvisionError(  # an absolute id is fine if it names a file in the folder
                f"{csv_path} line {line}: id '{ident}' leads outside the images folder {base}",
                "give ids relative to --images (or, if you trust this CSV, pass "
                "--allow-outside-images)",
            )
        for ext in exts:
            cand = os.path.join(base, ident + ext)
            if os.path.exists(cand) and not os.path.isdir(cand):  # odd files: the decoder says why
                paths.append(cand)
                labels.append(label)
                break
        else:
            why = f"listed in {os.path.basename(csv_path)} line {line} but no image file found"
            missing.append((os.path.join(base, ident), why, ident))
    if missing and not skip_missing:
        shown = ", ".join(m[2] for m in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise StackvisionError(  # a silently smaller training set is worse than a stop
            f"{len(missing)} row(s) of {csv_path} have no image file in {base}: {shown}",
            "fix the CSV or the --images folder, or pass --skip-missing-images to go on with "
            "the rows that have files (the rest are listed as problems)",
        )
    problems = [Problem(where, why) for where, why, _ in missing]
    if not paths:
        raise StackvisionError(f"{csv_path} lists no images", "add rows 'id,label'")
    return Listing(paths, labels, problems, source=os.path.abspath(csv_path))


def from_paths(inputs: list[str]) -> Listing:
    """Unlabelled images for prediction: files and/or folders (searched recursively)."""
    paths, problems = [], []
    for item in inputs:
        if os.path.isdir(item):
            found, bad = _walk_images(item)
            paths += found
            problems += bad
        elif os.path.exists(item):
            paths.append(item)  # not a regular file (a FIFO, a device): the decoder reports it
        else:
            raise StackvisionError(f"input not found: {item}", "check the image or folder path")
    if not paths:
        raise StackvisionError(
            f"no images found in {', '.join(inputs)}", "supported: jpg png webp bmp gif tif"
        )
    return Listing(paths, None, problems, source=", ".join(inputs))


def load_labelled(
    data: str | None,
    labels_csv: str | None = None,
    images_dir: str | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
    allow_outside: bool = False,
    skip_missing: bool = False,
) -> Listing:
    """The labelled-data entry point the CLI uses: a class-folder tree or a labels CSV."""
    if labels_csv:
        return from_csv(
            labels_csv, images_dir or data, id_col, label_col, allow_outside, skip_missing
        )
    if not data:
        raise StackvisionError(
            "no data given", "pass a folder of class subfolders, or --labels CSV --images DIR"
        )
    if os.path.isfile(data) and data.lower().endswith(".csv"):
        return from_csv(data, images_dir, id_col, label_col, allow_outside, skip_missing)
    return from_folder(data)


def check_trainable(labels: list[str], folds: int = 1) -> None:
    """Refuse data a classifier cannot be trained or cross-validated on, naming the fix."""
    counts = Counter(labels)
    if len(counts) < 2:
        only = next(iter(counts), "?")
        raise StackvisionError(
            f"only one class ('{only}') in the training data",
            "a classifier needs at least two classes: add another class folder",
        )
    if folds > 1:
        small = sorted((n, c) for c, n in counts.items() if n < folds)
        if small:
            desc = ", ".join(f"'{c}' has {n}" for n, c in small[:5])
            fewest = min(counts.values())
            # k-fold needs every class in every fold: --folds up to the smallest class works; a
            # class of one image cannot be cross-validated at all.
            fix = (
                f"add images to those classes or use --folds {fewest}"
                if fewest >= 2
                else "add images to the classes with a single image (k-fold needs at least 2 per "
                "class), or use --folds 0 to train without cross-validation"
            )
            raise StackvisionError(
                f"{len(small)} class(es) have fewer images than --folds {folds}: {desc}", fix
            )
