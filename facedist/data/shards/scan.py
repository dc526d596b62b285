"""Reading the source: identity folders (or an MXNet RecordIO dataset) listed as candidate image files.

Input: `SRC/<identity>/<image>`; only files directly inside an identity folder belong to it. Everything
that cannot become a sample is recorded with its reason for `report.json` (broken symlink, special file,
nested folder, file outside any identity folder, hidden folder, a name that is not UTF-8...). Links are
followed and each real folder is read once (facedist.data.folders: a link back to SRC or a second link
to an identity already read is skipped and reported). Names that are not UTF-8 are skipped, since the
shards store names as UTF-8, and reported under facedist.data.folders' rule, which keeps their exact
bytes recoverable (`path_bytes_b64`).

RecordIO: SRC may also be an indexed RecordIO dataset (a folder with train.rec + train.idx, or the .rec
file; facedist.data.recordio reads it). Identities are the class ids, zero-padded; report paths are
`train.rec#KEY`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from facedist.data.folders import folder_identity, is_utf8, name_fields
from facedist.data.shards.layout import ShardError


@dataclass
class SourceScan:
    """Candidate image files per identity (relative POSIX paths, sorted) and what was skipped while listing."""

    identities: dict[str, list[str]]
    skipped_files: list[dict] = field(default_factory=list)  # {"path", "reason"}
    skipped_identities: list[dict] = field(default_factory=list)  # {"identity", "reason"}
    records: dict[str, tuple[str, int, int]] | None = None  # RecordIO: relpath -> (rec file, offset, key)

    def locate(self, src: Path, relpath: str) -> str | tuple[str, int, int]:
        """What `read_source` reads: the file's path, or a RecordIO record's (rec, offset, key)."""
        return self.records[relpath] if self.records is not None else str(src / relpath)


def read_source(location: str | tuple[str, int, int]) -> bytes:
    """The encoded bytes of a source image: a file, or a RecordIO record."""
    if isinstance(location, tuple):
        from facedist.data.recordio import read_image

        return read_image(*location)
    return Path(location).read_bytes()


def scan_recordio_source(src: Path) -> SourceScan:
    """A RecordIO dataset as a SourceScan (facedist.data.recordio)."""
    from facedist.data.recordio import scan_recordio

    scan = scan_recordio(src)
    records = {
        scan.relpath(key): (str(scan.rec), offset, key)
        for entries in scan.identities.values()
        for key, offset in entries
    }
    identities = {name: [scan.relpath(key) for key, _ in entries] for name, entries in scan.identities.items()}
    return SourceScan(identities, scan.skipped_files, scan.skipped_identities, records)


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'broken symlink' or 'special file' (symlinks followed)."""
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:
        return "broken symlink" if entry.is_symlink() else "unreadable entry"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special file"


def _identity_files(folder: os.DirEntry, scan: SourceScan) -> list[str]:
    """The regular files directly in one identity folder; everything else goes to the scan's report."""
    files = []
    for child in sorted(os.scandir(folder.path), key=lambda e: e.name):
        relpath = f"{folder.name}/{child.name}"
        child_kind = _entry_kind(child)
        if not is_utf8(child.name):
            scan.skipped_files.append({**name_fields(relpath), "reason": "file name is not valid UTF-8"})
        elif child_kind == "dir":
            scan.skipped_files.append({"path": relpath + "/", "reason": "nested folder, not merged into the identity"})
        elif child_kind != "file":
            scan.skipped_files.append({"path": relpath, "reason": child_kind})
        else:
            files.append(relpath)
    return files


def scan_source(src: Path) -> SourceScan:
    """List identity folders and their files; report everything that cannot be a sample."""
    if not src.is_dir():
        raise ShardError(f"SRC {src} does not exist or is not a folder")
    scan = SourceScan(identities={})
    entered = {folder_identity(src): "SRC itself (a symbolic-link loop)"}
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        kind = _entry_kind(entry)
        if kind != "dir":
            reason = "not inside an identity folder" if kind == "file" else kind
            scan.skipped_files.append({**name_fields(entry.name), "reason": reason})
            continue
        skip = None
        if entry.name.startswith("."):
            skip = "hidden folder ignored"
        elif not is_utf8(entry.name):
            skip = "folder name is not valid UTF-8"
        elif folder_identity(entry.path) in entered:  # a second link to a folder already read
            skip = f"same folder as {entered[folder_identity(entry.path)]}"
        if skip:
            scan.skipped_identities.append({**name_fields(entry.name, "identity"), "reason": skip})
            continue
        entered[folder_identity(entry.path)] = f"identity {entry.name!r}"
        files = _identity_files(entry, scan)
        if files:
            scan.identities[entry.name] = files
        else:
            scan.skipped_identities.append({"identity": entry.name, "reason": "no files in the identity folder"})
    if not scan.identities:
        raise ShardError(f"SRC {src} has no identity folders with files (expected SRC/<identity>/<image>)")
    return scan
