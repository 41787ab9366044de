"""The cascade against the single-stage model, and what the ranking buys at each stage, on one
common grid: generate.py outputs of the same galaxies compared pixel by pixel.

    python bench/cascade.py NAME=FOLDER [NAME=FOLDER ...] [--factor 16] [--boot 1000] [--out FILE.json]

Each FOLDER is what generate.py wrote (spectra.fits with the true spectra: a split with known
spectra); NAME labels it in the table. Every output's samples and truth (flux units) are put on
one grid, blocks of ``--factor`` pixels of the finest output's grid (16 SDSS pixels: the
standard preset's 224-pixel grid; an output already on it is left as it is), then preprocessed
as the ApJ does ('log': divided by the truth's mean flux in 6900-6950 A, natural log), so that a
cascade's full-resolution spectra and a single-stage model's binned ones are judged by one MSE. Per
output, over the galaxies all outputs hold (matched by object id):

- the MSE of the mean of the samples, of the top-ranked sample, of one sample drawn at random and
  of the sample nearest the samples' mean (each mean +- standard error over galaxies), and the
  paired differences top - random and top - nearest-mean: what the contrastive ranking buys;
- for a cascade, the same for its low stage (the LOWSTAGE samples, ranked by the low-stage ranker);
- generation seconds per galaxy and the science targets met (from the output's metrics.json).

The paired difference of each output's mean-of-N and top-ranked MSE from the first output's is
given with a bootstrap standard error over galaxies.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from utils.astro.spectra import block_grid, preprocess, rebin, reprocess
from utils.errors import UserError

KIND = "log"


def read_output(folder: Path) -> dict:
    """The spectra, truth, scores and grid of one generate.py output, and its metrics.json."""
    path = folder / "spectra.fits"
    if not path.is_file():
        raise UserError(f"{path}: not found; give a folder generate.py wrote")
    with fits.open(path) as hdus:
        table = hdus["SPECTRA"].data
        if "true_flux" not in table.columns.names:
            raise UserError(f"{path}: no true spectra (a catalogue without spectra); the comparison needs them")
        out = {"objid": np.asarray(table["objid"]), "samples": np.asarray(table["samples"], np.float64),
               "truth": np.asarray(table["true_flux"], np.float64), "ivar": np.asarray(table["true_ivar"], np.float64),
               "loglam": np.log10(hdus["WAVELENGTH"].data)}
        if "LOWSTAGE" in hdus:
            low = hdus["LOWSTAGE"].data
            out["low"] = {"samples": np.asarray(low["samples"], np.float64), "scores": np.asarray(low["scores"]),
                          "loglam": np.log10(hdus["LOWWAVE"].data)}
    metrics = folder / "metrics.json"
    out["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return out


def on_grid(flux: np.ndarray, loglam: np.ndarray, target: np.ndarray, factor: int, ivar: np.ndarray | None = None
            ) -> np.ndarray:
    """Spectra ``(G, [N,] L)`` on ``loglam`` put on the ``target`` grid: as they are when they are
    on it, block means of ``factor`` pixels weighted by the truth's ``ivar`` ``(G, L)`` (as the
    datasets bin spectra, utils.astro.spectra.rebin) when that gives it, else the first
    len(target) pixels of a grid that matches it to within a hundredth of a pixel (a cascade's low
    stage: its last, shorter block beyond the target's end)."""
    if len(loglam) != len(target):
        if len(loglam) >= factor * len(target):
            weights = np.broadcast_to(ivar[:, None] if flux.ndim == 3 else ivar, flux.shape)
            flux, _, loglam = rebin(flux, weights, loglam, factor)
        flux, loglam = flux[..., :len(target)], loglam[:len(target)]
    step = np.median(np.diff(target))
    if len(loglam) != len(target) or np.max(np.abs(loglam - target)) > 0.01 * step:
        raise UserError(f"a grid of {len(loglam)} pixels does not reduce to the common grid of {len(target)}")
    return flux


def stage_errors(samples: np.ndarray, scores: np.ndarray | None, truth: np.ndarray, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Per-galaxy MSEs ``(G,)``: mean of the samples ``(G, N, L)``, the top-ranked (``scores``
    ``(G, N)``, or the samples already sorted best first), one at random, the nearest the mean."""
    g, n, _ = samples.shape
    rows = np.arange(g)
    mean = samples.mean(1)
    top = samples[rows, np.argmax(scores, 1)] if scores is not None else samples[:, 0]
    nearest = samples[rows, ((samples - mean[:, None]) ** 2).mean(-1).argmin(1)]
    mse = lambda x: ((x - truth) ** 2).mean(-1)  # noqa: E731
    return {"mean_of_n": mse(mean), "top_ranked": mse(top), "random": mse(samples[rows, rng.integers(0, n, g)]),
            "nearest_mean": mse(nearest)}


def mean_se(x: np.ndarray) -> list[float]:
    return [float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))]


def boot_se(x: np.ndarray, boot: int, seed: int = 0) -> float:
    idx = np.random.default_rng(seed).integers(0, len(x), (boot, len(x)))
    return float(np.std(x[idx].mean(1)))


def compare(outputs: dict[str, dict], factor: int, boot: int) -> dict:
    first = next(iter(outputs.values()))
    finest = max((o["loglam"] for o in outputs.values()), key=len)
    target = block_grid(finest, factor)
    if len(target) == 0:
        raise UserError(f"--factor {factor} leaves no block of the {len(finest)}-pixel grid")
    common = set(first["objid"].tolist())
    for o in outputs.values():
        common &= set(o["objid"].tolist())
    if not common:
        raise UserError("the outputs hold no galaxy in common")
    ids = np.array(sorted(common))
    result, per_galaxy = {"galaxies": len(ids), "grid_pixels": len(target)}, {}
    for name, o in outputs.items():
        pick = np.searchsorted(o["objid"], ids, sorter=np.argsort(o["objid"]))
        pick = np.argsort(o["objid"])[pick]
        ivar = o["ivar"][pick]
        truth_flux = on_grid(o["truth"][pick], o["loglam"], target, factor, ivar)
        truth, params = preprocess(truth_flux, 10 ** target, KIND)
        rng = np.random.default_rng(0)
        pre = lambda flux: reprocess(flux, params[:, None], KIND)  # noqa: E731
        full = stage_errors(pre(on_grid(o["samples"][pick], o["loglam"], target, factor, ivar)), None, truth, rng)
        row = {"pixels": len(o["loglam"]), **{k: mean_se(v) for k, v in full.items()},
               "top_minus_random": [float(np.mean(full["top_ranked"] - full["random"])),
                                    boot_se(full["top_ranked"] - full["random"], boot)],
               "top_minus_nearest_mean": [float(np.mean(full["top_ranked"] - full["nearest_mean"])),
                                          boot_se(full["top_ranked"] - full["nearest_mean"], boot)]}
        if "low" in o:
            low = o["low"]
            errors = stage_errors(pre(on_grid(low["samples"][pick], low["loglam"], target, factor)),
                                  low["scores"][pick], truth, rng)
            row["low_stage"] = {"pixels": len(low["loglam"]), "samples": low["samples"].shape[1],
                                **{k: mean_se(v) for k, v in errors.items()},
                                "top_minus_random": [float(np.mean(errors["top_ranked"] - errors["random"])),
                                                     boot_se(errors["top_ranked"] - errors["random"], boot)]}
        m = o["metrics"]
        if m:
            row["seconds_per_galaxy"] = m["seconds"] / m["n_galaxies"]
            targets = (m.get("science") or {}).get("targets") or []
            row["targets_met"] = f"{sum(t['met'] is True for t in targets)}/{len(targets)}"
        per_galaxy[name] = full
        result[name] = row
    base = next(iter(per_galaxy))
    for name in list(per_galaxy)[1:]:
        for key in ("mean_of_n", "top_ranked"):
            diff = per_galaxy[name][key] - per_galaxy[base][key]
            result[name][f"{key}_minus_{base}"] = [float(diff.mean()), boot_se(diff, boot)]
    return result


def format_result(result: dict) -> str:
    names = [k for k in result if isinstance(result[k], dict)]
    keys = ("mean_of_n", "top_ranked", "random", "nearest_mean", "top_minus_random", "top_minus_nearest_mean")
    lines = [f"{result['galaxies']} galaxies; MSE on the common {result['grid_pixels']}-pixel grid ('log' units), "
             "+- standard error", f"{'':<28}" + "".join(f"{n:>22}" for n in names)]
    show = lambda v: f"{v[0]:.5f}+-{v[1]:.5f}" if isinstance(v, list) else str(v)  # noqa: E731
    for key in keys + tuple(f"{k}_minus_{names[0]}" for k in ("mean_of_n", "top_ranked")) + (
            "seconds_per_galaxy", "targets_met"):
        cells = [show(result[n][key]) if key in result[n] else "-" for n in names]
        lines.append(f"{key:<28}" + "".join(f"{c:>22}" for c in cells))
    for n in names:
        if "low_stage" in result[n]:
            low = result[n]["low_stage"]
            lines.append(f"{n} low stage ({low['samples']} samples, {low['pixels']} pixels): "
                         + ", ".join(f"{k} {show(low[k])}" for k in ("mean_of_n", "top_ranked", "random",
                                                                      "nearest_mean", "top_minus_random")))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", help="NAME=FOLDER: a generate.py output folder and its label")
    ap.add_argument("--factor", type=int, default=16, help="SDSS pixels per block of the common grid")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the galaxies")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    try:
        pairs = [item.split("=", 1) for item in args.outputs]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise UserError("give each output as NAME=FOLDER")
        result = compare({name: read_output(Path(folder)) for name, folder in pairs}, args.factor, args.boot)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(format_result(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
