"""Faults injected into training runs: kills around checkpoints, NaN, resume, stale files, bad
resume targets, bad configuration values, a foreign ``<root>.partial``."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from conftest import ROOT, tiny_contrastive_args
from utils import checkpoints
from utils.checkpoints import (
    CHECKPOINT_DIR,
    INDEX_FILE,
    LOCK_FILE,
    RUN_INFO_KEY,
    CheckpointError,
    NonFiniteError,
    SafeDiskSaver,
    find_checkpoint,
    prepare_run,
    read_checkpoint,
    read_index,
    release_run_folder,
)
from utils.config import ConfigError, load_config
from utils.errors import Interrupted
from utils.training import attach_training, run_training

EPOCH = 4  # iterations per epoch of the toy runs


def toy_run(run_dir: Path, overrides: list[str], *, resume: Path | None = None, losses=None, scores=None,
            max_iters: int = 12):
    """A toy trainer on the project's wiring: a linear model, 4 iterations per epoch, learning-rate
    decay 0.5 per epoch. ``losses``/``scores`` override the training loss and validation score by
    iteration. Returns (trainer, model, optimizer)."""
    config = load_config("contrastive", ["train.lr=1.0", "train.lr_decay=0.5", f"train.max_iters={max_iters}",
                                       "run.checkpoint_every=2", "val.every=2", *overrides])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = [torch.randn(8, 3) for _ in range(EPOCH)]

    def step(engine, x):
        loss = model(x).square().mean() * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        if losses and engine.state.iteration in losses:
            with torch.no_grad():
                model.weight.fill_(losses[engine.state.iteration])
            return losses[engine.state.iteration]
        return loss.item()

    def validate(engine):
        score = (scores or {}).get(engine.state.iteration, 1.0 / engine.state.iteration)
        return {"loss": score}

    trainer = Engine(step)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    attach_training(trainer, config=config, kind="contrastive", run_dir=run_dir, optimizer=opt,
                    to_save={"model": model, "optimizer": opt}, validate=validate, best_key="loss",
                    resume_from=resume, loader=data)
    return trainer, model, opt, data, config


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.pt"))


def test_resume_from_end_of_epoch_checkpoint_keeps_the_lr_schedule(tmp_path):
    """Killed right after the checkpoint at the end of epoch 2, resumed: the final learning rate,
    weights and iteration are those of an uninterrupted run."""
    whole, model_a, opt_a, data, config = toy_run(tmp_path / "a", [])
    run_training(whole, data, config)
    killed, _, _, data, config = toy_run(tmp_path / "b", [], max_iters=8)
    run_training(killed, data, config)
    (tmp_path / "b" / "metrics.json").unlink()  # as if killed before the end
    ckpt = tmp_path / "b" / CHECKPOINT_DIR / "latest_checkpoint_8.pt"
    assert read_checkpoint(ckpt)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.25)
    resumed, model_b, opt_b, data, config = toy_run(tmp_path / "b", [], resume=ckpt)
    run_training(resumed, data, config)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"]) == pytest.approx(0.125)
    assert resumed.state.iteration == whole.state.iteration == 12
    assert torch.allclose(model_a.weight, model_b.weight)


def test_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path):
    trainer, _, _, data, config = toy_run(tmp_path, [], max_iters=4)
    run_training(trainer, data, config)
    (tmp_path / "metrics.json").unlink()
    resumed, _, _, data, config = toy_run(tmp_path, [], resume=tmp_path / CHECKPOINT_DIR / "latest_checkpoint_4.pt",
                                          max_iters=4)
    run_training(resumed, data, config)
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 4


def test_old_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    """The 'latest' file is replaced only once the new one is complete: a save that dies leaves
    the previous checkpoint, loadable, and no temporary file after the next start."""
    trainer, _, _, data, config = toy_run(tmp_path, [], max_iters=8)
    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # latest at iteration 4 (after latest 2 and the two best saves)
            f.write(b"partial")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Interrupted, match="interrupted at iteration 4"):  # Ctrl-C as the trainer reports it
        run_training(trainer, data, config)
    monkeypatch.undo()
    assert "latest_checkpoint_2.pt" in checkpoint_files(tmp_path)
    assert read_checkpoint(tmp_path / CHECKPOINT_DIR / "latest_checkpoint_2.pt")["trainer"]["iteration"] == 2
    (tmp_path / CHECKPOINT_DIR / "tmpkilled").write_bytes(b"left by a kill -9")
    config["run"]["resume"] = str(tmp_path)
    config["run"]["out_dir"] = str(tmp_path.parent)
    (tmp_path / "config.yml").write_text("")
    prepare_run(config, "contrastive")
    assert not (tmp_path / CHECKPOINT_DIR / "tmpkilled").exists()


def test_resumed_runs_do_not_pile_up_checkpoints(tmp_path):
    trainer, _, _, data, config = toy_run(tmp_path, [], max_iters=6)
    run_training(trainer, data, config)
    for stop in (10, 14):
        resumed, _, _, data, config = toy_run(tmp_path, [], resume=find_checkpoint(tmp_path), max_iters=stop)
        run_training(resumed, data, config)
    files = checkpoint_files(tmp_path)
    assert [f for f in files if f.startswith("latest")] == ["latest_checkpoint_14.pt"]
    assert len([f for f in files if f.startswith("best")]) == 2
    assert set(read_index(tmp_path / CHECKPOINT_DIR)) == set(files)


def test_nan_loss_stops_with_an_error_and_keeps_the_finite_checkpoint(tmp_path):
    trainer, _, _, data, config = toy_run(tmp_path, [], losses={5: float("nan")})
    with pytest.raises(NonFiniteError, match="training loss is nan at iteration 5"):
        run_training(trainer, data, config)
    files = checkpoint_files(tmp_path)
    assert "latest_checkpoint_4.pt" in files
    assert not (tmp_path / "metrics.json").exists()
    for name in files:
        state = read_checkpoint(tmp_path / CHECKPOINT_DIR / name)
        assert torch.isfinite(state["model"]["weight"]).all()


def test_nan_validation_stops_and_is_never_best(tmp_path):
    trainer, _, _, data, config = toy_run(tmp_path, [], scores={2: 2.0, 4: 1.0, 6: float("nan")})
    with pytest.raises(NonFiniteError, match="validation loss is nan at iteration 6"):
        run_training(trainer, data, config)
    best = sorted(f for f in checkpoint_files(tmp_path) if f.startswith("best"))
    assert best == ["best_checkpoint_2_neg_loss=-2.0000.pt", "best_checkpoint_4_neg_loss=-1.0000.pt"]
    json.loads((tmp_path / CHECKPOINT_DIR / INDEX_FILE).read_text())  # valid JSON


def test_non_finite_weights_are_never_written(tmp_path):
    saver = SafeDiskSaver(tmp_path)
    saver({"model": {"w": torch.ones(3)}, "trainer": {"iteration": 1}}, "latest_checkpoint_1.pt")
    saver.remove("latest_checkpoint_1.pt")
    with pytest.raises(NonFiniteError, match="model.w"):
        saver({"model": {"w": torch.tensor([1.0, float("inf")])}, "trainer": {"iteration": 2}},
              "latest_checkpoint_2.pt")
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["latest_checkpoint_1.pt"]


def test_bad_resume_targets_are_rejected_before_anything_is_written(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "flux.npy").write_bytes(b"\x93NUMPY")
    foreign = dataset / "weights.pt"
    torch.save({"model": {}}, foreign)
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    (run / "config.yml").write_text("")
    other_kind = run / CHECKPOINT_DIR / "latest_checkpoint_1.pt"
    torch.save({RUN_INFO_KEY: {"kind": "contrastive", "config": {}}}, other_kind)
    config = load_config("generative", [])
    # the right kind, but another network width and band set than this run's (the learning rate may change)
    other_model = run / CHECKPOINT_DIR / "latest_checkpoint_2.pt"
    trained = load_config("generative", ["model.width=32", "data.image=ugriz", "train.lr=1",
                                                           "model.grad_checkpoint=true"])
    torch.save({RUN_INFO_KEY: {"kind": "generative", "config": trained}}, other_model)
    assert checkpoints.resume_mismatches(trained, config) == [
        "data.image (checkpoint 'ugriz', this run 'gri')", "model.width (checkpoint 32, this run 64)"]
    for target, message in ((dataset / "flux.npy", "cannot be read"), (foreign, "not written by this project"),
                            (other_kind, "is a contrastive checkpoint, expected a generative one"),
                            (other_model, r"trained with other settings: data.image \(checkpoint 'ugriz', this run "
                                          r"'gri'\); model.width \(checkpoint 32, this run 64\)")):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        config["run"]["resume"] = str(target)
        with pytest.raises(CheckpointError, match=message):
            prepare_run(config, "generative")
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_weights_that_do_not_fit_the_model_are_named(tmp_path):
    """A checkpoint whose saved settings cannot tell (an older version's) still fails in one line."""
    path = tmp_path / "latest_checkpoint_1.pt"
    torch.save({"model": torch.nn.Linear(3, 3).state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"'{path}' does not fit this configuration .*size mismatch"):
        checkpoints.load_checkpoint(path, {"model": torch.nn.Linear(2, 2)})


def test_a_run_folder_in_use_is_refused_and_a_dead_trainers_lock_taken_over(tmp_path, caplog):
    """A resume started while another trainer still works in the run folder stops before it writes
    or sweeps anything; once that trainer is gone its lock is taken over, and released at the end."""
    run = tmp_path / "run"
    trainer, _, _, data, config = toy_run(run, [], max_iters=4)
    run_training(trainer, data, config)
    (run / "config.yml").write_text("")  # toy_run makes no config.yml; a trainer's run folder has one
    (run / CHECKPOINT_DIR / "tmp_save_in_progress").write_bytes(b"x")  # what the other trainer is writing
    config = load_config("contrastive", [f"run.resume={run}"])
    lock = run / LOCK_FILE
    host = socket.gethostname()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for holder, message in (({"pid": other.pid, "host": host, "since": "then"}, rf"in use by process {other.pid}"),
                                ({"pid": 1234, "host": host + "-elsewhere", "since": "then"}, "delete that file")):
            lock.write_text(json.dumps(holder))
            before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
            with pytest.raises(CheckpointError, match=message):
                prepare_run(config, "contrastive")
            assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before
            assert json.loads(lock.read_text()) == holder
    finally:
        other.kill()
        other.wait()
    lock.write_text("{")  # unreadable and new: another trainer is writing it this instant
    with pytest.raises(CheckpointError, match="being claimed"):
        prepare_run(config, "contrastive")
    assert lock.read_text() == "{"
    os.utime(lock, (0, 0))  # unreadable and old: left by a trainer killed while writing it
    assert prepare_run(config, "contrastive")[0] == run
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": other.pid, "host": host, "since": "then"}))  # its process is gone now
    with caplog.at_level(logging.WARNING):
        run_dir, checkpoint = prepare_run(config, "contrastive")
    assert run_dir == run
    assert checkpoint is not None
    assert "no longer runs" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (run / CHECKPOINT_DIR / "tmp_save_in_progress").exists()  # swept only once the folder is ours
    assert prepare_run(config, "contrastive")[0] == run  # this process's own claim stands
    release_run_folder(run)
    assert not lock.exists()


@pytest.mark.slow
def test_ctrl_c_stops_training_with_one_line_naming_how_to_resume(tiny_mock, tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: exit code 130, no traceback, the newest
    checkpoint and the run.resume that continues from it named, the folder's lock released."""
    import signal
    import time

    out = tmp_path / "runs"
    args = tiny_contrastive_args(tiny_mock, out) + ["train.max_iters=100000", "val.every=100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a pipe: progress bars must not block the child
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_contrastive.py"), *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob(f"*/{CHECKPOINT_DIR}/*.pt")) and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
                time.sleep(0.2)
            time.sleep(1.0)  # some more iterations
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    run = next(out.iterdir())
    message = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1, stderr[-2000:]
    newest = find_checkpoint(run)
    assert message[0].startswith("error: training interrupted at iteration ")
    assert f"newest checkpoint '{newest}'; continue with run.resume={run}" in message[0]
    assert not (run / LOCK_FILE).exists()
    saved_at = read_checkpoint(newest)["trainer"]["iteration"]
    stopped_at = int(message[0].split("iteration ")[1].split()[0])
    assert 2 <= saved_at <= stopped_at


def test_ctrl_c_during_a_save_waits_for_the_save(tmp_path):
    """A SIGINT that arrives while a checkpoint is written is held until the file is complete,
    then raised; where SIGINT is ignored (a background job) nothing is raised."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    saver = SafeDiskSaver(tmp_path)
    real_save = torch.save

    def save_receiving_ctrl_c(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        return real_save(obj, f, *args, **kwargs)

    try:
        torch.save = save_receiving_ctrl_c
        with pytest.raises(KeyboardInterrupt):
            saver({"model": {"w": torch.ones(3)}, "trainer": {"iteration": 1}}, "latest_checkpoint_1.pt")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        saver({"model": {"w": torch.ones(3)}, "trainer": {"iteration": 2}}, "latest_checkpoint_2.pt")
    finally:
        torch.save = real_save
        signal.signal(signal.SIGINT, previous)
    assert read_checkpoint(tmp_path / "latest_checkpoint_1.pt")["trainer"]["iteration"] == 1  # complete
    assert read_index(tmp_path)["latest_checkpoint_1.pt"]["iteration"] == 1
    assert read_checkpoint(tmp_path / "latest_checkpoint_2.pt")["trainer"]["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is previous


def test_interrupted_before_the_first_checkpoint_says_so(tmp_path):
    from ignite.engine import State

    from utils.training import interrupted_message
    state = State(iteration=1, epoch=1)
    assert interrupted_message(state, None) == "training interrupted at iteration 1 (epoch 1)"
    (tmp_path / CHECKPOINT_DIR).mkdir()
    assert "no checkpoint was saved yet" in interrupted_message(state, tmp_path)


def test_a_dataset_the_run_cannot_use_is_refused_before_a_run_folder_is_made(tiny_mock, tmp_path):
    from utils.errors import UserError
    from utils.training import start_run

    runs = tmp_path / "runs"
    base = [f"data.root={tiny_mock}", "data.source=folder", "data.num_workers=0", f"run.out_dir={runs}"]
    with pytest.raises(UserError, match=r"train split has \d+ objects, fewer than train.batch_size=1000"):
        start_run(load_config("contrastive", base + ["train.batch_size=1000"]), 4, "contrastive")
    with pytest.raises(UserError, match="does not exist"):
        start_run(load_config("contrastive", base + [f"data.root={tmp_path / 'no_survey'}"]), 4, "contrastive")
    assert not runs.exists()
    start = start_run(load_config("contrastive", base + ["train.batch_size=8"]), 4, "contrastive")
    assert start.run_dir.parent == runs
    assert 0 < len(start.val_set) <= 4
    release_run_folder(start.run_dir)


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path):
    """A file where run.out_dir or sampling.out_dir should be: one line naming the key and the
    path, and the file left as it was."""
    in_the_way = tmp_path / "outputs"
    in_the_way.write_text("not a folder")
    for where, key in ((in_the_way, "sampling.out_dir"), (in_the_way / "below", "run.out_dir")):
        with pytest.raises(CheckpointError, match=f"{key} '{where}' cannot be used as an output folder: "
                                                  f"{'it is a file' if where == in_the_way else 'Not a directory'}"):
            checkpoints.new_stamped_folder(where, key)
    assert in_the_way.read_text() == "not a folder"
    config = load_config("contrastive", [f"run.out_dir={in_the_way}"])
    with pytest.raises(CheckpointError, match="run.out_dir"):
        prepare_run(config, "contrastive")


def test_new_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "stamp_now", lambda: "20261127-120000")  # every start in one second
    (tmp_path / "runs" / "20261127-120000").mkdir(parents=True)  # e.g. a generate.py output of that second
    config = load_config("contrastive", [f"run.out_dir={tmp_path / 'runs'}"])
    folders = [prepare_run(config, "contrastive")[0] for _ in range(3)]
    assert [f.name for f in folders] == [f"20261127-120000-{n}" for n in (1, 2, 3)]
    assert all((f / LOCK_FILE).exists() for f in folders)
    assert checkpoints.new_stamped_folder(tmp_path / "runs").name == "20261127-120000-4"
    for folder in folders:
        release_run_folder(folder)
        assert not (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("override, message", [
    ("train.max_iters=-5", "expected >= 0"), ("train.batch_size=0", ">= 1"), ("train.lr=nan", "> 0"),
    ("val.every=0", ">= 1"), ("data.downsample=-2", ">= 1"), ("model.latent_dim=0", ">= 1"),
    ("train.lr_decay=0", "in (0, 1]"), ("train.temperature=0", "> 0"), ("run.checkpoint_every=0", ">= 1"),
])
def test_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("contrastive", [override])


@pytest.mark.parametrize("override, message", [
    ("sampling.top_k=0", ">= 1"), ("sampling.split=everything", "one of 'train', 'val', 'test'"),
    ("sampling.top_k=30", "at most sampling.n_samples"), ("model.attn_levels=[5]", "1..4"),
    ("train.ema_decay=1", "in [0, 1)"), ("sampling.n_samples=0", ">= 1"), ("model.mults=[1, 0]", ">= 1"),
])
def test_generative_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("generative", [override])


def test_a_foreign_partial_folder_is_never_deleted(tmp_path):
    import numpy as np

    from utils.data.dataset import DataError, DatasetWriter

    mine = tmp_path / "survey.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own files")
    with pytest.raises(DataError, match="was not left by an interrupted dataset write"):
        DatasetWriter(tmp_path / "survey", 4, np.arange(10.0))
    assert (mine / "notes.txt").read_text() == "the user's own files"
    DatasetWriter(tmp_path / "other", 4, np.arange(10.0))  # interrupted: redone without asking
    assert DatasetWriter(tmp_path / "other", 4, np.arange(10.0)).tmp.is_dir()


def test_nan_embeddings_rank_last_not_first():
    from models.contrastive import retrieval_metrics

    z = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    perfect = retrieval_metrics(z, z, 8)
    broken = retrieval_metrics(torch.full((8, 4), float("nan")), z, 8)
    assert perfect["top1_batch"] == 1.0
    assert broken["top1_batch"] == 0.0
    assert broken["median_rank"] == 8


def _distributed_worker(local_rank: int, out_dir: str) -> None:
    """One rank of a 2-process gloo run of the project's wiring on a 16-item dataset."""
    import ignite.distributed as idist
    from torch.utils.data import TensorDataset

    from utils.training import TrainClock, attach_sampler_epochs, create_validation, train_loader

    config = load_config("contrastive", ["train.batch_size=4", "data.num_workers=0"])
    loader = train_loader(config, TensorDataset(torch.arange(16)))
    trainer = Engine(lambda engine, batch: batch[0].tolist())
    seen: dict[int, list[int]] = {}
    calls = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.setdefault(e.state.epoch, []).extend(e.state.output))
    attach_sampler_epochs(trainer, loader)
    model = torch.nn.Linear(1, 1)
    validation = create_validation(trainer, validate=lambda e: calls.append(1) or {"loss": 0.5 + idist.get_rank()},
                                   clock=TrainClock(), best=None, best_key="loss",
                                   optimizer=torch.optim.SGD(model.parameters(), 0.1), every=1)
    trainer.run(loader, max_epochs=3)
    validation(trainer)
    result = {"seen": seen, "calls": len(calls), "val": trainer.state.val_metrics["loss"]}
    Path(out_dir, f"rank{idist.get_rank()}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_torchrun_reshuffles_every_epoch_and_validates_once(tmp_path):
    import ignite.distributed as idist

    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=29533) as parallel:
        parallel.run(_distributed_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("1", "2", "3"):  # like one process: every epoch is a permutation of the dataset
        assert sorted(ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]) == list(range(16))
    assert ranks[0]["seen"]["1"] != ranks[0]["seen"]["2"] != ranks[0]["seen"]["3"]
    assert [r["calls"] for r in ranks] == [1, 0]
    assert ranks[0]["val"] == ranks[1]["val"] == 0.5


def test_a_checkpoint_of_a_setting_no_longer_built_is_refused_by_name():
    """A network trained with a retired model key at a value this code cannot build is refused,
    naming the key; at the value it builds, the key is dropped and the rest kept."""
    from utils.checkpoints import CheckpointError, upgrade_config

    saved = {"model": {"width": 8, "head_dim": 32}, "val": {"max_objects": 10}}
    config = upgrade_config(saved, "generative", "diffusion model 'x.pt'")
    assert config["model"]["width"] == 8 and "head_dim" not in config["model"]
    assert config["val"]["n_objects"] == 10  # a renamed key under its new name
    with pytest.raises(CheckpointError, match="trained with model.head_dim=16, a setting this version no longer"):
        upgrade_config({"model": {"head_dim": 16}}, "generative", "diffusion model 'x.pt'")


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys):
    from utils.errors import cli

    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        cli(main)
    assert stop.value.code == Interrupted.exit_code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
