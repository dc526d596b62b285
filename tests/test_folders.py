"""Identity-folder walking (links followed, loops entered once) and the rule for names that are not UTF-8."""

from __future__ import annotations

import json
import os

from facedist.data.folders import iter_identity_images, name_bytes, name_fields


def _touch(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")


def test_links_are_followed_and_every_real_folder_is_entered_once(tmp_path):
    root, real = tmp_path / "root", tmp_path / "real"
    _touch(real / "1.jpg")
    _touch(real / "deep" / "2.png")
    _touch(root / "bob" / "3.jpg")
    _touch(root / "top.jpg")
    _touch(root / "bob" / "notes.txt")
    os.symlink(real, root / "alice", target_is_directory=True)
    os.symlink(real, root / "alice_again", target_is_directory=True)  # the same folder a second time
    os.symlink(root, root / "bob" / "loop", target_is_directory=True)  # back to the root
    os.symlink(tmp_path / "gone", root / "dangling")
    found = iter_identity_images(root, (".jpg", ".PNG"))
    assert [(p.relative_to(root).as_posix(), identity) for p, identity in found] == [
        ("alice/1.jpg", "alice"),
        ("alice/deep/2.png", "alice"),
        ("bob/3.jpg", "bob"),
        ("top.jpg", ""),
    ]
    assert len(iter_identity_images(root)) == 5  # no suffix filter: notes.txt too, the dangling link never


def test_names_that_are_not_utf8_stay_recoverable_byte_for_byte():
    assert name_fields("alice/1.jpg") == {"path": "alice/1.jpg"}
    raw = b"caf\xe9/\xff.jpg"
    fields = name_fields(os.fsdecode(raw), "source")
    assert fields["source"] == "caf\ufffd/\ufffd.jpg"
    assert name_bytes(json.loads(json.dumps(fields)), "source") == raw
    assert name_bytes({"path": "山田/1.jpg"}) == "山田/1.jpg".encode()
