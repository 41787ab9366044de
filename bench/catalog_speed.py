"""Catalogue prediction at survey scale: throughput, memory against catalogue size, and kill -9
trials that must end in the uninterrupted output.

    python bench/catalog_speed.py [--root data/mock] [--throughput 400] [--memory 2000 20000]
                                  [--trials 5] [--trial-galaxies 300] [--out bench/catalog_speed.json]
                                  [--preset quick] [key=value ...]

Catalogues of images only are made from the mock survey's gri images (``--root``; galaxies
repeated under new ids where more are asked for than it has), written as datasets of images only.
The models are generate.py's (the newest finished runs, or ``sampling.*_run``); the settings
those of ``--preset`` and ``key=value`` (default: the quickstart's, ``--preset quick``).

1. Throughput: generate.py on ``--throughput`` galaxies with the configuration's sampler; galaxies
   and spectra per second, wall time of the whole command.
2. Memory: the peak resident memory (``/usr/bin/time``) of generate.py on each catalogue size of
   ``--memory``, with a cheap sampler (``--memory-samples`` samples of ``--memory-steps`` DDIM steps:
   what is measured is how memory grows with the catalogue, not the sampler); the shards bound it.
3. Kills: an uninterrupted run on ``--trial-galaxies`` galaxies (shards of 50), then ``--trials``
   runs each killed with SIGKILL at a random moment between the uninterrupted run's first and last
   shard and rerun with the same command; each continued output must equal the uninterrupted one
   (catalogue and every shard's spectra, byte for byte).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from utils.data.dataset import DatasetWriter, open_survey

ROOT = Path(__file__).resolve().parents[1]


def images_only_catalogue(root: Path, n: int, out: Path) -> Path:
    """A dataset of images only of ``n`` galaxies from the survey at ``root`` (its gri images and
    magnitudes; beyond its size the galaxies repeat with new ids)."""
    survey = open_survey(root)
    rows = np.arange(n) % len(survey)
    repeat = np.arange(n) // len(survey)
    cat = survey.catalog
    table = Table({"objid": np.asarray(cat["objid"], np.int64)[rows] + repeat * 10 ** 10,
                   "ra": np.asarray(cat["ra"])[rows], "dec": np.asarray(cat["dec"])[rows],
                   "z": np.full(n, np.nan), **{f"mag_{b}": np.asarray(cat[f"mag_{b}"])[rows] for b in "ugriz"}})
    writer = DatasetWriter(out, n, None, images=("gri",), source="bench/catalog_speed.py")
    for start in range(0, n, 4096):
        writer.write(start, None, None, {"gri": np.asarray(survey.images["gri"][rows[start:start + 4096]])})
    return writer.finish(table)


def generate(args: list[str], timed: bool = False) -> tuple[subprocess.CompletedProcess, float, float | None]:
    """generate.py with ``args``: the process, its wall time and (``timed``) its peak memory in GB."""
    command = [sys.executable, str(ROOT / "generate.py"), *args]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"generate.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr) if timed else None
    return result, seconds, (int(peak.group(1)) / 1e6 if peak else None)


def newest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def contents(folder: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """An output's catalogue rows and every shard's SPECTRA data, as raw arrays to compare."""
    with fits.open(folder / "catalogue.fits") as hdus:
        catalogue = np.array(hdus["CATALOGUE"].data)
    spectra = []
    for path in sorted((folder / "shards").glob("shard-*.fits")):
        with fits.open(path) as hdus:
            spectra.append(np.array(hdus["SPECTRA"].data))
    return catalogue, spectra


def identical(a, b) -> bool:
    same = lambda x, y: x.dtype == y.dtype and x.tobytes() == y.tobytes()  # noqa: E731  (NaN equal to NaN)
    return same(a[0], b[0]) and len(a[1]) == len(b[1]) and all(same(x, y) for x, y in zip(a[1], b[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("data/mock"))
    ap.add_argument("--throughput", type=int, default=400)
    ap.add_argument("--memory", type=int, nargs="*", default=[2000, 20000])
    ap.add_argument("--memory-samples", type=int, default=5)
    ap.add_argument("--memory-steps", type=int, default=1)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--trial-galaxies", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("bench/catalog_speed.json"))
    args, rest = ap.parse_known_args()
    rest = rest or ["--preset", "quick"]
    work = args.work or Path(tempfile.mkdtemp(prefix="catalog_speed."))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "settings": rest}

    def run_args(catalogue: Path, out: Path, *extra: str) -> list[str]:
        return [*rest, f"data.root={args.root}", "data.source=folder", f"sampling.catalog={catalogue}",
                f"sampling.out_dir={out}", "sampling.figures=0", *extra]

    if args.throughput:
        catalogue = images_only_catalogue(args.root, args.throughput, work / f"cat{args.throughput}")
        _, seconds, peak = generate(run_args(catalogue, work / "throughput"), timed=True)
        metrics = json.loads((newest(work / "throughput") / "metrics.json").read_text())
        result["throughput"] = {"galaxies": args.throughput, "command_seconds": seconds, "peak_gb": peak,
                                "galaxies_per_second": metrics["galaxies_per_second_this_run"],
                                "bytes_per_galaxy": metrics["bytes_per_galaxy"]}
        print(f"throughput: {args.throughput} galaxies in {seconds:.0f} s (command), "
              f"{metrics['galaxies_per_second_this_run']:.2f} galaxies/s of sampling and measurement, "
              f"{metrics['bytes_per_galaxy'] / 1e3:.1f} kB per galaxy on disk", flush=True)
    cheap = (f"sampling.n_samples={args.memory_samples}", "sampling.sampler=ddim",
             f"sampling.steps={args.memory_steps}", f"sampling.top_k={min(args.memory_samples, 5)}")
    result["memory"] = []
    for n in args.memory:
        catalogue = images_only_catalogue(args.root, n, work / f"cat{n}")
        _, seconds, peak = generate(run_args(catalogue, work / f"memory{n}", *cheap), timed=True)
        result["memory"].append({"galaxies": n, "peak_gb": peak, "seconds": seconds})
        print(f"memory: {n} galaxies, peak {peak:.2f} GB, {seconds:.0f} s", flush=True)
        shutil.rmtree(work / f"cat{n}")
    if len(result["memory"]) > 1:
        result["memory_ratio"] = result["memory"][-1]["peak_gb"] / result["memory"][0]["peak_gb"]
    if args.trials:
        catalogue = images_only_catalogue(args.root, args.trial_galaxies, work / "trials")
        trial_args = run_args(catalogue, work / "reference", *cheap, "sampling.shard_size=50")
        begun = time.time()
        generate(trial_args)
        reference = contents(newest(work / "reference"))
        written = sorted(p.stat().st_mtime - begun for p in (newest(work / "reference") / "shards").glob("shard-*"))
        rng = np.random.default_rng(args.seed)
        result["kills"] = []
        for trial in range(args.trials):
            out = work / f"trial{trial}"
            killed_args = run_args(catalogue, out, *cheap, "sampling.shard_size=50")
            # a moment while the reference run was writing its shards (after the first, before the last)
            moment = float(rng.uniform(written[0], written[-1]))
            process = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *killed_args], cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(moment)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            folder = newest(out) if out.exists() and any(out.iterdir()) else None
            shards = len(list((folder / "shards").glob("shard-*.fits"))) if folder else 0
            generate(killed_args)
            same = identical(contents(newest(out)), reference)
            result["kills"].append({"after_seconds": moment, "shards_before_kill": shards, "identical": same})
            print(f"kill {trial + 1}: SIGKILL after {moment:.1f} s ({shards} shards written), rerun: "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
