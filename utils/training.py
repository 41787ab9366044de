"""Ignite wiring shared by both trainers: run folders, data, checkpoints, resume, logging.

Written once here; ``train_contrastive.py`` and ``train_generative.py`` only define their
models, their training step and their validation. Checkpoint files themselves belong to
:mod:`utils.checkpoints`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EMAHandler, LRScheduler, PiecewiseLinear, ProgressBar
from ignite.utils import manual_seed
from torch.optim.lr_scheduler import ExponentialLR
from torch.utils.data.distributed import DistributedSampler

from utils.checkpoints import (
    BEST_PREFIX,
    CHECKPOINT_DIR,
    LATEST_PREFIX,
    METRICS_FILE,
    RUN_INFO_KEY,
    NonFiniteError,
    RunInfo,
    SafeDiskSaver,
    adopt_saved,
    find_checkpoint,
    load_checkpoint,
    prepare_run,
    release_run_folder,
    write_json,
)
from utils.config import load_config
from utils.data.dataset import SpectraDataset
from utils.data.survey import configured_dataset, load_survey, stage_of, subset
from utils.errors import Interrupted, UserError
from utils.runtime import keep_freed_memory

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# run folder and logging
# --------------------------------------------------------------------------------------------
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
def datasets(config: dict, survey) -> tuple[SpectraDataset, SpectraDataset]:
    """Train (augmented) and validation (centre-cropped) datasets of the configured stage."""
    stage = stage_of(config["model"])
    train = configured_dataset(survey, "train", config["data"], train=True, stage=stage)
    val = configured_dataset(survey, "val", config["data"], stage=stage)
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


def attach_ema(trainer: Engine, model: torch.nn.Module, decay: float) -> EMAHandler:
    """Polyak average of ``model``'s weights, updated after every iteration:
    ema <- decay * ema + (1 - decay) * weights (Ignite's EMAHandler with momentum 1 - decay)."""
    ema = EMAHandler(model, momentum=1.0 - decay)
    ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
    return ema


def attach_lr_decay(trainer: Engine, optimizer: torch.optim.Optimizer, decay: float, epoch_length: int
                    ) -> LRScheduler:
    """Learning rate x ``decay`` at the end of every epoch. Stepped on the epoch's last
    ITERATION_COMPLETED (before that iteration's checkpoint), so that a checkpoint taken at the end
    of an epoch already holds the decayed rate and a resume from it decays exactly like an
    uninterrupted run."""
    scheduler = LRScheduler(ExponentialLR(optimizer, gamma=decay))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=epoch_length), scheduler)
    return scheduler


#: where the 'linear' learning-rate schedule ends (SPEC 5: the ApJ's decay to 1e-6)
LINEAR_LR_END = 1e-6


def attach_linear_decay(trainer: Engine, optimizer: torch.optim.Optimizer, total_iterations: int) -> PiecewiseLinear:
    """Learning rate from its start value down linearly to :data:`LINEAR_LR_END` at iteration
    ``total_iterations`` (Ignite's PiecewiseLinear, set after each iteration for the next one, so
    that checkpoints and resumes see the rate the next step uses)."""
    start = optimizer.param_groups[0]["lr"]
    scheduler = PiecewiseLinear(optimizer, "lr", milestones_values=[(0, start),
                                                                    (max(total_iterations, 1), LINEAR_LR_END)])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, scheduler)
    return scheduler


def attach_budget(trainer: Engine, clock: TrainClock, max_minutes: float) -> None:
    """Count training wall time in ``clock``; stop after ``max_minutes`` of it (0: no limit)."""

    @trainer.on(Events.ITERATION_STARTED)
    def _tick(engine: Engine) -> None:
        clock.start()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tock(engine: Engine) -> None:
        clock.stop("train")
        if max_minutes and clock.train_seconds >= 60 * max_minutes:
            logger.info("training time budget of %.1f min reached at iteration %d", max_minutes,
                        engine.state.iteration)
            engine.terminate()


def attach_non_finite_stop(trainer: Engine, checkpoint_dir: Path) -> None:
    """Stop with :class:`NonFiniteError` (exit code 1) when the loss is NaN or inf, before any
    handler attached later (validation, checkpoints) sees the iteration."""

    @trainer.on(Events.ITERATION_COMPLETED)
    def _check(engine: Engine) -> None:
        loss = engine.state.output
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            raise NonFiniteError(f"training loss is {loss} at iteration {engine.state.iteration} (epoch "
                                 f"{engine.state.epoch}): run stopped; its finite checkpoints in '{checkpoint_dir}' "
                                 f"are kept (resume from one with a lower train.lr)")


def attach_sampler_epochs(trainer: Engine, loader) -> None:
    """Tell a DistributedSampler the epoch, so that every epoch is shuffled anew (torchrun)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))


def create_checkpointers(run_dir: Path, to_save: dict[str, Any], best_key: str
                         ) -> tuple[Checkpoint | None, Checkpoint | None]:
    """The 'latest' checkpoint (one kept) and the 2 'best' by ``best_key`` (lower is better), on
    rank 0; (None, None) on the other ranks."""
    if idist.get_rank() != 0:
        return None, None
    saver = SafeDiskSaver(run_dir / CHECKPOINT_DIR)
    step = lambda engine, _: engine.state.iteration  # noqa: E731
    latest = Checkpoint(to_save, saver, filename_prefix=LATEST_PREFIX, n_saved=1, global_step_transform=step)
    best = Checkpoint(to_save, saver, filename_prefix=BEST_PREFIX, n_saved=2,
                      score_function=lambda engine: -engine.state.val_metrics[best_key],
                      score_name=f"neg_{best_key}", global_step_transform=step)
    return latest, best


#: validation taking more than this share of wall time is warned about (SPEC 6: the research code's
#: validation cost 24 times the training between two validations)
VAL_MAX_FRACTION = 0.1


def create_validation(trainer: Engine, *, validate: Callable[[Engine], dict[str, float]], clock: TrainClock,
                      best: Checkpoint | None, best_key: str, optimizer: torch.optim.Optimizer, every: int
                      ) -> Callable[[Engine], None]:
    """The validation handler: ``validate(trainer)`` on rank 0 (the other ranks receive its
    metrics), logged, kept in ``trainer.state.val_metrics``, offered to the best checkpoints.
    A non-finite ``best_key`` stops the run with :class:`NonFiniteError`; validation that takes more
    than :data:`VAL_MAX_FRACTION` of the wall time is warned about."""
    rank0, world = idist.get_rank() == 0, idist.get_world_size()

    def run_validation(engine: Engine) -> None:
        start = time.perf_counter()
        metrics = validate(engine) if rank0 else {}
        if world > 1:
            metrics = json.loads(idist.broadcast(json.dumps(metrics) if rank0 else "", src=0, safe_mode=True))
        clock.val_seconds += time.perf_counter() - start
        metrics["val_time_fraction"] = clock.val_fraction
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        metrics["_iteration"] = engine.state.iteration
        engine.state.val_metrics = metrics
        logger.info("validation at iteration %d (epoch %d, lr %.3g): %s", engine.state.iteration, engine.state.epoch,
                    optimizer.param_groups[0]["lr"], shown)
        if clock.val_fraction > VAL_MAX_FRACTION and engine.state.iteration > every:
            logger.warning("validation has taken %.0f%% of wall time (target <= %.0f%%): raise val.every or "
                           "lower the validation sample size", 100 * clock.val_fraction, 100 * VAL_MAX_FRACTION)
        value = metrics.get(best_key)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise NonFiniteError(f"validation {best_key} is {value} at iteration {engine.state.iteration}: run "
                                 f"stopped; its finite checkpoints are kept")
        if best is not None:
            best(engine)

    return run_validation


def attach_training(trainer: Engine, *, config: dict, kind: str, run_dir: Path, optimizer: torch.optim.Optimizer,
                    to_save: dict[str, Any], validate: Callable[[Engine], dict[str, float]], best_key: str,
                    resume_from: Path | None, loader, run_extras: dict | None = None) -> TrainClock:
    """Attach the handlers every trainer needs, in this order on each iteration: time budget,
    non-finite loss stop, learning-rate decay at epoch ends, validation every ``val.every``
    iterations, the 'latest' checkpoint every ``run.checkpoint_every``; at the end validation (if
    not just done), a last checkpoint and ``metrics.json``. Resumes from ``resume_from`` (model,
    optimizer, scheduler, engine, clock, and the checkpoint handlers' files). ``loader`` sets the
    epoch length (and its DistributedSampler is told each epoch). ``kind`` ('contrastive' or
    'generative'), the configuration and ``run_extras`` (the trainers': the training grid,
    utils.checkpoints.GRID_KEY) are saved in every checkpoint."""
    clock = TrainClock()
    attach_budget(trainer, clock, config["train"]["max_minutes"])
    attach_non_finite_stop(trainer, run_dir / CHECKPOINT_DIR)
    t = config["train"]
    if t["lr_schedule"] == "linear":
        scheduler = attach_linear_decay(trainer, optimizer, t["max_iters"] or t["max_epochs"] * len(loader))
    else:
        scheduler = attach_lr_decay(trainer, optimizer, t["lr_decay"], len(loader))
    attach_sampler_epochs(trainer, loader)
    to_save = {**to_save, "trainer": trainer, "lr_scheduler": scheduler, "clock": clock,
               RUN_INFO_KEY: RunInfo(kind, config, run_extras)}
    trainer.state.val_metrics = {}
    rank0 = idist.get_rank() == 0
    if rank0:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out})
    latest, best = create_checkpointers(run_dir, to_save, best_key)
    run_validation = create_validation(trainer, validate=validate, clock=clock, best=best, best_key=best_key,
                                       optimizer=optimizer, every=config["val"]["every"])
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=config["val"]["every"]), run_validation)
    if latest is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=config["run"]["checkpoint_every"]), latest)

    @trainer.on(Events.COMPLETED)
    def _finish(engine: Engine) -> None:
        if engine.state.val_metrics.get("_iteration") != engine.state.iteration:
            run_validation(engine)
        if latest is not None:
            latest(engine)
            summary = {"iteration": engine.state.iteration, "epoch": engine.state.epoch,
                       "world_size": idist.get_world_size(), "kind": kind,
                       "lr": optimizer.param_groups[0]["lr"], "train_minutes": clock.train_seconds / 60,
                       "val_minutes": clock.val_seconds / 60, "val_time_fraction": clock.val_fraction,
                       "best_checkpoints": [str(run_dir / CHECKPOINT_DIR / item.filename) for item in best._saved],
                       "val": {k: v for k, v in engine.state.val_metrics.items() if not k.startswith("_")}}
            write_json(run_dir / METRICS_FILE, summary)
            logger.info("run finished: %s", run_dir / METRICS_FILE)
            release_run_folder(run_dir)

    if resume_from is not None:
        load_checkpoint(resume_from, to_save)
        if latest is not None:
            adopt_saved(latest, run_dir / CHECKPOINT_DIR, LATEST_PREFIX)
            adopt_saved(best, run_dir / CHECKPOINT_DIR, BEST_PREFIX)
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


@dataclass
class RunStart:
    """What every trainer starts from (see :func:`start_run`)."""

    run_dir: Path
    resume: Path | None
    device: torch.device
    train_set: SpectraDataset
    val_set: SpectraDataset
    loader: Any


def start_run(config: dict, val_size: int, kind: str) -> RunStart:
    """The prologue of every trainer: seed, data, then run folder and logging, device; the
    validation set cut to a fixed subset of ``val_size`` galaxies. The data are opened first, so
    that a dataset the run cannot use is refused before a run folder is made."""
    manual_seed(config["run"]["seed"] + idist.get_rank())
    survey = load_survey(config["data"])
    train_set, val_set = datasets(config, survey)
    val_set = subset(val_set, val_size, seed=config["run"]["seed"])
    loader = train_loader(config, train_set)
    run_dir, resume = prepare_run(config, kind)
    setup_logging(run_dir)
    return RunStart(run_dir, resume, idist.device(), train_set, val_set, loader)


def launch(run: Callable[[int, dict], None], kind: str, argv) -> None:
    """Entry point of a trainer: resolve the ``kind`` configuration, then ``run(local_rank, config)``
    in one process or in each process of a torchrun / ignite.distributed launch."""
    config = load_config(kind, argv)
    keep_freed_memory()
    backend = None if config["run"]["backend"] == "none" else config["run"]["backend"]
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(run, config)


def run_training(trainer: Engine, loader, config: dict, run_dir: Path | None = None) -> None:
    """Run to ``train.max_iters`` (when set) or ``train.max_epochs``, continuing a resumed state.
    Ctrl-C stops it with :class:`Interrupted`, which names the last checkpoint of ``run_dir`` and
    the ``run.resume`` that continues from it (the files on disk are left as they are)."""
    max_iters = config["train"]["max_iters"] or None
    max_epochs = None if max_iters else config["train"]["max_epochs"]
    state = trainer.state
    try:
        if state.iteration:  # resumed: the configured budget decides, whatever the checkpoint's was
            if (max_iters and state.iteration >= max_iters) or (max_epochs and state.epoch >= max_epochs):
                logger.info("checkpoint is already at iteration %d (epoch %d): nothing left to train; finishing the "
                            "run (validation, metrics.json)", state.iteration, state.epoch)
                trainer.fire_event(Events.COMPLETED)
                return
            state.max_iters, state.max_epochs = max_iters, max_epochs
            trainer.run(loader)
        else:
            trainer.run(loader, max_epochs=max_epochs, max_iters=max_iters)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(trainer.state, run_dir)) from None


def interrupted_message(state, run_dir: Path | None) -> str:
    """What Ctrl-C left: the iteration it stopped at, the newest checkpoint, how to continue."""
    where = f"training interrupted at iteration {state.iteration} (epoch {state.epoch})"
    if run_dir is None:
        return where
    try:
        last = find_checkpoint(run_dir)
    except UserError:
        return f"{where}; no checkpoint was saved yet in '{run_dir}' (run.checkpoint_every)"
    return f"{where}; newest checkpoint '{last}'; continue with run.resume={run_dir}"
