"""Run folders and checkpoints: how they are created, written, found and read (the one home).

Every checkpoint is written atomically by :class:`SafeDiskSaver` (temporary file, then rename);
a checkpoint it replaces is deleted only after the new one is complete, so at every instant at
least one complete checkpoint exists; a checkpoint with a non-finite tensor is never written.
Every checkpoint carries a :class:`RunInfo` entry (the trainer's kind and its resolved
configuration), so a checkpoint file is usable alone. ``checkpoints/index.json``, rewritten
atomically after every save and removal, lists the files with their prefix, iteration and score:
resumed runs adopt it (no pile-up of old files) and generate.py picks the best checkpoint from it.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import ignite.distributed as idist
import torch
import yaml
from ignite.handlers import Checkpoint, DiskSaver

from utils.config import flatten, save_config
from utils.errors import UserError
from utils.schema import defaults as schema_defaults
from utils.schema import keys as schema_keys

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_PREFIX = "latest"
BEST_PREFIX = "best"
INDEX_FILE = "index.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yml"
#: present while a trainer works in the run folder: its process id, host and start time
LOCK_FILE = "RUNNING.json"
#: an unreadable lock younger than this many seconds is being written by another trainer
LOCK_GRACE_S = 10.0
#: the mean preprocessed training spectrum (L,), the naive predictor every evaluation compares with
MEAN_SPECTRUM_FILE = "mean_train_spectrum.npy"
MEAN_SPECTRUM_KEY = "mean_train_spectrum"
#: the log10 wavelengths (L,) of the pixels a network was trained on, kept in its checkpoints
GRID_KEY = "loglam"
#: the checkpoint entry that says which trainer wrote it, with its configuration
RUN_INFO_KEY = "run_info"
#: what each kind of run saves as its sampling weights
WEIGHTS_KEY = {"contrastive": "model", "generative": "ema_model"}


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, of the wrong kind or does not fit the model, or a run
    folder that another trainer is using."""


class NonFiniteError(UserError):
    """A non-finite loss, score or weight: the run stops, finite checkpoints are kept."""


class RunInfo:
    """The trainer's kind, its resolved configuration and facts computed once for the run (e.g.
    the mean training spectrum), saved in every checkpoint.

    Loading it checks the kind: a contrastive checkpoint cannot resume a diffusion run.
    """

    def __init__(self, kind: str, config: dict, extras: dict | None = None) -> None:
        self.kind, self.config, self.extras = kind, config, dict(extras or {})

    def state_dict(self) -> dict:
        return {"kind": self.kind, "config": self.config, **self.extras}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"the checkpoint was written by the {state.get('kind')} trainer, not the "
                                  f"{self.kind} one")


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temporary file, then rename); non-finite floats become null."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(json_safe(data), handle, indent=2, allow_nan=False)
    os.replace(tmp, path)


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The name of the first floating tensor of ``obj`` that holds NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = _non_finite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    return None


@contextmanager
def deferred_interrupt():
    """Hold back Ctrl-C (SIGINT) until the block has finished, then raise it as KeyboardInterrupt.
    A ``torch.save`` cut short by it fails inside torch's zip writer (a RuntimeError in place of
    the interrupt, or an abort of the whole process at exit), so saves are not interrupted. Only in
    the main thread and only where Python's own Ctrl-C handler is installed (not where SIGINT is
    ignored, e.g. a background job)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


class SafeDiskSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` that (1) refuses checkpoints with non-finite tensors, (2)
    deletes the files it is asked to remove only after the next checkpoint is complete, and (3)
    keeps ``index.json`` up to date."""

    def __init__(self, dirname: Path) -> None:
        super().__init__(dirname, require_empty=False, atomic=True, create_dir=True)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        bad = _non_finite(checkpoint)
        if bad:
            raise NonFiniteError(f"'{bad}' holds NaN or inf: checkpoint {filename} not written; the finite "
                                 f"checkpoints in '{self.dirname}' are kept")
        with deferred_interrupt():  # Ctrl-C inside torch.save can abort the process: let the save finish
            self._save(checkpoint, filename, metadata)

    def _save(self, checkpoint: Mapping, filename: str, metadata: Mapping | None) -> None:
        super().__call__(checkpoint, filename, metadata)
        pending, self._pending = [f for f in self._pending if f != filename], []
        for name in pending:
            (Path(self.dirname) / name).unlink(missing_ok=True)
        info = checkpoint.get(RUN_INFO_KEY, {}) if isinstance(checkpoint, Mapping) else {}
        trainer = checkpoint.get("trainer", {}) if isinstance(checkpoint, Mapping) else {}
        index = read_index(Path(self.dirname))
        for name in pending:
            index.pop(name, None)
        index[filename] = {"prefix": (metadata or {}).get("basename", "").split("_")[0],
                           "priority": (metadata or {}).get("priority"), "iteration": trainer.get("iteration"),
                           "kind": info.get("kind")}
        write_json(Path(self.dirname) / INDEX_FILE, index)

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


def read_index(folder: Path) -> dict[str, dict]:
    """``{filename: {prefix, priority, iteration, kind}}`` for the checkpoints in ``folder`` that exist."""
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return ({name: entry for name, entry in index.items() if (folder / name).is_file()}
            if isinstance(index, dict) else {})


def sweep_stale_files(folder: Path) -> list[str]:
    """Delete temporary files that a killed save left in a checkpoint folder; returns their names.
    Only names Ignite's atomic saver and :func:`write_json` create are touched."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and ((path.name.startswith("tmp") and path.suffix != ".pt")
                                   or (path.name.startswith(f".{INDEX_FILE}.") and path.suffix == ".tmp")):
                path.unlink()
                removed.append(path.name)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), folder)
    return removed


def adopt_saved(handler: Checkpoint, folder: Path, prefix: str) -> None:
    """Let a fresh Ignite ``Checkpoint`` manage the files of ``prefix`` that the resumed run left,
    so that it deletes them in turn instead of piling up new ones beside them."""
    entries = [(e["priority"], name) for name, e in read_index(folder).items()
               if e.get("prefix") == prefix and isinstance(e.get("priority"), (int, float))]
    handler.load_state_dict({key: sorted(entries) for key in handler.state_dict()})


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest 'latest' (else best) checkpoint of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint or run folder '{path}' does not exist")
    folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    index = read_index(folder)
    for prefix in (LATEST_PREFIX, BEST_PREFIX):
        found = [(e.get("iteration") or 0, name) for name, e in index.items() if e.get("prefix") == prefix]
        if found:
            return folder / max(found)[1]
    for prefix in (LATEST_PREFIX, BEST_PREFIX):  # a folder without index: newest file
        files = sorted(folder.glob(f"{prefix}_*.pt"), key=lambda p: p.stat().st_mtime)
        if files:
            return files[-1]
    runs = sorted(p.name for p in path.iterdir() if (p / CHECKPOINT_DIR).is_dir())
    if runs:  # a folder of runs (run.out_dir), not a run
        raise CheckpointError(f"'{path}' holds run folders, not a run's checkpoints: name one of them "
                              f"(newest: '{path / runs[-1]}') or a checkpoint file")
    raise CheckpointError(f"no checkpoint (*.pt) found in '{folder}'")


def best_checkpoint(run: Path) -> Path:
    """The run's best checkpoint by its validation score (from index.json), else its latest."""
    folder = run / CHECKPOINT_DIR
    best = [(e["priority"], name) for name, e in read_index(folder).items()
            if e.get("prefix") == BEST_PREFIX and isinstance(e.get("priority"), (int, float))]
    return folder / max(best)[1] if best else find_checkpoint(run)


def run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def read_checkpoint(path: Path, what: str = "checkpoint", mmap: bool = False) -> dict:
    """The dictionary saved in a checkpoint file, or a :class:`CheckpointError` naming the file.
    ``mmap=True`` maps the tensors instead of reading them: cheap when only the metadata or some of
    the tensors are needed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} '{path}' is not a checkpoint dictionary")
    return state


def checkpoint_kind(state: dict, path: Path, kind: str, what: str) -> dict:
    """The run configuration saved in ``state`` in this version's keys (:func:`upgrade_config`),
    after checking that the ``kind`` trainer wrote it."""
    info = state.get(RUN_INFO_KEY)
    if not isinstance(info, dict) or "kind" not in info:
        raise CheckpointError(f"{what} '{path}' was not written by this project's trainers (no {RUN_INFO_KEY})")
    if info["kind"] != kind:
        raise CheckpointError(f"{what} '{path}' is a {info['kind']} checkpoint, expected a {kind} one")
    return upgrade_config(info["config"], kind, f"{what} '{path}'")


#: keys that configurations of earlier versions had, with the value that builds the network this
#: version builds: a checkpoint trained with another value is refused by name
RETIRED_NETWORK_KEYS = {"model.global_context": False, "model.photometry": False, "model.head_dim": 32,
                        "model.spectrum_mults": [1, 2, 4, 8, 16], "diffusion.shift": 1.0}
#: renamed keys, earlier name -> this version's
RENAMED_KEYS = {"val.max_objects": "val.n_objects"}


def upgrade_config(saved: dict, kind: str, what: str) -> dict:
    """A checkpoint's configuration in this version's keys: renamed keys under their new names,
    keys this version does not have dropped, keys it added at their defaults. A network that this
    version cannot build (a retired model key at another value than the one it builds) is refused
    with :class:`CheckpointError` naming the key."""
    flat = flatten(saved)
    for key, neutral in RETIRED_NETWORK_KEYS.items():
        if key in flat and str(flat[key]) != str(neutral):
            raise CheckpointError(f"{what} was trained with {key}={flat[key]!r}, a setting this version no longer "
                                  f"has (its network cannot be built here; docs/experiments.md has that setting's "
                                  f"results)")
    flat = {RENAMED_KEYS.get(k, k): v for k, v in flat.items()}
    schema = schema_keys(kind)
    config = schema_defaults(kind)
    for path, value in flat.items():
        if path in schema:
            section, name = path.split(".")
            config[section][name] = value
    config["preset"] = saved.get("preset")
    return config


def load_checkpoint(path: Path, to_load: dict[str, Any]) -> None:
    """Restore every object of ``to_load`` from ``path`` with errors a user can act on."""
    state = read_checkpoint(path)
    missing = [k for k in to_load if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}: it was written by another "
                              f"trainer or an older version")
    try:
        Checkpoint.load_objects(to_load=to_load, checkpoint=state)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint '{path}': {err}") from None
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2])  # torch's heading and its first mismatch
        raise CheckpointError(f"checkpoint '{path}' does not fit this configuration (different model "
                              f"settings?): {detail}") from None


# --------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------
#: data settings that a trained model fixes and the data it reads must share
DATA_KEYS = ("image", "preprocessing", "downsample")
#: settings a resumed run must share with its checkpoint: they fix the networks' shapes or what
#: their inputs and outputs mean (train.*, val.*, run.*, sampling.* and the data folder may change)
RESUME_FIXED = ("model.", "diffusion.", "train.cond_noise", *(f"data.{key}" for key in DATA_KEYS))
#: ... except these: memory only, or read only when a run starts afresh
RESUME_FREE = ("model.grad_checkpoint", "model.image_init")


def resume_mismatches(saved: dict, config: dict) -> list[str]:
    """``key (checkpoint value, this run value)`` for every :data:`RESUME_FIXED` setting in which
    ``config`` differs from the checkpoint's ``saved`` configuration (keys an older version did not
    save are not compared)."""
    before, now = flatten(saved), flatten(config)
    return [f"{key} (checkpoint {before[key]!r}, this run {value!r})" for key, value in now.items()
            if key.startswith(RESUME_FIXED) and key not in RESUME_FREE and key in before
            and str(before[key]) != str(value)]


def resume_target(resume: str | Path, kind: str, config: dict) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` for ``run.resume``, checked before anything is written: the
    file must be a readable checkpoint written by the ``kind`` trainer, inside a run folder, and
    trained with the :data:`RESUME_FIXED` settings of ``config``."""
    checkpoint = find_checkpoint(resume)
    state = read_checkpoint(checkpoint, "run.resume checkpoint", mmap=True)  # the weights are loaded later, once
    saved = checkpoint_kind(state, checkpoint, kind, "run.resume checkpoint")
    differ = resume_mismatches(saved, config)
    if differ:
        raise CheckpointError(f"run.resume checkpoint '{checkpoint}' was trained with other settings: "
                              f"{'; '.join(differ)}; resume with the checkpoint's settings or start a new run")
    run_dir = run_folder_of(checkpoint)
    if checkpoint.parent.name != CHECKPOINT_DIR or not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"run.resume checkpoint '{checkpoint}' is not inside a run folder "
                              f"(<run>/{CHECKPOINT_DIR}/ next to <run>/{CONFIG_FILE})")
    return checkpoint, run_dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return math.inf


def _lock_holder(lock: Path) -> dict | None:
    """The lock file's ``{'pid', 'host', 'since'}``, or None when it is unreadable."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_mine(holder: dict) -> bool:
    return holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname()


def claim_run_folder(run_dir: Path) -> Path:
    """Mark ``run_dir`` as used by this process (``LOCK_FILE``), so that a second trainer started
    on the same folder (a resume while the run still goes on) stops before it touches anything.

    A lock left by a process that no longer runs on this host (or an unreadable one older than
    ``LOCK_GRACE_S``) is taken over with a warning; one held by a live process, written on another
    host (which cannot be checked from here) or unreadable and younger (being written) is refused
    with :class:`CheckpointError`. The lock is released when the run finishes
    (:func:`release_run_folder`) or this process exits. Returns the lock file.
    """
    lock = run_dir / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:
                if _age_seconds(lock) < LOCK_GRACE_S:  # another trainer is writing it right now
                    raise CheckpointError(f"run folder '{run_dir}' is being claimed by another trainer ('{lock}' "
                                          f"was written just now): start this one again once that one has begun"
                                          ) from None
            elif _is_mine(holder):
                return lock  # this process's own claim (a second run in the same process)
            elif holder.get("host") != socket.gethostname():
                raise CheckpointError(f"run folder '{run_dir}' is marked as in use by process {holder['pid']} on "
                                      f"host '{holder.get('host')}' since {holder.get('since')} ('{lock}'): if no "
                                      f"trainer runs there any more, delete that file and start again") from None
            elif _process_alive(holder["pid"]):
                raise CheckpointError(f"run folder '{run_dir}' is in use by process {holder['pid']} (since "
                                      f"{holder.get('since')}): wait for it to end or stop it; two trainers in one "
                                      f"run folder would overwrite each other's checkpoints (if that process is not "
                                      f"a trainer, delete '{lock}')") from None
            logger.warning("run folder %s: taking over the lock of a trainer that no longer runs (%s)", run_dir,
                           f"process {holder['pid']}, since {holder.get('since')}" if holder else "unreadable lock")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now().isoformat(timespec="seconds")}, handle)
        atexit.register(release_run_folder, run_dir)
        return lock
    raise CheckpointError(f"run folder '{run_dir}': could not take its lock '{lock}' (another trainer keeps taking it)")


def release_run_folder(run_dir: Path) -> None:
    """Remove ``run_dir``'s lock if this process holds it (the run finished or the process ends)."""
    lock = run_dir / LOCK_FILE
    holder = _lock_holder(lock)
    if holder is not None and _is_mine(holder):
        lock.unlink(missing_ok=True)


def new_stamped_folder(out_dir: Path, key: str = "run.out_dir") -> Path:
    """A new, empty folder ``out_dir/<date-time>`` for a run or a generate.py output (``-1``,
    ``-2``... when that exists, also when two start in the same second: it is created atomically).
    ``key`` names the setting ``out_dir`` came from, for the error when it cannot be a folder."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission, a read-only disk
        reason = "it is a file" if out_dir.is_file() else (err.strerror or str(err))
        raise CheckpointError(f"{key} '{out_dir}' cannot be used as an output folder: {reason}") from None
    stamp = stamp_now()
    for n in range(1000):
        run_dir = out_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise CheckpointError(f"no free folder name under '{out_dir}' for {stamp}")


def prepare_run(config: dict, kind: str) -> tuple[Path, Path | None]:
    """Create (or reuse, when resuming) the run folder, claim it for this process
    (:func:`claim_run_folder`) and write the resolved config there.

    Returns ``(run_dir, checkpoint_to_resume_or_None)``. A bad ``run.resume``, or a run folder
    another trainer is using, is rejected before any file is written. Only rank 0 touches the
    disk; the path is broadcast to the other ranks.
    """
    resume = config["run"]["resume"]
    checkpoint = None
    if idist.get_rank() == 0:
        if resume:
            checkpoint, run_dir = resume_target(resume, kind, config)
        else:
            run_dir = new_stamped_folder(Path(config["run"]["out_dir"]))
        claim_run_folder(run_dir)
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        (run_dir / "figures").mkdir(exist_ok=True)
        sweep_stale_files(run_dir / CHECKPOINT_DIR)
        name = CONFIG_FILE if not (run_dir / CONFIG_FILE).exists() else f"config-resumed-{stamp_now()}.yml"
        save_config(config, run_dir / name)
        message = f"{run_dir}|{checkpoint or ''}"
    else:
        message = ""
    if idist.get_world_size() > 1:
        message = idist.broadcast(message, src=0, safe_mode=True)
    run_str, ckpt_str = message.split("|")
    return Path(run_str), (Path(ckpt_str) if ckpt_str else None)


def stamp_now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_runs(kind: str) -> Path:
    """Where the ``kind`` trainer puts its runs by default (its ``run.out_dir``)."""
    return Path(schema_keys(kind)["run.out_dir"].default)


def run_stage(run: Path) -> str:
    """The cascade stage (``model.stage``) a run folder's config.yml names; 'single' without one."""
    try:
        config = yaml.safe_load((run / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "single"
    return str((config.get("model") or {}).get("stage", "single"))


def newest_finished_run(folder: Path, what: str, stages: tuple[str, ...] | None = None) -> Path:
    """The newest run folder under ``folder`` that wrote metrics.json (i.e. finished), of one of
    ``stages`` (cascade stages; any when None)."""
    runs = sorted((p for p in folder.glob("*") if (p / METRICS_FILE).is_file()
                   and (stages is None or run_stage(p) in stages)), key=lambda p: p.stat().st_mtime)
    if not runs:
        kind = f" of model.stage {' or '.join(stages)}" if stages else ""
        raise UserError(f"no finished {what} run{kind} in '{folder}' (a run folder with {METRICS_FILE}): train one "
                        f"first, or name a run folder or checkpoint in the config")
    return runs[-1]
