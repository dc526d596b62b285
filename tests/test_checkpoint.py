import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from facedist.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    check_compatible,
    dependencies,
    latest_checkpoint,
    list_checkpoints,
    load_embedding_model,
    load_torch,
    resolve_checkpoint,
    save_embedding_model,
    save_torch,
)
from facedist.config import Config, ModelConfig
from facedist.model import build_model, preprocessing


def _writer(tmp_path, keep=2):
    return CheckpointWriter(tmp_path, keep=keep, rank=0, barrier=lambda: None)


def _save(writer, step):
    return writer.save(
        step,
        {"dependencies": {"model.backbone": "b"}},
        {"train_state.pt": save_torch({"step": torch.tensor(step)})},
        {"head/rank0.pt": save_torch({"rows": torch.arange(3)})},
    )


def test_save_keeps_last_k_and_loads_weights_only(tmp_path):
    writer = _writer(tmp_path)
    for step in (2, 4, 6):
        final = _save(writer, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(tmp_path) == final == resolve_checkpoint(tmp_path)
    assert load_torch(final / "train_state.pt")["step"].item() == 6
    assert json.loads((final / "meta.json").read_text())["step"] == 6
    assert not list(tmp_path.rglob("*.tmp*")) and not list(tmp_path.rglob("*.partial"))


def test_partial_checkpoint_is_ignored(tmp_path):
    _save(_writer(tmp_path), 2)
    partial = tmp_path / "checkpoints" / ".step_00000004.partial"
    partial.mkdir()
    (partial / "train_state.pt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    _save(_writer(tmp_path), 4)  # a later save cleans the stale partial up
    assert not partial.exists() and latest_checkpoint(tmp_path).name == "step_00000004"


@pytest.mark.integration
def test_kill_during_write_leaves_previous_checkpoint_usable(tmp_path):
    _save(_writer(tmp_path), 2)
    script = textwrap.dedent(f"""
        import time, torch
        from facedist.checkpoint import CheckpointWriter
        def slow(tmp):
            torch.save({{"x": torch.zeros(1)}}, tmp)
            time.sleep(60)
        CheckpointWriter({str(tmp_path)!r}, 2, 0, lambda: None).save(4, {{}}, {{"train_state.pt": slow}}, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = tmp_path / "checkpoints" / ".step_00000004.partial"
    for _ in range(300):
        if partial.exists() and any(partial.iterdir()):
            break
        proc.poll()
        assert proc.returncode is None
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert load_torch(latest_checkpoint(tmp_path) / "train_state.pt")["step"].item() == 2


def test_incompatible_resume_is_refused_unless_forced(tmp_path):
    final = _save(_writer(tmp_path), 2)
    with pytest.raises(CheckpointError, match="model.backbone: 'b' -> 'c'.*--force"):
        check_compatible(final, {"model.backbone": "c"}, force=False)
    assert check_compatible(final, {"model.backbone": "c"}, force=True)["step"] == 2
    assert check_compatible(final, {"model.backbone": "b"}, force=False)["step"] == 2


def test_options_off_by_default_are_resume_dependencies_only_when_on():
    """Older checkpoints (no such key in meta.json) still resume into a default config."""
    cfg = Config()
    assert not {"model.neck", "optim.ema_decay"} & dependencies(cfg, 10, "data").keys()
    cfg.model.neck, cfg.optim.ema_decay = "gdc", 0.999
    assert {"model.neck": "gdc", "optim.ema_decay": 0.999}.items() <= dependencies(cfg, 10, "data").items()


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_embedding_model_round_trip(tmp_path):
    cfg = Config(model=ModelConfig(backbone="resnet10t", embedding_dim=16, image_size=32))
    model = build_model(cfg.model).eval()
    save_embedding_model(model, preprocessing(model, 32), cfg.to_dict(), tmp_path / "model.safetensors", step=7)
    loaded, prep, where = load_embedding_model(tmp_path / "model.safetensors")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), model(images))
    assert prep["image_size"] == 32 and where == tmp_path and not loaded.training
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_embedding_model(tmp_path / "junk.safetensors")


def _fsynced_paths(monkeypatch) -> list[str]:
    """Record the path behind every fd passed to os.fsync."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_publishing_renames_are_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    synced = _fsynced_paths(monkeypatch)
    final = _save(_writer(tmp_path), 3)
    assert synced[-1] == str(final.parent)  # the rename of .step_...partial into checkpoints/
    partial = final.parent / f".{final.name}.partial"
    assert str(partial) in synced and str(partial / "head") in synced  # the files' renames inside it
    from facedist.durable import write_bytes_atomic

    synced.clear()
    write_bytes_atomic(tmp_path / "shard.tar", b"x")
    assert synced[-1] == str(tmp_path)


def test_rolling_back_moves_the_newer_branch_aside(tmp_path):
    writer = _writer(tmp_path, keep=3)
    for step in (2, 4, 6, 8):
        _save(writer, step)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 9)))
    from facedist.checkpoint import supersede_log_lines, supersede_newer

    folder = supersede_newer(tmp_path, 4)
    supersede_log_lines(log, 4, folder)
    assert folder.parent == tmp_path / "checkpoints" and folder.name.startswith("superseded-")
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [5, 6, 7, 8]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    for step in (5, 6, 7):  # the new branch: keep-last-k and `auto` see only it
        _save(writer, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000006", "step_00000007"]
    assert latest_checkpoint(tmp_path).name == "step_00000007"
    assert supersede_newer(tmp_path, 7) is None  # nothing newer: nothing moved


def _flip_a_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_has_its_sha256_and_resume_auto_takes_the_newest_that_verifies(tmp_path, capsys):
    from facedist.checkpoint import find_resume

    writer = _writer(tmp_path, keep=3)
    for step in (2, 4, 6):
        _save(writer, step)
    newest = latest_checkpoint(tmp_path)
    recorded = json.loads((newest / "meta.json").read_text())["sha256"]
    assert sorted(recorded) == ["head/rank0.pt", "train_state.pt"]
    assert find_resume("auto", tmp_path, {"model.backbone": "b"}, force=False).step == 6

    _flip_a_byte(newest / "head" / "rank0.pt")  # data, not a header: loads silently without the checksum
    (tmp_path / "checkpoints" / "step_00000004" / "train_state.pt").write_bytes(b"trunc")  # truncated
    capsys.readouterr()
    resumed = find_resume("auto", tmp_path, {"model.backbone": "b"}, force=False)
    assert resumed.step == 2 and resumed.train_state["step"].item() == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"resume: {newest / 'head' / 'rank0.pt'} does not match its sha256 in meta.json (damaged); resuming from "
        f"{tmp_path / 'checkpoints' / 'step_00000002'} instead",
        f"resume: {tmp_path / 'checkpoints' / 'step_00000004' / 'train_state.pt'} does not match its sha256 in "
        f"meta.json (damaged); resuming from {tmp_path / 'checkpoints' / 'step_00000002'} instead",
    ]
    with pytest.raises(CheckpointError, match=r"^resume: .*step_00000006/head/rank0.pt does not match its sha256"):
        find_resume(str(newest), tmp_path, {"model.backbone": "b"}, force=False)  # named: refused, no fallback
    (tmp_path / "checkpoints" / "step_00000002" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: .*rank0.pt does not match"):
        find_resume("auto", tmp_path, {"model.backbone": "b"}, force=False)


def test_a_damaged_file_without_a_checksum_is_named_in_one_line(tmp_path):
    """Checkpoints written before checksums: a truncated file still names itself instead of a torch traceback."""
    final = _save(_writer(tmp_path), 2)
    (final / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"train_state.pt cannot be read \("):
        load_torch(final / "train_state.pt")


def test_force_cannot_make_shapes_fit(tmp_path):
    from safetensors.torch import save_file

    from facedist.checkpoint import load_fitting

    save_file({"weight": torch.zeros(16, 4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError) as refused:
        load_fitting(torch.nn.Linear(4, 8), tmp_path / "w.safetensors")
    message = str(refused.value)
    assert "weight of shape [16, 4], this model's is [8, 4]" in message and "--force cannot make shapes fit" in message
    assert "\n" not in message
    final = _save(_writer(tmp_path / "run"), 2)
    with pytest.raises(CheckpointError, match="--force cannot make shapes fit"):  # the first refusal says so
        check_compatible(final, {"model.backbone": "c"}, force=False)


def test_an_unwritable_output_dir_is_found_at_start(tmp_path):
    from facedist.checkpoint import writable_output

    assert writable_output(tmp_path / "run") is None and (tmp_path / "run" / "checkpoints").is_dir()
    assert not list((tmp_path / "run").rglob(".write-test-*"))
    (tmp_path / "file").write_text("x")
    assert (
        writable_output(tmp_path / "file" / "run")
        == f"output_dir: cannot write to {tmp_path / 'file' / 'run'} (Not a directory)"
    )
    (tmp_path / "ro" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ro" / "checkpoints").chmod(0o555)
    try:
        problem = writable_output(tmp_path / "ro")
    finally:
        (tmp_path / "ro" / "checkpoints").chmod(0o755)
    if os.geteuid() != 0:  # root writes anyway
        assert problem == f"output_dir: cannot write to {tmp_path / 'ro' / 'checkpoints'} (Permission denied)"
