"""Checkpoint files: atomic writes, manifests, torn-checkpoint detection, rotation, averaging, safe loading."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_seq2seq import checkpointing as ckpt


@pytest.fixture(autouse=True)
def fake_checkpoints_average_unloaded(monkeypatch):
    """The fake checkpoints here hold no model, so their averages are not loaded as models before being written;
    tests/test_training.py averages real checkpoints, where that check runs."""
    monkeypatch.setattr(ckpt, "check_loads", lambda staging, source: None)


def write_fake_checkpoint(output_dir, step, weights=None, extra=b"state"):
    """A checkpoint with a safetensors file and an opaque state file, written the real (atomic) way."""
    weights = weights if weights is not None else {"w": torch.full((3, 2), float(step)), "b": torch.arange(4)}

    def write(folder):
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "seq2seq_transformer", "d_model": 2}))
        (folder / "optimizer.pt").write_bytes(extra * 100)

    return ckpt.write_checkpoint(output_dir, step, write)


def test_write_checkpoint_is_complete_and_verifies(tmp_path):
    path = write_fake_checkpoint(tmp_path, 10)
    assert path == tmp_path / "checkpoint-10"
    manifest = json.loads((path / ckpt.MANIFEST_NAME).read_text())
    assert manifest["step"] == 10
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "optimizer.pt"}
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest["files"].values())
    assert ckpt.verify_checkpoint(path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "optimizer.pt").write_bytes(b"x" * 10), "truncated"),
        (lambda p: (p / "optimizer.pt").write_bytes(b"X" * 500), "sha256"),
        (lambda p: (p / "config.json").unlink(), "missing file config.json"),
        (lambda p: (p / ckpt.MANIFEST_NAME).unlink(), "no manifest.json"),
        (lambda p: (p / ckpt.MANIFEST_NAME).write_text("{not json"), "unreadable"),
    ],
)
def test_torn_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage, reason):
    older = write_fake_checkpoint(tmp_path, 5)
    newer = write_fake_checkpoint(tmp_path, 10)
    damage(newer)
    assert reason in ckpt.verify_checkpoint(newer)
    with caplog.at_level(logging.WARNING, logger="modeling_seq2seq.checkpointing"):
        assert ckpt.find_latest_checkpoint(tmp_path) == older
        assert ckpt.resolve_resume_checkpoint("latest", tmp_path) == older
    assert str(newer) in caplog.text and reason in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-10"):
        ckpt.resolve_resume_checkpoint(str(newer), tmp_path)


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume_checkpoint("latest", tmp_path) is None
    assert "starting from scratch" in caplog.text
    assert ckpt.resolve_resume_checkpoint(None, tmp_path) is None


def test_failed_write_leaves_previous_checkpoint_and_names_path(tmp_path):
    previous = write_fake_checkpoint(tmp_path, 5)

    def fail_midway(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.write_checkpoint(tmp_path, 10, fail_midway)
    message = str(error.value)
    assert str(tmp_path / "checkpoint-10") in message and "No space left" in message and str(previous) in message
    assert ckpt.verify_checkpoint(previous) is None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


def test_a_write_stopped_by_ctrl_c_or_sigterm_leaves_no_staging(tmp_path):
    """Ctrl-C or SIGTERM (a BaseException) during a write left the staging folder (~12 MB at tiny) until the next run
    in that folder removed it; only an OSError's cleanup ran."""
    previous = write_fake_checkpoint(tmp_path, 5)

    def stopped_midway(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 10, stopped_midway)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"] and ckpt.verify_checkpoint(previous) is None


def test_sigkill_during_write_leaves_no_checkpoint(tmp_path):
    """A process killed before the manifest leaves only a staging folder, which discovery ignores."""
    write_fake_checkpoint(tmp_path, 5)
    # Load the module by path: importing the package would pull in transformers (slow to start).
    code = f"""
import importlib.util, os, signal
spec = importlib.util.spec_from_file_location("ckpt", {ckpt.__file__!r})
ckpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ckpt)
def write(folder):
    (folder / "model.safetensors").write_bytes(b"half a tensor")
    os.kill(os.getpid(), signal.SIGKILL)
ckpt.write_checkpoint({str(tmp_path)!r}, 10, write)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -9
    assert (tmp_path / ".tmp-checkpoint-10").is_dir() and not (tmp_path / "checkpoint-10").exists()
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert ckpt.remove_stale_staging(tmp_path) == [tmp_path / ".tmp-checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_rewriting_the_same_step_replaces_it_atomically(tmp_path):
    write_fake_checkpoint(tmp_path, 5, extra=b"old")
    path = write_fake_checkpoint(tmp_path, 5, extra=b"new")
    assert (path / "optimizer.pt").read_bytes().startswith(b"new")
    assert ckpt.verify_checkpoint(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


@pytest.mark.parametrize("staging_survives", [True, False])
def test_sigkill_between_the_renames_of_a_replacement_loses_no_checkpoint(tmp_path, staging_survives, caplog):
    """Rewriting a step (after a resume) moves the old folder aside, then renames the new one in. A kill between
    the two renames leaves the step only under temporary names; the next start puts back the newer complete one."""
    write_fake_checkpoint(tmp_path, 5, extra=b"old")
    code = f"""
import importlib.util, os, signal
spec = importlib.util.spec_from_file_location("ckpt", {ckpt.__file__!r})
ckpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ckpt)
rename = os.replace
def replace_then_die(source, target):
    if os.path.basename(source) == ".tmp-checkpoint-5":  # the old folder has just been moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    rename(source, target)
ckpt.os.replace = replace_then_die
ckpt.exchange_paths = lambda first, second: False  # the two renames of systems without an atomic exchange
def write(folder):
    (folder / "optimizer.pt").write_bytes(b"new" * 100)
ckpt.write_checkpoint({str(tmp_path)!r}, 5, write)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -9, result.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == ".tmp-checkpoint-5" and names[1].startswith(".trash-checkpoint-5-") and len(names) == 2, names
    if not staging_survives:
        import shutil
        shutil.rmtree(tmp_path / ".tmp-checkpoint-5")
    with caplog.at_level(logging.WARNING):
        ckpt.restore_interrupted_replacements(tmp_path)
        ckpt.remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-5") is None
    content = (tmp_path / "checkpoint-5" / "optimizer.pt").read_bytes()
    assert content.startswith(b"new" if staging_survives else b"old")
    assert "Restored" in caplog.text and "checkpoint-5" in caplog.text


def test_an_incomplete_trashed_checkpoint_is_not_restored(tmp_path):
    path = write_fake_checkpoint(tmp_path, 5)
    (path / "optimizer.pt").unlink()  # a rotation killed half-way through deleting it
    os.replace(path, tmp_path / ".trash-checkpoint-5-123")
    assert ckpt.restore_interrupted_replacements(tmp_path) == []
    ckpt.remove_stale_staging(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        write_fake_checkpoint(tmp_path, step)
    torn = write_fake_checkpoint(tmp_path, 5)
    (torn / ckpt.MANIFEST_NAME).unlink()
    deleted = ckpt.rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["checkpoint-1", "checkpoint-2"]
    # The torn step-5 folder does not count: the two newest *complete* ones survive.
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert ckpt.rotate_checkpoints(tmp_path, keep_last=None) == []


def test_a_rotation_killed_before_its_delete_is_not_undone(tmp_path, monkeypatch):
    """Rotation renames a folder away, then deletes it: killed in between, the next start deletes it (it used to
    restore it, as a replacement's trash, and the run kept one checkpoint more than its limit for good)."""
    for step in (1, 2, 3):
        write_fake_checkpoint(tmp_path, step)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *args, **kwargs: None)  # killed before the delete
    assert [p.name for p in ckpt.rotate_checkpoints(tmp_path, keep_last=2)] == ["checkpoint-1"]
    monkeypatch.undo()
    assert ckpt.restore_interrupted_replacements(tmp_path) == []
    ckpt.remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_probe_writable_reports_the_directory(tmp_path):
    ckpt.probe_writable(tmp_path / "new" / "nested")
    assert (tmp_path / "new" / "nested").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt.CheckpointError, match=r"a_file/out.*not writable"):
        ckpt.probe_writable(blocker / "out")


def test_probe_writable_reports_a_full_disk(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(ckpt.CheckpointError, match="disk is full"):
        ckpt.probe_writable(tmp_path)
    assert list(tmp_path.iterdir()) == [], "the probe file is removed"


def test_replace_dir_keeps_one_complete_folder_whatever_interrupts_it(tmp_path, monkeypatch):
    """`replace_dir` moves the earlier folder aside and deletes it once the new one is in: a failing rename puts the
    earlier one back; a Ctrl-C that arrives just after the rename (Python runs handlers when the call returns)
    leaves the new one and the interrupt; an earlier file or link in the way is removed, not left as trash."""

    def staged(name, text):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
        return folder

    final = staged("final", "earlier")
    real_replace = os.replace
    monkeypatch.setattr(ckpt, "exchange_paths", lambda first, second: False)  # the two renames (not Linux's swap)

    def failing(source, target):
        if Path(source).name == "new":
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        ckpt.replace_dir(staged("new", "newer"), final)
    assert (final / "model.safetensors").read_text() == "earlier"

    def interrupted_after(source, target):
        real_replace(source, target)
        if Path(source).name == "new":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        ckpt.replace_dir(tmp_path / "new", final)
    monkeypatch.undo()
    assert (final / "model.safetensors").read_text() == "newer"
    for in_the_way in ("file", "link"):
        target = tmp_path / in_the_way
        if in_the_way == "file":
            target.write_text("old")
        else:
            target.symlink_to(final)
        ckpt.replace_dir(staged("new", in_the_way), target)
        assert (target / "model.safetensors").read_text() == in_the_way and not target.is_symlink()
    assert (final / "model.safetensors").read_text() == "newer", "the link's target is not touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "final", "link"]


def test_replace_dir_swaps_the_folders_in_one_step_where_the_system_can(tmp_path, monkeypatch):
    """On Linux the earlier folder and the new one trade places atomically, then the earlier is deleted: `final` is
    never missing (between two renames a kill left a user's earlier output under a hidden name only). Killed before
    the delete, the earlier folder is left under the staging name, for the next start to delete."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2's RENAME_EXCHANGE is Linux's")
    final, staging = tmp_path / "final", tmp_path / ".tmp-final"
    for folder, text in ((final, "earlier"), (staging, "newer")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
    renames = []
    monkeypatch.setattr(os, "replace", lambda *paths: renames.append(paths))
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *args, **kwargs: None)  # killed before the delete
    ckpt.replace_dir(staging, final)
    assert renames == []  # one exchange, no rename that leaves `final` missing
    assert (final / "model.safetensors").read_text() == "newer"
    assert (staging / "model.safetensors").read_text() == "earlier"
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        ckpt.exchange_paths(tmp_path / "nowhere", final)


def test_atomic_write_json_replaces_whole_file(tmp_path):
    target = tmp_path / "eval_results.json"
    ckpt.atomic_write_json(target, {"a": 1})
    ckpt.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]


def test_average_equals_arithmetic_mean(tmp_path, unusual_permissions):
    generator = torch.Generator().manual_seed(0)
    weights = [
        {"w": torch.randn(4, 3, generator=generator), "h": torch.randn(5, generator=generator).half(), "ids": torch.arange(3)}
        for _ in range(3)
    ]
    folders = [write_fake_checkpoint(tmp_path / "run", step, w) for step, w in zip((1, 2, 3), weights)]
    output = ckpt.average_checkpoints(folders, tmp_path / "averaged")
    averaged = load_file(str(output / "model.safetensors"))
    torch.testing.assert_close(averaged["w"], (weights[0]["w"] + weights[1]["w"] + weights[2]["w"]) / 3, rtol=0, atol=1e-6)
    expected_half = ((weights[0]["h"].double() + weights[1]["h"].double() + weights[2]["h"].double()) / 3).half()
    assert averaged["h"].dtype == torch.float16 and torch.equal(averaged["h"], expected_half)
    assert torch.equal(averaged["ids"], torch.arange(3))
    assert (output / "config.json").exists() and not (output / "optimizer.pt").exists()
    assert not (output / ckpt.MANIFEST_NAME).exists()
    assert json.loads((output / "averaged_from.json").read_text())["checkpoints"] == [str(f) for f in folders]
    assert unusual_permissions(output) == []
    # --input_dir/--last selects the newest complete checkpoints, oldest first.
    assert ckpt.last_checkpoints(tmp_path / "run", 2) == folders[1:]


def test_an_average_keeps_its_runs_record_and_not_another_models_results(tmp_path, monkeypatch):
    """averaged_from.json holds absolute paths and what train.py recorded for the last input, so evaluate.py and the
    card find the run's language pair from any working directory, after the checkpoints are gone (a relative path
    was read against the reader's directory: nothing, or another run's checkpoint); a finished run's results, log,
    plot and card are not copied (they describe another model: its test scores reached the average's card)."""
    first = write_fake_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)})
    finished = write_fake_checkpoint(tmp_path / "run", 2, {"w": torch.ones(2)})
    (finished / "eval_results.json").write_text(json.dumps({"source_lang": "fr", "target_lang": "en", "test_bleu": 30.0}))
    for name in ("training_log.jsonl", "training_curves.png", "README.md", "generation_config.json",
                 "finetune_final.json", ".training.lock"):  # the last two: a fine-tuned model's record, a lock
        (finished / name).write_text("{}")
    monkeypatch.chdir(tmp_path)
    ckpt.average_checkpoints([Path("run") / first.name, Path("run") / finished.name], "averaged")
    averaged = tmp_path / "averaged"
    assert sorted(p.name for p in averaged.iterdir()) == ["averaged_from.json", "config.json", "generation_config.json",
                                                          "model.safetensors"]
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "elsewhere" / "run" / finished.name).mkdir(parents=True)  # another run's checkpoint of that name
    (tmp_path / "elsewhere" / "run" / finished.name / ckpt.TRAINER_STATE_NAME).write_text(
        json.dumps({"config": {"source_lang": "de", "target_lang": "it"}}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    record, source = ckpt.recorded_run(averaged)
    assert (record["source_lang"], record["target_lang"], source) == ("fr", "en", str(averaged / "averaged_from.json"))
    assert json.loads((averaged / "averaged_from.json").read_text())["checkpoints"] == [str(first), str(finished)]


def test_average_rejects_mismatched_or_torn_inputs(tmp_path):
    a = write_fake_checkpoint(tmp_path / "a", 1, {"w": torch.zeros(2)})
    b = write_fake_checkpoint(tmp_path / "b", 1, {"w": torch.zeros(3)})
    c = write_fake_checkpoint(tmp_path / "c", 1, {"v": torch.zeros(2)})
    with pytest.raises(ValueError, match=re.escape(f"Tensor w has different shapes: (2,) in {a}, (3,) in {b}.")):
        ckpt.average_checkpoints([a, b], tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(f"{c} holds different tensors than {a}")):
        ckpt.average_checkpoints([a, c], tmp_path / "out")
    (b / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-1"):
        ckpt.average_checkpoints([a, b], tmp_path / "out")
    loose = tmp_path / "loose"  # a saved model folder without a manifest, whose weights file is cut short
    loose.mkdir()
    shutil.copy2(a / "config.json", loose / "config.json")
    (loose / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{loose / 'model.safetensors'}: cannot read the weights")):
        ckpt.average_checkpoints([a, loose], tmp_path / "out")
    # Same shapes, another model (pre-LN against post-LN), or one checkpoint given twice: refused, naming them.
    d = write_fake_checkpoint(tmp_path / "d", 2, {"w": torch.zeros(2)})
    (d / ckpt.MANIFEST_NAME).unlink()
    config = json.loads((a / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "layer_norm_position": "pre", "dropout": 0.3}))
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{str(d)!r} and {str(a)!r} describe different models in "
                                                             f"config.json (layer_norm_position: 'pre' against")):
        ckpt.average_checkpoints([a, d], tmp_path / "out")
    with pytest.raises(ckpt.CheckpointError, match="is given more than once"):
        ckpt.average_checkpoints([a, tmp_path / "a" / ".." / "a" / a.name], tmp_path / "out")
    # A bfloat16 copy beside a float32 one gave a bfloat16 or a float32 mean, by their order; a NaN gave a model
    # every loader refuses. Both are named now.
    half = write_fake_checkpoint(tmp_path / "half", 1, {"w": torch.zeros(2, dtype=torch.bfloat16)})
    for first, second in (((a, torch.float32), (half, torch.bfloat16)), ((half, torch.bfloat16), (a, torch.float32))):
        with pytest.raises(ValueError, match=re.escape(f"Tensor w is {first[1]} in {first[0]} but {second[1]} in "
                                                       f"{second[0]}: convert the checkpoints to one dtype first.")):
            ckpt.average_checkpoints([first[0], second[0]], tmp_path / "out")
    broken = write_fake_checkpoint(tmp_path / "broken", 1, {"w": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match=re.escape(f"Tensor w of {broken} holds NaN or infinity: that checkpoint is damaged")):
        ckpt.average_checkpoints([a, broken], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def load_script(name):
    """Import a file of scripts/ as a module (the scripts are thin; calling main() in-process is fast)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_average_checkpoints_script(tmp_path, capsys):
    folders = [write_fake_checkpoint(tmp_path / "run", step, {"w": torch.full((2,), float(step))}) for step in (2, 4, 6)]
    script = load_script("average_checkpoints")
    assert script.main(["--input_dir", str(tmp_path / "run"), "--last", "2", "--output", str(tmp_path / "avg")]) == 0
    assert torch.equal(load_file(str(tmp_path / "avg" / "model.safetensors"))["w"], torch.full((2,), 5.0))
    assert "checkpoint-4" in capsys.readouterr().out
    assert script.main(["--checkpoints", str(folders[0]), str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 1
    assert f"'{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    assert script.main(["--input_dir", str(tmp_path / "nope"), "--output", str(tmp_path / "y")]) == 1
    assert f"--input_dir '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    assert script.main(["--input_dir", str(tmp_path / "run"), "--last", "5", "--output", str(tmp_path / "all")]) == 0
    assert "Asked for the last 5 checkpoints;" in capsys.readouterr().out
    assert torch.equal(load_file(str(tmp_path / "all" / "model.safetensors"))["w"], torch.full((2,), 4.0))
    # An --output that cannot be made, and weights that cannot be read: one line naming the path, no traceback.
    (tmp_path / "file").write_text("")
    assert script.main(["--input_dir", str(tmp_path / "run"), "--output", str(tmp_path / "file" / "avg")]) == 1
    assert f"error: Could not write averaged model '{tmp_path / 'file' / 'avg'}': " in capsys.readouterr().err
    unreadable = folders[0] / "model.safetensors"
    unreadable.unlink()
    unreadable.mkdir()  # a name that opens as a folder: an OSError, as an unreadable file gives one
    (folders[0] / ckpt.MANIFEST_NAME).unlink()
    assert script.main(["--checkpoints", str(folders[0]), str(folders[1]), "--output", str(tmp_path / "z")]) == 1
    assert f"error: {unreadable}: cannot read the weights" in capsys.readouterr().err


def test_averaging_never_replaces_its_inputs_or_other_files_unasked(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    folders = [write_fake_checkpoint(run, step, {"w": torch.full((2,), float(step))}) for step in (2, 4)]
    (run / "training_log.jsonl").write_text("{}\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    script = load_script("average_checkpoints")
    for output, overwrite, message in [
        (run, ["--overwrite"], "holds the input"),  # the training folder itself, even when asked to overwrite
        (folders[1], ["--overwrite"], "is the input"),  # one of the averaged checkpoints
        (notes, [], "is not empty and not an earlier output of this command (one with averaged_from.json and no "
                    "sub-folders; it holds keep.txt)"),  # a folder of the user's
        (".", ["--overwrite"], "is the working directory"),  # run from inside notes/
        (tmp_path, ["--overwrite"], "holds the input"),
    ]:
        monkeypatch.chdir(notes if output == "." else tmp_path)
        assert script.main(["--input_dir", str(run), "--last", "2", "--output", str(output), *overwrite]) == 1
        assert message in capsys.readouterr().err
    for arguments, message in [(["--last", "0"], "--last must be at least 1"),
                               (["--output", str(notes / "keep.txt")], "is a file, not a folder")]:
        with pytest.raises(SystemExit):
            script.main(["--input_dir", str(run), "--output", str(tmp_path / "avg"), *arguments])
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # Even asked to, it does not replace a folder of other files (a mistyped --output would lose them) ...
    assert script.main(["--input_dir", str(run), "--last", "2", "--output", str(notes), "--overwrite"]) == 1
    assert f"--output {str(notes)!r} is not empty and not an earlier output of this command" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # ... nor a training run's folder (with a config.json, as a saved model), nor a checkpoint inside an input ...
    shutil.copy2(folders[1] / "config.json", run / "config.json")
    (tmp_path / "second").mkdir()
    for step in (2, 4):
        shutil.copytree(folders[step // 2 - 1], tmp_path / "second" / f"checkpoint-{step}")
    assert script.main(["--input_dir", str(tmp_path / "second"), "--last", "2", "--output", str(run), "--overwrite"]) == 1
    assert (f"--output {str(run)!r} is not empty and not an earlier output of this command (one with "
            "averaged_from.json and no sub-folders; it holds checkpoint-2/, checkpoint-4/, config.json, "
            "training_log.jsonl)") in capsys.readouterr().err
    assert script.main(["--checkpoints", str(folders[0]), str(folders[1]), "--output", str(folders[1] / "avg")]) == 1
    assert f"lies inside the checkpoint {str(folders[1])!r}, which rotating checkpoints deletes" in \
        capsys.readouterr().err
    assert (run / "checkpoint-4").is_dir()
    # ... but it does replace an earlier output, when asked to, or a folder a file browser left its files in.
    average = tmp_path / "avg"
    assert script.main(["--input_dir", str(run), "--last", "1", "--output", str(average)]) == 0
    assert script.main(["--input_dir", str(run), "--last", "2", "--output", str(average)]) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert script.main(["--input_dir", str(run), "--last", "2", "--output", str(average), "--overwrite"]) == 0
    assert torch.equal(load_file(str(average / "model.safetensors"))["w"], torch.full((2,), 3.0))
    browsed = tmp_path / "browsed"
    browsed.mkdir()
    (browsed / ".DS_Store").write_bytes(b"\0")
    assert script.main(["--input_dir", str(run), "--last", "2", "--output", str(browsed), "--overwrite"]) == 0


def test_state_files_load_without_unpickling_objects(tmp_path):
    good = tmp_path / "optimizer.pt"
    ckpt.save_torch_state({"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.98)}]}, good)
    assert ckpt.load_torch_state(good)["param_groups"][0]["betas"] == (0.9, 0.98)

    evil = tmp_path / "evil.pt"
    torch.save({"payload": subprocess.Popen}, evil)  # an arbitrary class: must not be unpickled
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True") as refused:
        ckpt.load_torch_state(evil)
    # The reason, naming the file and the class, without torch's advice to load it unsafely or allow-list the class.
    message = str(refused.value)
    assert str(evil) in message and "Unsupported global" in message and "Popen" in message
    assert "weights_only=False" not in message and "safe_globals" not in message

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a torch file" * 8)
    with pytest.raises(ckpt.CheckpointError, match=f"{damaged}: not a state file this package wrote, or damaged"):
        ckpt.load_torch_state(damaged)


def test_a_folder_where_files_cannot_be_locked_is_used_without_a_lock(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on NFS without a lock daemon (ENOSYS, EOPNOTSUPP elsewhere): that is no other run."""
    import errno

    fcntl = pytest.importorskip("fcntl")

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ckpt.lock_output_dir(tmp_path)
    assert "Cannot lock" in caplog.text and "nothing stops a second run" in caplog.text
    ckpt.unlock_output_dir(tmp_path)


def test_a_kill_while_setting_checkpoints_aside_leaves_the_newest_for_latest(tmp_path, monkeypatch):
    """--overwrite_output_dir renames an earlier run's checkpoints one by one; stopped after the first rename, the
    folder must still resume that run from its newest checkpoint, not from an older one."""
    paths = [write_fake_checkpoint(tmp_path, step) for step in (4, 8, 12)]
    renames = []
    real_replace = os.replace

    def stop_after_one(source, target):
        if renames:
            raise KeyboardInterrupt
        renames.append(source)
        real_replace(source, target)

    monkeypatch.setattr(ckpt.os, "replace", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        ckpt.set_aside([paths[2], paths[0], paths[1]])
    monkeypatch.undo()
    assert renames == [paths[0]]
    assert ckpt.find_latest_checkpoint(tmp_path) == paths[2]
    assert ckpt.remove_stale_staging(tmp_path) == [tmp_path / f"{ckpt.REPLACED_PREFIX}checkpoint-4-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8"]


def test_a_sharded_folder_is_read_by_its_index(tmp_path):
    """The shards the index lists, each of which must be there (a missing one was reported as other tensors), and an
    index that is not JSON is named (it was a bare "Expecting value")."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))
    index = folder / ckpt.SHARD_INDEX_NAME
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    assert sorted(ckpt.load_safetensors_folder(folder)) == ["a", "b"]
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{index} lists the shard model-00002-of-00002.safetensors, "
                                                             f"which is missing from {folder}")):
        ckpt.load_safetensors_folder(folder)
    for content, message in [('{"weight_map": ', "not readable as a JSON index of weight shards"),
                             ("[]", "expected a JSON object (a JSON index of weight shards), got list"),
                             ('{"weight_map": [1]}', "'weight_map' must be an object mapping tensor names to shard files")]:
        index.write_text(content)
        with pytest.raises(ValueError, match=re.escape(f"{index}: {message}")):
            ckpt.weight_files(folder, ValueError)


def test_what_a_killed_writer_left_beside_its_output_goes_at_the_next_start(tmp_path):
    """The staging of a process that no longer runs (SIGKILL leaves it) is deleted when the output is next written;
    a running process's is not touched."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(finished.stdout)
    left = [tmp_path / f".tmp-avg-{gone}", tmp_path / f".tmp-out.txt-{gone}-abcd1234"]
    left[0].mkdir()
    (left[0] / "model.safetensors").write_text("x")
    left[1].write_text("partial")
    running = tmp_path / f".tmp-avg-{os.getpid()}"
    running.mkdir()
    other = tmp_path / f".tmp-average-{gone}"  # another output's
    other.mkdir()
    assert ckpt.remove_abandoned_staging(tmp_path / "avg") == [left[0]]
    ckpt.atomic_write_text(tmp_path / "out.txt", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "out.txt"])


def test_staging_of_a_process_we_may_not_signal_is_kept(tmp_path, monkeypatch):
    """A pid that answers os.kill(pid, 0) with PermissionError is another user's live process (a shared output
    folder): its staging is not ours to delete. Only a pid no process has (ProcessLookupError) counts as gone."""
    staging = tmp_path / ".tmp-avg-4242"
    staging.mkdir()

    def kill(pid, signal_number):
        assert (pid, signal_number) == (4242, 0)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ckpt.os, "kill", kill)
    assert ckpt.remove_abandoned_staging(tmp_path / "avg") == []
    assert staging.is_dir()


def test_sigterm_stops_a_script_with_its_clean_up(tmp_path, capsys, monkeypatch):
    """SIGTERM used to end the tools where they stood, leaving their staging folder; it stops them as Ctrl-C does."""
    folders = [write_fake_checkpoint(tmp_path / "run", step, {"w": torch.full((2,), float(step))}) for step in (2, 4)]
    script = load_script("average_checkpoints")
    monkeypatch.setattr(ckpt, "seal_folder", lambda folder: os.kill(os.getpid(), signal.SIGTERM))
    assert script.main(["--checkpoints", *map(str, folders), "--output", str(tmp_path / "avg")]) == 143
    assert "Terminated: no output is left half-written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("name, argv, seam", [
    ("visualize", ["positions", "--out", "OUT"], "run"),
    ("train_tokenizer", ["--vocab_size", "300", "--output_dir", "OUT"], "train_tokenizer_from_data"),
    ("benchmark", ["--quick", "--no_ctranslate2"], "run_benchmark"),
])
def test_every_script_stops_on_ctrl_c_with_one_line(name, argv, seam, tmp_path, capsys, monkeypatch):
    """visualize.py, train_tokenizer.py and benchmark.py ended a Ctrl-C with a KeyboardInterrupt traceback."""
    script = load_script(name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, seam, interrupted)
    assert script.main([str(tmp_path / "out") if a == "OUT" else a for a in argv]) == 130
    assert capsys.readouterr().err.startswith("Interrupted: ")


def test_atomic_write_never_touches_the_file_a_reader_has_open(tmp_path, monkeypatch):
    """A reader that opened the old file reads it whole after the write (a new file renamed over it, not the old one
    truncated and rewritten), and a write that fails part-way leaves the old content."""
    target = tmp_path / "eval_results.json"
    ckpt.atomic_write_json(target, {"old": 1})
    old_inode = target.stat().st_ino
    with open(target, "rb") as reader:
        ckpt.atomic_write_json(target, {"new": 2})
        assert json.loads(reader.read()) == {"old": 1}
    assert json.loads(target.read_text()) == {"new": 2} and target.stat().st_ino != old_inode

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.atomic_write_json(target, {"newer": 3})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"new": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the fsynced files through /proc/self/fd")
def test_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Durability: atomic_write_bytes fsyncs its new content before the rename, and a checkpoint's every file is
    fsynced before the staging folder takes the checkpoint's name (otherwise a power cut can leave a complete-looking
    name over empty or partial files)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target, *args, **kwargs):
        events.append(("replace", str(Path(source).resolve()), str(Path(target).resolve())))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = (tmp_path / "file.json").resolve()
    ckpt.atomic_write_bytes(target, b"{}")
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target)]
    assert len(renames) == 1
    source = events[renames[0]][1]
    assert ("fsync", source) in events[: renames[0]], events

    events.clear()
    folder = write_fake_checkpoint(tmp_path / "run", 7).resolve()
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(folder)]
    assert len(renames) == 1, events
    staging = Path(events[renames[0]][1])
    synced = {e[1] for e in events[: renames[0]] if e[0] == "fsync"}
    for path in folder.rglob("*"):
        if path.is_file():
            assert str(staging / path.relative_to(folder)) in synced, (path.name, events)


def test_average_checkpoints_script_averages_the_last_five_by_default(tmp_path, capsys):
    for step in range(1, 8):
        write_fake_checkpoint(tmp_path / "run", step, {"w": torch.full((2,), float(step))})
    script = load_script("average_checkpoints")
    assert script.main(["--input_dir", str(tmp_path / "run"), "--output", str(tmp_path / "avg")]) == 0
    assert torch.equal(load_file(str(tmp_path / "avg" / "model.safetensors"))["w"], torch.full((2,), 5.0))  # 3..7
    assert json.loads((tmp_path / "avg" / "averaged_from.json").read_text())["checkpoints"] == [
        str(tmp_path / "run" / f"checkpoint-{step}") for step in range(3, 8)]


def test_integer_tensors_that_differ_are_refused_not_taken_from_one_checkpoint(tmp_path):
    """A non-float tensor (ids, a step counter) has no mean: equal in every input it is copied, else the average is
    refused, naming it; never silently the first's or the last's."""
    a = write_fake_checkpoint(tmp_path / "a", 1, {"w": torch.zeros(2), "ids": torch.arange(3)})
    b = write_fake_checkpoint(tmp_path / "b", 2, {"w": torch.ones(2), "ids": torch.arange(3) + 1})
    for order in ([a, b], [b, a]):
        with pytest.raises(ValueError, match="Non-float tensor ids differs across checkpoints"):
            ckpt.average_state_dicts([ckpt.load_safetensors_folder(folder) for folder in order])
        with pytest.raises(ValueError, match="Non-float tensor ids differs across checkpoints"):
            ckpt.average_checkpoints(order, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rotation_first_deletes_superseded_checkpoints_then_keeps_the_newest(tmp_path):
    """An earlier run's last checkpoint, off the saving schedule (step 6 of save_steps=4), that a continued run has passed
    is deleted before the newest `keep_last` are counted, so the kept ones are those a run never interrupted keeps."""
    for step in (4, 6, 8, 12):
        write_fake_checkpoint(tmp_path, step)
    deleted = ckpt.rotate_checkpoints(tmp_path, keep_last=3, superseded=lambda step: step == 6)
    assert [p.name for p in deleted] == ["checkpoint-6"]
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
