"""Scan and validate a dataset folder ``<domain>/<class>/<image>``.

Files are listed in torchvision ``ImageFolder`` order (sorted classes, then a sorted walk of
each class folder), so that seeded splits assign exactly the images the reference code does.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedclip.data.specs import SPECS, DatasetSpec, detect_spec
from fedclip.errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<domain>/<class>/<image>"
_WARNED: set[tuple[Path, str]] = set()


@dataclass(frozen=True)
class Domain:
    """One domain's images, in ImageFolder order, with labels indexing the dataset's classes."""

    name: str
    root: Path
    files: tuple[Path, ...]
    labels: np.ndarray
    present: tuple[int, ...]  # class indices with at least one image here

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class DomainDataset:
    root: Path
    spec: DatasetSpec | None
    classes: tuple[str, ...]
    domains: dict[str, Domain]
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else "custom"


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _hidden(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and e.name.startswith("."))


def _image_files(class_dir: Path, seen_files: dict[tuple[int, int], str] | None = None
                 ) -> list[Path]:
    """Image files under a class folder, sorted as ImageFolder walks. Symbolic links are
    followed, but a folder is visited once (a link loop cannot multiply images) and a file
    reached twice through links counts once; dangling links and anything that is not a
    regular file (a FIFO named .jpg would hang a reader) are skipped, with a warning."""
    files: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files = {} if seen_files is None else seen_files  # file -> the class it counts for
    skipped: list[str] = []
    walked = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        st_dir = os.stat(dirpath)
        real = (st_dir.st_dev, st_dir.st_ino)  # the folder itself, however it was reached
        if real in seen_dirs:
            dirnames[:] = []
            skipped.append(f"{dirpath} (a link back to a folder already read)")
            continue
        seen_dirs.add(real)
        dirnames.sort()
        walked.append((dirpath, filenames))
    for dirpath, filenames in sorted(walked):  # ImageFolder's order: sorted by folder path
        for name in sorted(filenames):
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                skipped.append(f"{path} (a dangling link)")
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append(f"{path} (not a regular file)")
                continue
            real_file = (st.st_dev, st.st_ino)  # from the stat above: no extra system call
            if real_file in seen_files:
                skipped.append(f"{path} (the same file as one in class "
                               f"{seen_files[real_file]!r}, through a link: counted there "
                               f"only)")
                continue
            seen_files[real_file] = class_dir.name
            files.append(path)
    if skipped:
        log.warning("skipped %d entries under %s: %s", len(skipped), class_dir,
                    "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return files


def _canonical(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def scan_dataset(root: str | Path, dataset: str = "auto",
                 classes: tuple[str, ...] | None = None) -> DomainDataset:
    """List and validate every domain under ``root``.

    Raises :class:`DataError` with a one-line fix for a missing root, no domains, an empty
    domain, a domain or class the dataset's spec does not know, or class names that differ
    across domains only in spelling. A class missing from a domain is a warning.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder; "
                        f"pass --data-root pointing at a folder laid out as {LAYOUT}")
    domain_names = _subdirs(root)
    if hidden := _hidden(root):
        _warn_once(root, [f"ignored hidden folder(s) {', '.join(hidden)} under {root} "
                          f"(names starting with '.'): not domains"])
    if not domain_names:
        raise DataError(f"data root {root} has no domain folders; expected {LAYOUT}")
    _check_depth(root, domain_names)
    spec = _choose_spec(dataset, domain_names, root)

    class_dirs = {d: _subdirs(root / d) for d in domain_names}
    if classes is None:
        classes = spec.classes if spec and spec.classes else _union_classes(class_dirs, root)
    if spec and spec.num_classes and dataset == spec.name and len(classes) != spec.num_classes:
        raise DataError(f"{root} has {len(classes)} classes but {spec.name} has "
                        f"{spec.num_classes}; fix the folder or pass --dataset custom")
    domains: dict[str, Domain] = {}
    warnings: list[str] = []
    for d in domain_names:
        unknown = [c for c in class_dirs[d] if c not in classes]
        if unknown:
            raise DataError(
                f"domain {d!r} has class folder(s) {unknown} that {spec.name if spec else 'the'} "
                f"dataset does not have (expected {list(classes)}); rename them, or pass "
                f"--dataset custom to use the folder names as they are")
        domains[d], warning = _read_domain(root / d, d, tuple(classes), class_dirs[d])
        warnings += [warning] if warning else []
    _warn_once(root, warnings)
    return DomainDataset(root, spec, tuple(classes), domains, tuple(warnings))


def _warn_once(root: Path, warnings: list[str]) -> None:
    for w in warnings:
        if (root, w) not in _WARNED:  # once per process: Flower nodes rescan per message
            _WARNED.add((root, w))
            log.warning(w)


def _read_domain(droot: Path, name: str, classes: tuple[str, ...], class_dirs: list[str]
                 ) -> tuple[Domain, str | None]:
    """One domain's files in ImageFolder order; a warning when it lacks some classes."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    seen: dict[tuple[int, int], str] = {}  # a file reached from two classes gets one label
    real_dirs: dict[str, str] = {}
    for c in class_dirs:
        real = os.path.realpath(droot / c)
        if real in real_dirs:  # a class folder that links to another class's folder
            _warn_once(droot, [f"class folder {name}/{c} is a link to class "
                               f"{real_dirs[real]!r}: its images are counted under "
                               f"{real_dirs[real]!r} only"])
            continue
        real_dirs[real] = c
        found = _image_files(droot / c, seen)
        files += found
        labels += [index[c]] * len(found)
    hidden = _hidden(droot)
    if hidden:
        _warn_once(droot, [f"ignored hidden folder(s) {', '.join(hidden)} in domain "
                           f"{name!r} (names starting with '.'); rename them to use their "
                           f"images"])
    if not files:
        raise DataError(f"domain {name!r} has no images under {droot}; expected "
                        f"<class>/<image> with one of {', '.join(IMG_EXTENSIONS)}; "
                        f"add images or remove the folder")
    present = tuple(sorted(set(labels)))
    missing = [classes[i] for i in range(len(classes)) if i not in present]
    warning = (f"domain {name!r} has no images of {missing}: its accuracy is computed "
               f"over the {len(present)} classes it has") if missing else None
    return Domain(name, droot, tuple(files), np.asarray(labels, dtype=np.int64),
                  present), warning


def scan_domain(root: str | Path, domain: str, classes: tuple[str, ...]) -> Domain:
    """One site's own domain, checked against the run's classes; nothing else need exist.

    ``root`` is either that domain's folder (``<class>/<image>``) or a folder holding it
    (``<domain>/<class>/<image>``; other domains there are ignored). A class folder the run
    does not have (extra or misspelled) is an error that names it; a class the run has but
    the site lacks is a warning, and the site is scored over the classes it has.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder; point the "
                        f"node's data-root at its own images ({domain}/<class>/<image> or "
                        f"<class>/<image>)")
    droot = root / domain if (root / domain).is_dir() else root
    class_dirs = _subdirs(droot)
    if droot == root and not set(class_dirs) & set(classes):
        raise DataError(f"{root} holds neither a folder {domain!r} nor class folders of this "
                        f"run ({', '.join(classes)}); point data-root at the domain's images")
    unknown = [c for c in class_dirs if c not in classes]
    if unknown:
        hints = [f"{c!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            c, classes, n=1)) else repr(c) for c in unknown]
        raise DataError(f"{droot} has class folder(s) this run does not have: "
                        f"{', '.join(hints)}; the run's classes are {list(classes)}; rename "
                        f"or remove them")
    found, warning = _read_domain(droot, domain, classes, class_dirs)
    _warn_once(droot, [warning] if warning else [])
    return found


def _check_depth(root: Path, domain_names: list[str]) -> None:
    """A root one level too high (the folder above PACS) or too low (one domain) is caught
    before anything is extracted."""
    def has_images(folder: Path) -> bool:
        return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
                   for e in os.scandir(folder))

    if len(domain_names) == 1:
        inner = root / domain_names[0]
        if _subdirs(inner) and all(_subdirs(inner / c) and not has_images(inner / c)
                                   for c in _subdirs(inner)):
            raise DataError(f"{root} holds one folder, {domain_names[0]!r}, whose folders "
                            f"hold folders: it looks one level too high; pass --data-root "
                            f"{inner}")
    if domain_names and all(has_images(root / d) and not _subdirs(root / d)
                            for d in domain_names):
        raise DataError(f"the folders of {root} hold images directly: that is one domain "
                        f"(<class>/<image>), not a dataset; pass its parent, laid out as "
                        f"{LAYOUT}")


def _choose_spec(dataset: str, domain_names: list[str], root: Path) -> DatasetSpec | None:
    if dataset == "custom":
        return None
    if dataset == "auto":
        return detect_spec(domain_names)
    if dataset not in SPECS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(SPECS)}, "
                        f"'auto' to detect, or 'custom'")
    spec = SPECS[dataset]
    extra = [d for d in domain_names if d not in spec.domains]
    if extra:
        raise DataError(f"{root} has domain folder(s) {extra} that {spec.name} does not have "
                        f"(expected {list(spec.domains)}); fix the folder or pass --dataset custom")
    return spec


def _union_classes(class_dirs: dict[str, list[str]], root: Path) -> tuple[str, ...]:
    seen: dict[str, tuple[str, str]] = {}
    for d, names in class_dirs.items():
        for c in names:
            key = _canonical(c)
            if key in seen and seen[key][0] != c:
                other, where = seen[key]
                raise DataError(
                    f"class names differ across domains: {other!r} in {where!r} but {c!r} in "
                    f"{d!r} under {root}; rename the folders so every domain spells it the same")
            seen.setdefault(key, (c, d))
    return tuple(sorted(name for name, _ in seen.values()))
