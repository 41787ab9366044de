"""Ignite wiring shared by both trainers: run folders, data, checkpoints, resume, logging.

Written once here; ``train_contrastive.py`` and ``train_generative.py`` only define their
models, their training step and their validation.
"""
from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, LRScheduler, ProgressBar, TerminateOnNan
from ignite.utils import manual_seed
from torch.optim.lr_scheduler import ExponentialLR

from utils.config import UserError, load_config, save_config
from utils.dataset import SpectraDataset, open_survey
from utils.mock import ensure_mock
from utils.runtime import keep_freed_memory

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_PREFIX = "latest"
BEST_PREFIX = "best"
METRICS_FILE = "metrics.json"


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


# --------------------------------------------------------------------------------------------
# run folder and logging
# --------------------------------------------------------------------------------------------
def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest 'latest' (else best) checkpoint inside a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint or run folder '{path}' does not exist")
    folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    for prefix in (LATEST_PREFIX, BEST_PREFIX):
        found = sorted(folder.glob(f"{prefix}_*.pt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint (*.pt) found in '{folder}'")


def run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def prepare_run(config: dict) -> tuple[Path, Path | None]:
    """Create (or reuse, when resuming) the run folder; write the resolved config there.

    Returns ``(run_dir, checkpoint_to_resume_or_None)``. Only rank 0 touches the disk; the path
    is broadcast to the other ranks.
    """
    resume = config["run"]["resume"]
    checkpoint = None
    if idist.get_rank() == 0:
        if resume:
            checkpoint = find_checkpoint(resume)
            run_dir = run_folder_of(checkpoint)
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path(config["run"]["out_dir"]) / stamp
            n = 1
            while run_dir.exists():
                run_dir = Path(config["run"]["out_dir"]) / f"{stamp}-{n}"
                n += 1
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        (run_dir / "figures").mkdir(exist_ok=True)
        name = "config.yml" if not (run_dir / "config.yml").exists() else f"config-resumed-{stamp_now()}.yml"
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


def setup_logging(run_dir: Path) -> None:
    """Log to the console (already set up by the entry script) and to ``run_dir/log.txt``."""
    if idist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
        return
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def load_survey(config: dict):
    """Open the configured dataset; generate the mock survey first when it is the source."""
    data = config["data"]
    if data["source"] == "mock" and idist.get_rank() == 0:
        ensure_mock(data["root"], data["mock_objects"], data["mock_seed"], ugriz=data["image"] == "ugriz")
    if idist.get_world_size() > 1:
        idist.barrier()
    return open_survey(data["root"])


def datasets(config: dict, survey) -> tuple[SpectraDataset, SpectraDataset]:
    """Train (augmented) and validation (centre-cropped) datasets."""
    d = config["data"]
    kw = dict(image=d["image"], preprocessing=d["preprocessing"], downsample=d["downsample"])
    train = SpectraDataset(survey, "train", train=True, **kw)
    val = SpectraDataset(survey, "val", train=False, **kw)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"dataset '{survey.root}' needs objects in both the train and val splits "
                        f"(has {len(train)} train, {len(val)} val)")
    return train, val


def train_loader(config: dict, dataset: SpectraDataset):
    """Shuffled, distributed-aware loader (the batch size is split across processes)."""
    batch = config["train"]["batch_size"]
    if len(dataset) < batch:
        raise UserError(f"train split has {len(dataset)} objects, fewer than train.batch_size={batch}")
    return idist.auto_dataloader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                 num_workers=config["data"]["num_workers"],
                                 persistent_workers=config["data"]["num_workers"] > 0)


def subset(dataset: SpectraDataset, n: int, seed: int = 0) -> SpectraDataset:
    """A fixed random subset of ``n`` rows (all rows when ``n`` is larger)."""
    if n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(dataset.rows, size=n, replace=False))
    return SpectraDataset(dataset.survey, None, dataset.kind, dataset.preprocessing, dataset.downsample,
                          train=False, rows=rows, spectra=dataset.spectra)


# --------------------------------------------------------------------------------------------
# precision and devices
# --------------------------------------------------------------------------------------------
def autocast(config: dict, device: torch.device):
    """bf16 autocast context when ``run.precision`` is bf16 (CPU and CUDA), else a no-op."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=config["run"]["precision"] == "bf16")


def maybe_compile(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    return torch.compile(model) if config["run"]["compile"] else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
class TrainClock:
    """Wall time spent training and validating; saved in checkpoints so budgets survive resume.

    Ignite's ``TimeLimit`` counts wall time from its creation, validation included, and forgets
    it on resume; ``train.max_minutes`` needs training time only, across restarts.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.val_seconds = 0.0
        self._mark: float | None = None

    def start(self) -> None:
        self._mark = time.perf_counter()

    def stop(self, bucket: str = "train") -> None:
        if self._mark is not None:
            setattr(self, f"{bucket}_seconds", getattr(self, f"{bucket}_seconds") + time.perf_counter() - self._mark)
        self._mark = None

    @property
    def val_fraction(self) -> float:
        total = self.train_seconds + self.val_seconds
        return self.val_seconds / total if total else 0.0

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "val_seconds": self.val_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state["train_seconds"])
        self.val_seconds = float(state["val_seconds"])


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """The dictionary saved in a checkpoint file, or a :class:`CheckpointError` naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} '{path}' is not a checkpoint dictionary")
    return state


def load_checkpoint(path: Path, to_load: dict[str, Any]) -> None:
    """Restore every object of ``to_load`` from ``path`` with errors a user can act on."""
    state = read_checkpoint(path)
    missing = [k for k in to_load if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}: it was written by another "
                              f"trainer or an older version")
    try:
        Checkpoint.load_objects(to_load=to_load, checkpoint=state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint '{path}' does not fit this configuration (different model "
                              f"settings?): {first}") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def attach_training(trainer: Engine, config: dict, run_dir: Path, optimizer: torch.optim.Optimizer,
                    to_save: dict[str, Any], validate: Callable[[Engine], dict[str, float]], best_key: str,
                    resume_from: Path | None, lr_decay: float) -> TrainClock:
    """Attach the handlers every trainer needs.

    - ProgressBar, TerminateOnNan, learning rate x ``lr_decay`` at every epoch (LRScheduler);
    - ``validate(trainer)`` every ``val.every`` iterations and at the end; its dict goes to
      ``trainer.state.val_metrics``; the share of wall time spent in it is logged;
    - checkpoints (rank 0, written atomically): the latest every ``run.checkpoint_every``
      iterations and at the end, and the 2 best by ``best_key`` (lower is better; NaN never);
    - ``train.max_iters`` and ``train.max_minutes`` budgets; ``metrics.json`` at the end;
    - resume from ``resume_from`` when given (model, optimizer, scheduler, engine, clock, ...).
    """
    clock = TrainClock()
    scheduler = LRScheduler(ExponentialLR(optimizer, gamma=lr_decay))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, scheduler)
    to_save = {**to_save, "trainer": trainer, "lr_scheduler": scheduler, "clock": clock}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan())
    trainer.state.val_metrics = {}
    rank0 = idist.get_rank() == 0
    if rank0:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out})

    saver = DiskSaver(run_dir / CHECKPOINT_DIR, require_empty=False, atomic=True) if rank0 else None
    latest = Checkpoint(to_save, saver, filename_prefix=LATEST_PREFIX, n_saved=1,
                        global_step_transform=lambda e, _: e.state.iteration) if rank0 else None
    best = Checkpoint(to_save, saver, filename_prefix=BEST_PREFIX, n_saved=2,
                      score_function=lambda e: -e.state.val_metrics[best_key], score_name=f"neg_{best_key}",
                      global_step_transform=lambda e, _: e.state.iteration) if rank0 else None

    @trainer.on(Events.ITERATION_STARTED)
    def _tick(engine: Engine) -> None:
        clock.start()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tock(engine: Engine) -> None:
        clock.stop("train")
        limit = config["train"]["max_minutes"]
        if limit and clock.train_seconds >= 60 * limit:
            logger.info("training time budget of %.1f min reached at iteration %d", limit, engine.state.iteration)
            engine.terminate()

    def run_validation(engine: Engine) -> None:
        start = time.perf_counter()
        metrics = validate(engine)
        clock.val_seconds += time.perf_counter() - start
        metrics["val_time_fraction"] = clock.val_fraction
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        metrics["_iteration"] = engine.state.iteration
        engine.state.val_metrics = metrics
        logger.info("validation at iteration %d (epoch %d, lr %.3g): %s", engine.state.iteration, engine.state.epoch,
                    optimizer.param_groups[0]["lr"], shown)
        cap = config["val"].get("max_fraction", 0.1)
        if clock.val_fraction > cap and engine.state.iteration > config["val"]["every"]:
            logger.warning("validation has taken %.0f%% of wall time (target <= %.0f%%): raise val.every or "
                           "lower the validation sample size", 100 * clock.val_fraction, 100 * cap)
        if rank0:
            value = metrics.get(best_key)
            if _finite(value):
                best(engine)
            else:
                logger.warning("validation %s is %r: not considered for the best checkpoints", best_key, value)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=config["val"]["every"]), run_validation)
    if rank0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=config["run"]["checkpoint_every"]), latest)

    @trainer.on(Events.COMPLETED)
    def _finish(engine: Engine) -> None:
        if engine.state.val_metrics.get("_iteration") != engine.state.iteration:
            run_validation(engine)
        if rank0:
            latest(engine)
            summary = {"iteration": engine.state.iteration, "epoch": engine.state.epoch,
                       "world_size": idist.get_world_size(),
                       "lr": optimizer.param_groups[0]["lr"], "train_minutes": clock.train_seconds / 60,
                       "val_minutes": clock.val_seconds / 60, "val_time_fraction": clock.val_fraction,
                       "best_checkpoints": [str(run_dir / CHECKPOINT_DIR / item.filename) for item in best._saved],
                       "val": {k: v for k, v in engine.state.val_metrics.items() if not k.startswith("_")}}
            with open(run_dir / METRICS_FILE, "w") as handle:
                json.dump(summary, handle, indent=2)
            logger.info("run finished: %s", run_dir / METRICS_FILE)

    if resume_from is not None:
        load_checkpoint(resume_from, to_save)
        logger.info("resumed from %s at iteration %d (epoch %d), learning rate %.6g", resume_from,
                    trainer.state.iteration, trainer.state.epoch, optimizer.param_groups[0]["lr"])
    _attach_tensorboard(trainer, run_dir, optimizer)
    return clock


def _attach_tensorboard(trainer: Engine, run_dir: Path, optimizer: torch.optim.Optimizer) -> None:
    """TensorBoard logging when a backend is installed; never required."""
    if idist.get_rank() != 0:
        return
    try:
        from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler, TensorboardLogger
        tb = TensorboardLogger(log_dir=run_dir / "tensorboard")
    except (ImportError, ModuleNotFoundError, RuntimeError):
        return
    tb.attach(trainer, OutputHandler(tag="train", output_transform=lambda loss: {"loss": loss}),
              Events.ITERATION_COMPLETED(every=50))
    tb.attach(trainer, OptimizerParamsHandler(optimizer), Events.EPOCH_STARTED)
    trainer.add_event_handler(Events.COMPLETED, lambda _: tb.close())


def start_run(config: dict, val_size: int):
    """The prologue of every trainer: run folder, logging, seed, device, data.

    Returns ``(run_dir, resume_checkpoint, device, train_set, val_set, train_loader)``, the
    validation set cut to a fixed subset of ``val_size`` galaxies.
    """
    run_dir, resume = prepare_run(config)
    setup_logging(run_dir)
    manual_seed(config["run"]["seed"] + idist.get_rank())
    survey = load_survey(config)
    train_set, val_set = datasets(config, survey)
    val_set = subset(val_set, val_size, seed=config["run"]["seed"])
    return run_dir, resume, idist.device(), train_set, val_set, train_loader(config, train_set)


def launch(run: Callable[[int, dict], None], params: Path, argv) -> None:
    """Entry point of a trainer: resolve the configuration, then ``run(local_rank, config)`` in one
    process or in each process of a torchrun / ignite.distributed launch."""
    config = load_config(params, argv)
    keep_freed_memory()
    backend = None if config["run"]["backend"] == "none" else config["run"]["backend"]
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(run, config)


def run_training(trainer: Engine, loader, config: dict) -> None:
    """Run to ``train.max_iters`` (when set) or ``train.max_epochs``, continuing a resumed state."""
    max_iters = config["train"]["max_iters"] or None
    max_epochs = None if max_iters else config["train"]["max_epochs"]
    state = trainer.state
    if state.iteration:  # resumed: the configured budget decides, whatever the checkpoint's was
        if (max_iters and state.iteration >= max_iters) or (max_epochs and state.epoch >= max_epochs):
            logger.info("checkpoint is already at iteration %d (epoch %d): nothing left to train",
                        state.iteration, state.epoch)
            return
        state.max_iters, state.max_epochs = max_iters, max_epochs
        trainer.run(loader)
    else:
        trainer.run(loader, max_epochs=max_epochs, max_iters=max_iters)
