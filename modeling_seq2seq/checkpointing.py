"""Crash-safe training checkpoints: atomic writes, a manifest written last, resume discovery, averaging.

A checkpoint is a folder `checkpoint-<step>` inside the output directory. It is first written as
`.tmp-checkpoint-<step>-<pid>`, every file is fsynced, then `manifest.json` (file names, sizes, sha256) is
written and fsynced, and only then is the folder renamed into place. A process killed at any moment
therefore leaves either a complete, verifiable checkpoint or a temporary folder that resume ignores.
Older checkpoints are removed only after a newer one is complete.

Training state other than the weights is stored without pickled Python objects: JSON for counters and
RNG states of `random`/`numpy`, and `torch.save` files of tensors and plain containers, read back with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TRASHED_CHECKPOINT_RE = re.compile(r"^\.trash-(checkpoint-\d+)-\d+$")  # replace_dir's trash names
# What a killed run of ours can leave in its output folder: checkpoint and final-model staging folders, trashed
# checkpoints (above), and `mkstemp`'s files (atomic writes, the write probe: a name, the writer's process id and 8
# random characters; removed once that process is gone; the probe's name had no id before the nineteenth session).
REPLACED_PREFIX = ".replaced-"  # an earlier run's checkpoint set aside for deletion (never restored)
_STALE_DIR_RE = re.compile(r"^\.tmp-(checkpoint-\d+|final-model|tokenizer)$|^\.trash-tokenizer-\d+$"
                           r"|^\.replaced-checkpoint-\d+-\d+$")
_STALE_FILE_RE = re.compile(r"^\.tmp-.+-(\d+)-[a-z0-9_]{8}$|^\.tmp-write-probe-[a-z0-9_]{8}$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or verified; the message names the path."""


# ----------------------------------------------------------------------------------------------------------
# Low-level durable file operations
# ----------------------------------------------------------------------------------------------------------


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry table, so that renames and creations inside it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def seal_folder(folder: str | os.PathLike) -> None:
    """Make a finished staging folder ready to be renamed into place, in one walk: every file fsynced, and the
    permissions a plain `open` or `mkdir` would give to it and everything in it (safetensors and
    `tempfile.mkdtemp`/`mkstemp` make private 0600/0700 files and folders, which the rest of a group or a serving
    account could not read)."""
    umask = _current_umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        directory = path.is_dir()
        os.chmod(path, (0o777 if directory else 0o666) & ~umask)
        if not directory:
            fsync_file(path)


def staging_beside(final: str | os.PathLike) -> Path:
    """A fresh empty folder beside `final` (the same file system, so that it renames into place), named after it and
    this process: `remove_abandoned_staging` deletes it at a later start if a kill left it behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(final)
    staging = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _writer_is_gone(entry: Path) -> bool:
    """Whether the process named in a temporary file's name (`_STALE_FILE_RE`) no longer writes it: it is gone, or
    a process with its id started after the file was last written (ids come round again: a restarted container's
    run often has its predecessor's). Files without an id, and folders, count as gone."""
    match = _STALE_FILE_RE.match(entry.name)
    if match is None or match.group(1) is None:
        return True
    pid = int(match.group(1))
    if _process_is_gone(pid):
        return True
    try:  # Linux: field 22 of /proc/<pid>/stat is the start in clock ticks after boot (`btime` in /proc/stat)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return started > entry.stat().st_mtime + 2  # btime has whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OverflowError, OSError):  # another user's process (PermissionError); a number no process has
        return False
    return False


def remove_abandoned_staging(final: str | os.PathLike) -> list[Path]:
    """Delete what a killed process of ours left beside `final` while writing it (`staging_beside`'s folders,
    `atomic_write_bytes`'s files): names after `final` and a process that no longer runs."""
    final = Path(final)
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX + final.name)}-(\d+)(-[a-z0-9_]{{8}})?$")

    def abandoned(entry: Path) -> bool:
        match = pattern.match(entry.name)
        return match is not None and not entry.is_symlink() and _process_is_gone(int(match.group(1)))

    return remove_entries(final.parent, abandoned)


def remove_entries(directory: Path, doomed: Callable[[Path], bool]) -> list[Path]:
    """Delete the folders and files of `directory` that are `doomed`; returns them."""
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if doomed(entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a partial one."""
    path = Path(path)
    remove_abandoned_staging(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-{os.getpid()}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def move_files_into(staging: str | os.PathLike, directory: str | os.PathLike, last: Iterable[str] = ()) -> list[str]:
    """Move the files of `staging` into `directory`, each fsynced and then renamed over its namesake, the names in
    `last` after the others (a reader that sees the new config sees the new files it describes). A crash leaves
    every file either old or new, never torn. Returns the paths written."""
    staging, directory = Path(staging), Path(directory)
    present = {p.name for p in staging.iterdir() if p.is_file()}
    names = sorted(present - set(last)) + [name for name in last if name in present]
    written = []
    for name in names:
        fsync_file(staging / name)
        os.replace(staging / name, directory / name)
        written.append(str(directory / name))
    fsync_dir(directory)
    return written


def read_json_object(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in the file at `path`; else `error`, naming the file and `what` it should hold."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path}: not readable as {what} ({problem}).") from problem
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object ({what}), got {type(value).__name__}.")
    return value


def atomic_write_json(path: str | os.PathLike, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def probe_writable(directory: str | os.PathLike, probe_bytes: int = 1 << 20) -> None:
    """Create `directory` if needed and prove that a file can be written, fsynced and removed there.

    Raises `CheckpointError` naming the directory when it cannot (read-only, not a directory, disk full),
    so that a long training run fails before its first step rather than at its first save.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}write-probe-{os.getpid()}-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"\0" * probe_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise CheckpointError(f"Output directory {str(directory)!r} is not writable: {reason} ({error}).") from error


AVERAGED_FROM_NAME = "averaged_from.json"  # what `average_checkpoints` writes into its output beside the model
LOCK_NAME = ".training.lock"
_held_locks: dict[str, object] = {}  # resolved folder -> the open lock file


def lock_output_dir(directory: str | os.PathLike) -> None:
    """Take an exclusive lock on `directory` until `unlock_output_dir` or the end of the process (the system
    releases it then, also when the process is killed), or raise `CheckpointError` naming the process that holds
    it. Two runs writing one folder would interleave their logs and checkpoints, and each would delete the other's
    unfinished checkpoint as a stale one."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    key = str(Path(directory).resolve())
    unlock_output_dir(key)  # an earlier run in this process has ended (runs in one process follow each other)
    path = Path(directory) / LOCK_NAME
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks here (NFS, FUSE...)
                handle.close()
                logger.warning("Cannot lock %s (%s): nothing stops a second run from writing there too.",
                               directory, error.strerror)
                return
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise CheckpointError(
                f"Another training run (process {holder}) is writing to {str(directory)!r}. Wait for it to end, stop "
                "it, or choose another --output_dir."
            ) from None
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # its holder deleted that file as it let go: lock the one there now
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle


def unlock_output_dir(directory: str | os.PathLike) -> None:
    """Let go of `lock_output_dir`'s lock, deleting its file first (a killed run's stays, and is taken over)."""
    handle = _held_locks.pop(str(Path(directory).resolve()), None)
    if handle is not None:
        with contextlib.suppress(OSError):  # the folder turned read-only: the next run takes it over, as a killed run's
            Path(handle.name).unlink(missing_ok=True)
        handle.close()


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    return sorted(
        str(path.relative_to(folder)).replace(os.sep, "/")
        for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME
    )


def write_manifest(folder: str | os.PathLike, step: int) -> None:
    """Record every file of `folder` with its size and sha256; written and fsynced last."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)} for name in _files_under(folder)}
    manifest_path = folder / MANIFEST_NAME
    with open(manifest_path, "w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": files}, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def is_training_state(name: str) -> bool:
    """A checkpoint's files that only resuming reads: optimizer, scheduler, RNG and trainer state (model weights are
    safetensors, never `.pt`)."""
    return name.endswith(".pt") or name == TRAINER_STATE_NAME or name.startswith("rng_state_")


def verify_checkpoint(folder: str | os.PathLike, check_hashes: bool = True, hash_training_state: bool = True) -> str | None:
    """Return None when `folder` is a complete checkpoint, otherwise the reason it is not. Every file the manifest
    lists must be there with its size; with `check_hashes`, also with its sha256, except, without
    `hash_training_state`, the files only resuming reads (loading a model skips the optimizer state: 2x the weights)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        return "not a directory"
    if not manifest_path.is_file():
        if not any(folder.iterdir()):
            return "an empty directory"
        # transformers' Trainer writes checkpoint-N in place, the model (and training_args.bin) first: killed before
        # the optimizer, it looks like a saved model.
        torn_trainer_write = _CHECKPOINT_RE.match(folder.name) and (folder / "training_args.bin").is_file()
        if (folder / "config.json").is_file() and not torn_trainer_write and not any(map(is_training_state, os.listdir(folder))):
            return (f"a saved model, not a training checkpoint (no {MANIFEST_NAME}, no optimizer state); to train on "
                    "from its weights, fine-tune it: scripts/finetune_trainer.py --model FOLDER")
        return f"no {MANIFEST_NAME} (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            return f"{MANIFEST_NAME} lists no files"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_NAME}: {error}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, the manifest says {expected.get('size')} (truncated?)"
        hashed = check_hashes and (hash_training_state or not is_training_state(name))
        if hashed and sha256_of(path) != expected.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


# ----------------------------------------------------------------------------------------------------------
# Writing, listing, rotating
# ----------------------------------------------------------------------------------------------------------


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def staging_dir_path(output_dir: str | os.PathLike, step: int) -> Path:
    # A fixed name (no pid): all processes of a distributed run must agree on it without talking.
    return Path(output_dir) / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"


def create_staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder inside `output_dir` (same filesystem, so the final rename is atomic)."""
    staging = staging_dir_path(output_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise CheckpointError(f"Could not create checkpoint staging folder {str(staging)!r}: {error}") from error
    return staging


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the system or
    the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    current_directory, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(current_directory, os.fsencode(first), current_directory, os.fsencode(second), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_dir(staging: Path, final: Path) -> None:
    """Rename the complete folder `staging` to `final`. An existing folder at `final` is swapped with it in one step
    where the system can (`exchange_paths`), then deleted, so that `final` is never missing; elsewhere it is moved
    aside first and deleted only once the new one is in place: at every moment one of the two is complete under its
    name or the trash name, and a failing rename puts the existing folder back."""
    if final.is_dir() and not final.is_symlink() and exchange_paths(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the earlier folder, now under the staging name
        fsync_dir(final.parent)
        return
    displaced = None
    if final.exists():
        displaced = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}")
        os.replace(final, displaced)
    try:
        os.replace(staging, final)
    finally:
        if displaced is not None:
            if staging.exists():  # not renamed: put the earlier one back
                os.replace(displaced, final)
            elif displaced.is_dir() and not displaced.is_symlink():  # renamed (a Ctrl-C may arrive just after)
                shutil.rmtree(displaced, ignore_errors=True)
            else:
                displaced.unlink(missing_ok=True)
    fsync_dir(final.parent)


def commit_staging_dir(staging: str | os.PathLike, final: str | os.PathLike, step: int) -> Path:
    """fsync every staged file, write the manifest last, and rename the folder to `final`.

    An existing complete folder at `final` (the same step saved again after a resume) is replaced as
    `replace_dir` does.
    """
    staging, final = Path(staging), Path(final)
    try:
        seal_folder(staging)
        write_manifest(staging, step)
        fsync_dir(staging)
        replace_dir(staging, final)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"Could not complete checkpoint {str(final)!r}: {error}") from error
    return final


def disk_full_note(error: BaseException, folder: Path) -> str:
    """torch.save reports a full disk in its own words ("unexpected pos 1060096 vs 1059988"): where the disk is
    nearly full as the write fails, say so."""
    if isinstance(error, OSError):
        return ""  # its errno says what failed ("No space left on device", "Permission denied", ...)
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return ""
    if usage.free < max(64 * 2**20, usage.total // 100):
        return f" (the disk holding it has {usage.free / 2**20:.0f} MB free: probably full)"
    return ""


def write_checkpoint(output_dir: str | os.PathLike, step: int, write_files: Callable[[Path], None]) -> Path:
    """Write a checkpoint atomically: `write_files(staging_dir)` fills it, then it is committed.

    On failure (disk full, I/O error) the staging folder is removed, earlier checkpoints are untouched, and
    `CheckpointError` names the checkpoint that could not be written.
    """
    final = checkpoint_path(output_dir, step)
    staging = create_staging_dir(output_dir, step)
    try:
        write_files(staging)
    except Exception as error:
        full = disk_full_note(error, staging)
        shutil.rmtree(staging, ignore_errors=True)
        previous = [str(path) for _, path in list_checkpoints(output_dir)[-1:]]
        note = f" The previous checkpoint {previous[0]!r} is intact." if previous else ""
        raise CheckpointError(f"Could not write checkpoint {str(final)!r}: {error}{full}.{note}") from error
    except BaseException:  # stopped (Ctrl-C, SIGTERM): the half-written folder is not left for the next run to find
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return commit_staging_dir(staging, final, step)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Folders named `checkpoint-<step>` in `output_dir`, oldest first (not verified)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike, check_hashes: bool = True,
                           resuming: bool = False) -> Path | None:
    """The newest checkpoint whose manifest verifies; torn or corrupted ones are skipped with a warning (`resuming`:
    saying that the resumed run will write over them)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path, check_hashes=check_hashes)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s.%s", path, problem,
                       " A run resumed from an earlier checkpoint writes a new one in its place when it saves that "
                       "step: move it out of the folder to keep it." if resuming else "")
    return None


def resolve_resume_checkpoint(resume_from: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn `--resume_from_checkpoint latest|PATH` into a verified folder (None: start from scratch)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        latest = find_latest_checkpoint(output_dir, resuming=True)
        if latest is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting from scratch.", output_dir)
        return latest
    path = Path(resume_from)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"Cannot resume from {str(path)!r}: {problem}.")
    return path


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int | None, protect: Iterable[Path] = (),
                       superseded=lambda step: False) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and before counting them those whose step is
    `superseded` (an earlier run's last checkpoint, off the saving schedule, that a resumed run has passed); returns
    the deleted folders.

    Only complete checkpoints count towards `keep_last`, so a torn newer folder never causes the removal of
    the last good one. Folders are renamed away before deletion so that a half-deleted folder never looks
    like a checkpoint.
    """
    if keep_last is None or keep_last <= 0:
        return []
    protected = {Path(path).resolve() for path in protect}
    complete = [(step, path) for step, path in list_checkpoints(output_dir)
                if verify_checkpoint(path, check_hashes=False) is None]
    doomed = [path for step, path in complete if superseded(step)]
    kept = [path for step, path in complete if not superseded(step)]
    deleted = []
    for path in doomed + kept[: max(0, len(kept) - keep_last)]:
        if path.resolve() in protected:
            continue
        # A name that nothing restores (a replacement's trash is restored): a kill between the rename and the delete
        # must not bring the folder back, past the limit; the next start deletes it.
        trash = path.with_name(f"{REPLACED_PREFIX}{path.name}-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted


def set_aside(checkpoints: Iterable[Path]) -> list[Path]:
    """Rename each of an earlier run's checkpoints to a trash name that nothing restores (`--overwrite_output_dir`):
    a rename is atomic, where deleting a folder file by file leaves it torn under its name if killed. Oldest first: a
    kill part-way leaves the newest under their names, so `latest` finds the earlier run where it stood, as if killed
    just before. Returns the new paths, for the caller to delete; the next start removes any left over."""
    trashed = []
    for path in sorted(checkpoints, key=lambda path: int(_CHECKPOINT_RE.match(path.name).group(1))):
        target = path.with_name(f"{REPLACED_PREFIX}{path.name}-{os.getpid()}")
        os.replace(path, target)
        trashed.append(target)
    if trashed:
        fsync_dir(trashed[0].parent)
    return trashed


def restore_interrupted_replacements(output_dir: str | os.PathLike) -> list[Path]:
    """Put back a checkpoint that a kill between `replace_dir`'s two renames left under a trash name only: its
    complete new version from staging if there is one, else the complete trashed one."""
    output_dir = Path(output_dir)
    restored = []
    if not output_dir.is_dir():
        return restored
    for entry in sorted(output_dir.iterdir()):
        match = _TRASHED_CHECKPOINT_RE.match(entry.name)
        final = output_dir / match.group(1) if match else None
        if final is None or final.exists() or not entry.is_dir():
            continue
        for candidate in (output_dir / f"{TMP_PREFIX}{final.name}", entry):
            if candidate.is_dir() and verify_checkpoint(candidate) is None:
                os.replace(candidate, final)
                fsync_dir(output_dir)
                logger.warning("Restored %s, left under a temporary name by a run that stopped while replacing or "
                               "rotating it.", final)
                restored.append(final)
                break
    return restored


def is_stale_staging(entry: Path) -> bool:
    """Whether `entry` has a name that only our writes give (a user's `.tmp-notes` folder or `.tmp-notes-20261128`
    file does not): no user content, whether or not its writer still runs (the same answer on every machine)."""
    if entry.is_dir() and not entry.is_symlink():
        return bool(_STALE_DIR_RE.match(entry.name) or _TRASHED_CHECKPOINT_RE.match(entry.name))
    return entry.is_file() and bool(_STALE_FILE_RE.match(entry.name))


def is_mkdtemp_folder(entry: Path, prefix: str) -> bool:
    """Whether `entry` is a folder named as `tempfile.mkdtemp(prefix=prefix)` names one (the prefix, then 8 of its
    characters): a user's `.tokenizer-tmp-notes` is not."""
    return (entry.is_dir() and not entry.is_symlink()
            and re.fullmatch(re.escape(prefix) + r"[a-z0-9_]{8}", entry.name) is not None)


def remove_stale_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders and files left by a run of ours killed while writing (call
    `restore_interrupted_replacements` first, and only once the folder is known to be a run's); a temporary file
    whose writer still runs is left to it."""
    return remove_entries(Path(output_dir), lambda entry: is_stale_staging(entry) and _writer_is_gone(entry))


# ----------------------------------------------------------------------------------------------------------
# Safe state files
# ----------------------------------------------------------------------------------------------------------


def save_torch_state(state, path: str | os.PathLike) -> None:
    """`torch.save` of tensors and plain containers only (readable with weights_only=True)."""
    torch.save(state, path)


def load_torch_state(path: str | os.PathLike):
    """Load a state file without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing.") from error
    except Exception as error:
        # torch's own text advises retrying with weights_only=False, which would run any code the file holds, or
        # allow-listing the class: keep only the reason (the refused class, or what a damaged file broke).
        text = str(error).strip()
        refused = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", text, re.DOTALL)
        if refused and refused.group(1):
            reason = " ".join(refused.group(1).split())
        elif "weights_only" in text:  # torch's advice without a reason: nothing of it is worth keeping
            reason = f"{type(error).__name__}"
        else:
            reason = f"{type(error).__name__}: {(text.splitlines() or [''])[0]}"
        raise CheckpointError(f"{path}: not a state file this package wrote, or damaged; it is loaded with "
                              f"weights_only=True only ({reason}).") from None


# ----------------------------------------------------------------------------------------------------------
# Averaging
# ----------------------------------------------------------------------------------------------------------

WEIGHT_FILE_SUFFIX = ".safetensors"


SHARD_INDEX_NAME = "model.safetensors.index.json"


def weight_files(folder: str | os.PathLike, error: type[Exception] = CheckpointError) -> list[Path]:
    """The safetensors files of a saved model folder: the shards its index lists (each must be there), or, without
    an index, every `*.safetensors` file."""
    folder = Path(folder)
    index = folder / SHARD_INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*" + WEIGHT_FILE_SUFFIX))
    weight_map = read_json_object(index, "a JSON index of weight shards", error).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise error(f"{index}: 'weight_map' must be an object mapping tensor names to shard files.")
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise error(f"{index} lists the shard {missing[0]}, which is missing from {folder}.")
    return [folder / shard for shard in shards]


def load_safetensors_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files of a saved model folder (sharded or not)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"No *.safetensors weights in {str(folder)!r}.")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except SafetensorError as error:
            raise CheckpointError(f"{file}: cannot read the weights ({error}); the file is damaged or incomplete.") from error
        except OSError as error:
            raise CheckpointError(f"{file}: cannot read the weights ({error}).") from error
    return tensors


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]], sources: list | None = None) -> dict[str, torch.Tensor]:
    """Arithmetic mean of floating-point tensors (accumulated in float64); other tensors must agree. `sources` names
    the inputs in errors (default: checkpoint 0, 1, ...)."""
    if not state_dicts:
        raise ValueError("Nothing to average: no state dicts given.")
    labels = [str(source) for source in sources] if sources else [f"checkpoint {i}" for i in range(len(state_dicts))]
    names = set(state_dicts[0])
    for index, state in enumerate(state_dicts[1:], start=1):
        if set(state) != names:
            diff = sorted(names.symmetric_difference(state))[:5]
            raise ValueError(f"{labels[index]} holds different tensors than {labels[0]} (e.g. {diff}).")
    averaged = {}
    for name in sorted(names):
        first = state_dicts[0][name]
        for label, state in zip(labels, state_dicts):
            if state[name].dtype != first.dtype:  # the mean would take the first one's: results depend on the order
                raise ValueError(f"Tensor {name} is {first.dtype} in {labels[0]} but {state[name].dtype} in {label}: "
                                 "convert the checkpoints to one dtype first.")
            if first.is_floating_point() and not bool(torch.isfinite(state[name]).all()):
                raise ValueError(f"Tensor {name} of {label} holds NaN or infinity: that checkpoint is damaged.")
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for label, state in zip(labels, state_dicts):
                if state[name].shape != first.shape:
                    raise ValueError(f"Tensor {name} has different shapes: {tuple(first.shape)} in {labels[0]}, "
                                     f"{tuple(state[name].shape)} in {label}.")
                total += state[name].to(torch.float64)
            averaged[name] = (total / len(state_dicts)).to(first.dtype).contiguous()
        else:
            if any(not torch.equal(state[name], first) for state in state_dicts):
                raise ValueError(f"Non-float tensor {name} differs across checkpoints; cannot average it.")
            averaged[name] = first.clone()
    return averaged


# What train.py, finetune_trainer.py (its final save's step) and transformers' Trainer write about a run.
RUN_RECORDS = ("eval_results.json", "all_results.json", "train_results.json", "training_log.jsonl", "README.md",
               "finetune_final.json", AVERAGED_FROM_NAME)


def _belongs_to_saved_model(name: str) -> bool:
    """Config, generation config, tokenizer and remote-code files are kept; weights are replaced by the average;
    optimizer, scheduler, RNG and trainer state, a finished run's results, log, plots and card (they describe
    another model: its test scores would reach the average's card), and hidden files (a lock, a write's staging) do
    not belong to an averaged model."""
    return (not name.endswith((WEIGHT_FILE_SUFFIX, ".bin", ".index.json", ".png")) and name != MANIFEST_NAME
            and name not in RUN_RECORDS and not name.startswith(".") and not is_training_state(name))


def recorded_run(folder: str | os.PathLike) -> tuple[dict, str | None]:
    """The settings train.py recorded for the model in `folder`, and the file they came from: its eval_results.json
    (a finished run), its trainer_state.json (a checkpoint), or, for an average, the last checkpoint's, which
    averaged_from.json keeps (the checkpoints themselves may be rotated away or reused by another run). Empty where
    none is readable (a Hub folder, a converted model, a Seq2SeqTrainer's)."""
    def read(file: Path):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(file.read_text(encoding="utf-8"))

    folder = Path(folder)
    files = [folder / "eval_results.json", folder / TRAINER_STATE_NAME, folder / AVERAGED_FROM_NAME]
    averaged = read(folder / AVERAGED_FROM_NAME)
    if isinstance(averaged, dict) and isinstance(averaged.get("checkpoints"), list) and averaged["checkpoints"]:
        last = Path(str(averaged["checkpoints"][-1]))
        if last.is_absolute():  # an average made before the run was copied in; a relative path was another directory's
            files.append(last / TRAINER_STATE_NAME)
    for file in files:
        record = read(file)
        if not isinstance(record, dict):
            continue
        if file.name == TRAINER_STATE_NAME:
            record = record.get("config")
        elif file.name == AVERAGED_FROM_NAME:
            record = record.get("run")
        else:  # eval_results.json: the test's settings, and the recipe's source cut
            training_config = record.get("training_config")
            record = {**(training_config if isinstance(training_config, dict) else {}), **record}
        if isinstance(record, dict):
            return record, str(file)
    return {}, None


SYSTEM_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what file browsers leave in any folder


def refuse_to_replace_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], option: str,
                             earlier_output: tuple[str, ...] | None) -> None:
    """Replacing the folder `output` deletes everything in it: refuse when an input would go with it (the output is
    an input, or holds one), when it lies inside an input checkpoint (rotating checkpoints would delete it), when the
    working directory would go (`--output .` with an overwrite flag), or anything but an earlier output of the same
    command: a folder with the files `earlier_output` and no sub-folders (not a training run, a checkpoint, another
    model, a repository or a user's files; what file browsers leave aside). `earlier_output=None`: the command never
    replaces a folder that is not empty, and refuses one itself."""
    target = Path(output).resolve()
    for source in map(Path, inputs):
        source = source.resolve()
        if source == target or target in source.parents:
            raise ValueError(
                f"{option} {str(output)!r} {'is' if source == target else 'holds'} the input {str(source)!r}: "
                f"replacing it would delete that input; choose another {option}."
            )
        if source in target.parents and _CHECKPOINT_RE.match(source.name):
            raise ValueError(f"{option} {str(output)!r} lies inside the checkpoint {str(source)!r}, which rotating "
                             f"checkpoints deletes with everything in it; choose another {option}.")
    working = Path.cwd().resolve()
    if working == target or target in working.parents:
        raise ValueError(
            f"{option} {str(output)!r} {'is' if working == target else 'holds'} the working directory "
            f"{str(working)!r}: replacing it would delete everything there; choose another {option}."
        )
    if earlier_output is None:
        return
    entries = [entry for entry in target.iterdir() if entry.name not in SYSTEM_FILES] if target.is_dir() else []
    names = {entry.name for entry in entries}
    if entries and (not set(earlier_output) <= names or any(entry.is_dir() for entry in entries)):
        held = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries)
        raise ValueError(
            f"{option} {str(output)!r} is not empty and not an earlier output of this command (one with "
            f"{' and '.join(earlier_output)} and no sub-folders; it holds {', '.join(held[:6])}"
            f"{', ...' if len(held) > 6 else ''}): replacing it as a whole would delete them; choose another "
            f"{option}, or empty it first."
        )


# Config fields that do not change what the weights compute: averaging checkpoints that differ only there is fine.
_NOT_ARCHITECTURE = {"transformers_version", "_name_or_path", "architectures", "auto_map", "dropout", "attention_dropout",
                     "activation_dropout", "label_smoothing", "use_cache", "torch_dtype", "dtype", "custom_pipelines"}


def check_same_architecture(folders: list[str | os.PathLike]) -> None:
    """Weights of the same shapes can still mean different models (pre- and post-LN, another positional layout):
    the folders' config.json must agree on every field but training-only ones. The same folder twice is refused."""
    resolved = [Path(folder).resolve() for folder in folders]
    repeated = sorted({str(folder) for folder in resolved if resolved.count(folder) > 1})
    if repeated:
        raise CheckpointError(f"{repeated[0]!r} is given more than once: each checkpoint should count once.")
    configs = [read_json_object(Path(folder) / "config.json", "a JSON model config", CheckpointError) for folder in folders]
    for folder, config in zip(folders[1:], configs[1:]):
        differ = architecture_differences(config, configs[0])
        if differ:
            raise CheckpointError(
                f"{str(folder)!r} and {str(folders[0])!r} describe different models in config.json ("
                + ", ".join(f"{key}: {config.get(key)!r} against {configs[0].get(key)!r}" for key in differ[:5])
                + "): their weights cannot be averaged into one.")


def architecture_differences(first: dict, second: dict) -> list[str]:
    """The model config fields, training-only ones aside, where two config dicts differ."""
    return [key for key in sorted(set(first) | set(second))
            if key not in _NOT_ARCHITECTURE and first.get(key) != second.get(key)]


def average_checkpoints(checkpoints: list[str | os.PathLike], output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Average the weights of saved model folders (the paper averaged the last 5 or 20 checkpoints).

    The result is a loadable model folder at `output_dir`: the averaged `model.safetensors` plus the
    config, generation config and tokenizer files of the last input. It is staged and renamed into place. An
    existing non-empty folder is replaced (only once the new one is complete) with `overwrite` only, and never
    when it is or holds one of the inputs.
    """
    from safetensors.torch import save_file

    if not checkpoints:
        raise CheckpointError("No checkpoints to average.")
    refuse_to_replace_inputs(output_dir, checkpoints, "--output", (AVERAGED_FROM_NAME,))
    existing = Path(output_dir)
    if existing.exists() and not existing.is_dir():
        raise CheckpointError(f"--output {str(existing)!r} is a file, not a folder.")
    if existing.is_dir() and any(existing.iterdir()) and not overwrite:
        raise CheckpointError(f"--output {str(existing)!r} already exists and is not empty; pass --overwrite to replace it.")
    for folder in checkpoints:
        if not Path(folder).is_dir():
            raise CheckpointError(f"{str(folder)!r} " + ("is not a folder." if Path(folder).exists() else "does not exist."))
        if not (Path(folder) / "config.json").is_file():
            raise CheckpointError(f"{str(folder)!r} has no config.json: average saved model folders (checkpoints), or "
                                  "the result could not be loaded.")
        if (Path(folder) / MANIFEST_NAME).exists():
            problem = verify_checkpoint(folder, hash_training_state=False)
            if problem is not None:
                raise CheckpointError(f"Cannot average {str(folder)!r}: {problem}.")
    check_same_architecture(checkpoints)
    check_same_files(checkpoints, TOKENIZER_FILE_NAMES)
    averaged = average_state_dicts([load_safetensors_folder(folder) for folder in checkpoints], checkpoints)
    output_dir, staging = Path(output_dir), None
    try:
        staging = staging_beside(output_dir)
        last = Path(checkpoints[-1])
        for source in last.iterdir():
            if source.is_file() and _belongs_to_saved_model(source.name):
                shutil.copy2(source, staging / source.name)
        save_file(averaged, str(staging / "model.safetensors"), metadata={"format": "pt"})
        # What train.py recorded for the last input (language pair, test settings), for evaluate.py and the card:
        # the checkpoints may be rotated away later, and their paths, kept absolute, reused by another run.
        averaged_from = {"checkpoints": [str(Path(c).absolute()) for c in checkpoints], "run": recorded_run(last)[0]}
        (staging / AVERAGED_FROM_NAME).write_text(json.dumps(averaged_from, indent=2) + "\n", encoding="utf-8")
        seal_folder(staging)
        check_loads(staging, last)
        replace_dir(staging, output_dir)
    except OSError as error:
        raise CheckpointError(f"Could not write averaged model {str(output_dir)!r}: {error}") from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_same_files(folders: list[str | os.PathLike], names: Iterable[str]) -> None:
    """The folders hold the same `names` files (or all lack them): an average takes the last one's, which must then
    be every input's (the same tokenizer)."""
    for name in names:
        contents = [(Path(folder) / name).read_bytes() if (Path(folder) / name).is_file() else None for folder in folders]
        for folder, content in zip(folders[1:], contents[1:]):
            if content != contents[0]:
                raise CheckpointError(f"{Path(folder) / name} differs from {Path(folders[0]) / name}: the checkpoints "
                                      "were not trained with the same tokenizer, and their average has no one tokenizer.")


def check_loads(staging: Path, source: Path) -> None:
    """The averaged folder loads as every script loads a model folder (its config, generation config and tokenizer
    are `source`'s); otherwise the reason, naming `source`, and nothing is written."""
    from .training import load_model_and_tokenizer, load_saved_model

    try:
        if any((source / name).is_file() for name in TOKENIZER_FILE_NAMES):
            load_model_and_tokenizer(staging, device="cpu")
        else:  # model folders without a tokenizer average too
            load_saved_model(staging)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"The average would not load, so it was not written ({str(error).replace(str(staging), str(source))}).") from error


def last_checkpoints(output_dir: str | os.PathLike, count: int, skip=lambda step: False) -> list[Path]:
    """The newest `count` complete checkpoints of a training output folder, oldest first, leaving out those whose step
    is `skip`ped; a torn or corrupted one is skipped with a warning that names it."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}.")
    complete = []
    for step, path in reversed(list_checkpoints(output_dir)):
        if skip(step):
            continue
        problem = verify_checkpoint(path)
        if problem is not None:
            logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
            continue
        complete.insert(0, path)
        if len(complete) == count:
            break
    return complete


# The files `save_pretrained` copies beside the weights (transformers' `custom_object_save`), and a line each holds.
SHIPPED_CODE_MARKERS = {
    "configuration_seq2seq.py": "class Seq2SeqTransformerConfig(",
    "modeling_seq2seq.py": "class Seq2SeqTransformerForConditionalGeneration(",
    "decoding_seq2seq.py": "class IncrementalDecoder",
    "pipeline.py": "class Seq2SeqTranslationPipeline(",
}


def refuse_to_overwrite_foreign_code(save_directory: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """transformers copies the model's code into the folder over whatever has those names: refuse, naming the file,
    when one of them (of `names`, by default all) is not this model's code (a user's own `pipeline.py` in the folder
    saved into, say). The model's, its config's and the pipeline's `save_pretrained` call it first."""
    for name in SHIPPED_CODE_MARKERS if names is None else names:
        marker = SHIPPED_CODE_MARKERS[name]
        path = Path(save_directory) / name
        if not os.path.lexists(path):
            continue
        try:
            ours = path.is_file() and not path.is_symlink() and marker in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            ours = False
        if not ours:
            raise FileExistsError(
                f"{path} exists and is not this model's code: save_pretrained writes the model's {name} there (so "
                f"that the folder loads with trust_remote_code=True). Move it away or save to another folder."
            )


__all__ = [
    "CHECKPOINT_PREFIX",
    "MANIFEST_NAME",
    "TRAINER_STATE_NAME",
    "disk_full_note",
    "recorded_run",
    "CheckpointError",
    "atomic_write_json",
    "atomic_write_bytes",
    "atomic_write_text",
    "average_checkpoints",
    "average_state_dicts",
    "checkpoint_path",
    "find_latest_checkpoint",
    "last_checkpoints",
    "list_checkpoints",
    "move_files_into",
    "load_safetensors_folder",
    "load_torch_state",
    "lock_output_dir",
    "probe_writable",
    "remove_stale_staging",
    "is_mkdtemp_folder",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
    "save_torch_state",
    "unlock_output_dir",
    "is_training_state",
    "verify_checkpoint",
    "write_checkpoint",
]
