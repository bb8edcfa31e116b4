"""Finding a build's inputs: structure files under folders, list files and links; entry names; the
fingerprint of the inputs and options that keys the cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..structure import is_structure_file
from .options import BUILD_FORMAT_VERSION, REPORT_NAME, BuildOptions, DatasetBuildError
from .proteinmpnn_set import index_files, is_proteinmpnn_set

LIST_SUFFIXES = (".txt", ".list", ".lst")


def is_built_dataset(path) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def find_structure_files(pdb_path, flag: str = "--pdb_path", skipped: list | None = None) -> tuple[list[Path], Path]:
    """The structure files a ``--pdb_path`` names, and the folder their names are made relative to.

    Accepts a folder (searched recursively, following symbolic links), one structure file, or a text file
    listing paths one a line (relative paths are read from the list file's folder). Fails before any work when
    nothing is there. Paths that cannot be followed (dangling links, link loops, unreadable folders) are
    appended to ``skipped`` as ``{"path", "reason"}``.
    """
    skipped = [] if skipped is None else skipped
    paths = [Path(p) for p in ([pdb_path] if isinstance(pdb_path, (str, os.PathLike)) else pdb_path)]
    files, roots = [], []
    for path in paths:
        if not path.exists():
            raise DatasetBuildError(f"{flag} {path} does not exist; give a folder of PDB/mmCIF files, a file, or a list file")
        if path.is_dir():
            found = walk_folder(path.absolute(), skipped)
            if not found:
                raise DatasetBuildError(
                    f"{flag} {path} holds no structure files (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz)"
                )
            files += found
            roots.append(path.absolute())
        elif is_structure_file(path):
            files.append(path.absolute())
            roots.append(path.absolute().parent)
        elif path.name.lower().endswith(LIST_SUFFIXES):
            listed = []
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    item = Path(line)
                    listed.append(item if item.is_absolute() else path.absolute().parent / item)
            if not listed:
                raise DatasetBuildError(f"{flag} {path} is a list file with no paths in it")
            files += listed
            roots.append(path.absolute().parent)
        else:
            raise DatasetBuildError(
                f"{flag} {path} is neither a folder, a structure file, a list file ({', '.join(LIST_SUFFIXES)}) "
                "nor a built dataset"
            )
    root = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    unique = {}
    for file in files:  # one entry per real file, named by the first path it was found under
        unique.setdefault(os.path.realpath(file), file)
    return list(unique.values()), root


def walk_folder(folder: Path, skipped: list) -> list[Path]:
    """Structure files under ``folder``, sorted, following symbolic links to folders once each: a link back to a
    folder already visited (a loop, or a second link to it) is recorded in ``skipped``, as are dangling links
    and folders that cannot be read."""
    found, visited = [], set()

    def visit(directory: Path) -> None:
        try:
            status = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append({"path": str(directory), "reason": f"unreadable folder ({error.strerror or error})"})
            return
        if (status.st_dev, status.st_ino) in visited:
            skipped.append({"path": str(directory), "reason": "folder already visited (a symbolic link loop or a "
                                                              "second link to the same folder)"})
            return
        visited.add((status.st_dev, status.st_ino))
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    visit(path)
                elif entry.is_file(follow_symlinks=True):
                    if is_structure_file(path):
                        found.append(path)
                elif entry.is_symlink():
                    skipped.append({"path": str(path), "reason": f"dangling symbolic link to {os.readlink(path)}"})
            except OSError as error:
                skipped.append({"path": str(path), "reason": f"cannot be read ({error.strerror or error})"})

    visit(folder)
    return found


@dataclass
class InputListing:
    """One walk of a --pdb_path: its structure files, the folder names are relative to, what was skipped.
    A walk of a 200 000-file mirror on a network file system takes minutes: a process walks it once and
    hands the listing to the fingerprint and the build."""

    files: list
    root: Path
    skipped: list


def list_inputs(pdb_path) -> InputListing:
    if isinstance(pdb_path, (str, os.PathLike)) and is_proteinmpnn_set(pdb_path):
        # ProteinMPNN's training set is defined by its index files (list.csv and the cluster lists).
        return InputListing(index_files(pdb_path), Path(pdb_path), [])
    skipped = []
    files, root = find_structure_files(pdb_path, skipped=skipped)
    return InputListing(files, root, skipped)


def dataset_fingerprint(pdb_path, options: "BuildOptions", listing: InputListing | None = None) -> str:
    """The fingerprint a build of ``pdb_path`` has (or will have), without building: a run checks it on resume."""
    if isinstance(pdb_path, (str, os.PathLike)) and is_built_dataset(pdb_path):
        report = Path(pdb_path) / REPORT_NAME
        return json.loads(report.read_text()).get("fingerprint", str(pdb_path)) if report.is_file() else str(pdb_path)
    return fingerprint((listing or list_inputs(pdb_path)).files, options)


def entry_name(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    lower = rel.lower()
    if lower.endswith(".gz"):
        rel, lower = rel[:-3], lower[:-3]
    return rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel


def fingerprint(files: list[Path], options: BuildOptions) -> str:
    """A hash of every input file's path, size and modification time, the options and the format version."""
    import Bio

    digest = hashlib.sha256()
    chosen = asdict(options)
    if chosen["backbone"] == "full":  # the default, left out so that builds made before the option stay valid
        del chosen["backbone"]
    digest.update(json.dumps({"format": BUILD_FORMAT_VERSION, "biopython": Bio.__version__, "options": chosen},
                             sort_keys=True).encode())
    if options.cluster_file:
        digest.update(Path(options.cluster_file).read_bytes())
    for path in files:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]
