"""Identity folders on disk: how facedist walks `ROOT/<identity>/<image>` and writes down file names.

Walking: symbolic links to folders are followed, and every real folder is entered once, so a link back
to ROOT (or to a folder above it) cannot loop and a second link to the same folder adds nothing. The
shard builder (`facedist-shards build`, one level: identity folders, then their files) and inference's
`--folder` (`iter_identity_images`, every depth) follow this same rule.

File names: a name that is valid UTF-8 is written as it is. A name that is not (Linux allows any bytes)
is written twice: `KEY` holds a display form with each undecodable byte shown as U+FFFD, and
`KEY_bytes_b64` the exact bytes (`os.fsencode`) in base64, so the file can always be found again
(`name_bytes`). JSON, CSV and Parquet outputs stay valid UTF-8 under this rule.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from pathlib import Path


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python decodes them to lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def name_fields(name: str | Path, key: str = "path") -> dict[str, str]:
    """`{key: name}` for a UTF-8 name, else `{key: display form, key + "_bytes_b64": exact bytes}` (module doc)."""
    name = os.fspath(name)
    if is_utf8(name):
        return {key: name}
    raw = os.fsencode(name)
    return {key: raw.decode("utf-8", "replace"), f"{key}_bytes_b64": base64.b64encode(raw).decode("ascii")}


def name_bytes(record: dict, key: str = "path") -> bytes:
    """The exact bytes of a name written by `name_fields` (open the file with `os.fsdecode` of them)."""
    encoded = record.get(f"{key}_bytes_b64")
    return base64.b64decode(encoded) if encoded is not None else os.fsencode(record[key])


def folder_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the folder `path` resolves to (links followed); None when it is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


def iter_identity_images(root: str | Path, extensions: Iterable[str] | None = None) -> list[tuple[Path, str]]:
    """Every file below `root` (with a suffix in `extensions`, lower case, if given), sorted by relative path,
    with its identity: the first folder below `root`, `""` for files directly in it. Links to folders are
    followed; each real folder is entered once (module doc), so link loops end."""
    root = Path(root)
    suffixes = None if extensions is None else {e.lower() for e in extensions}
    entered = {folder_identity(root)}
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(subfolders):
            identity = folder_identity(os.path.join(folder, name))
            if identity is not None and identity not in entered:
                entered.add(identity)
                keep.append(name)
        subfolders[:] = keep
        for name in files:
            path = Path(folder, name)
            if (suffixes is None or path.suffix.lower() in suffixes) and path.is_file():
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return [(p, p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "") for p in found]
