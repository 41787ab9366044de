"""Generate, rank, evaluate and export spectra (SPEC section 4).

    python generate.py [--preset quick] [section.key=value ...]

Loads the diffusion model (EMA weights) and the contrastive network, by default from the newest
finished runs in runs/generative and runs/contrastive; draws ``sampling.n_samples`` spectra per
galaxy, ranks them by the contrastive similarity to the galaxy's image and, where true spectra
exist, reports their errors. Writes into ``sampling.out_dir/<timestamp>/``: spectra.fits (one
row per galaxy), metrics.json, config.yml, figures/.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table
from tqdm import tqdm

from utils.builders import GENERATIVE_PARAMS
from utils.config import cli, load_config, save_config
from utils.dataset import SpectraDataset
from utils.evaluation import METRICS, evaluate, photometric_params
from utils.generation import build_models, find_models, generation_set, mean_spectrum, sample_for_images, score
from utils.plotting import plot_ranked
from utils.runtime import keep_freed_memory
from utils.training import load_survey

PARAMS = GENERATIVE_PARAMS
logger = logging.getLogger("generate")
FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


def write_fits(path: Path, dataset: SpectraDataset, results: dict, flux: dict, known: bool, config: dict) -> Path:
    """One FITS file: HDU 1 a table with a row per galaxy, HDU 2 the wavelength grid (A)."""
    cat = dataset.survey.catalog[dataset.rows]
    table = Table({"objid": np.asarray(cat["objid"]), "ra": np.asarray(cat["ra"]), "dec": np.asarray(cat["dec"]),
                   "z": np.asarray(cat["z"])})
    table["samples"] = flux["ranked"].astype(np.float32)
    table["scores"] = results["ranked_scores"].astype(np.float32)
    table["mean"] = flux["mean"].astype(np.float32)
    table["topk_mean"] = flux["topk_mean"].astype(np.float32)
    for name in ("samples", "mean", "topk_mean"):
        table[name].unit = FLUX_UNIT
    if known:
        table["true_flux"] = flux["truth"].astype(np.float32)
        table["true_flux"].unit = FLUX_UNIT
        table["true_ivar"] = flux["ivar"].astype(np.float32)
        for key in METRICS:
            if key in results:
                table[key] = results[key].astype(np.float32)
    s = config["sampling"]
    table.meta.update({"SAMPLER": s["sampler"], "STEPS": s["steps"], "NSAMPLE": s["n_samples"], "TOPK": s["top_k"],
                       "PREPROC": config["data"]["preprocessing"],
                       "COMMENT": "samples are sorted by contrastive score, best first; flux in 1e-17 erg/s/cm2/A"})
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table),
                         fits.ImageHDU(dataset.wave.astype(np.float64), name="WAVELENGTH")])
    hdus[1].name = "SPECTRA"
    hdus[2].header["BUNIT"] = "Angstrom"
    hdus.writeto(path)
    return path


def run(config: dict) -> Path:
    s = config["sampling"]
    pair = find_models(config)
    survey = load_survey(config)
    dataset, known = generation_set(config, survey)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pair = build_models(pair, dataset.n_pixels, dataset.n_channels, device)
    gen_cfg, gen_path, con_path = pair.gen_cfg, pair.gen_path, pair.con_path
    generator_model, contrastive, diffusion = pair.denoiser, pair.contrastive, pair.diffusion
    cfg = {**gen_cfg, "run": {**gen_cfg["run"], "precision": config["run"]["precision"]}}
    out_dir = Path(s["out_dir"]) / datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / "figures").mkdir(parents=True)
    save_config(config, out_dir / "config.yml")
    logger.info("diffusion model %s; contrastive network %s; %d galaxies x %d samples (%s, %s steps) -> %s",
                gen_path, con_path, len(dataset), s["n_samples"], s["sampler"], s["steps"], out_dir)

    generator = torch.Generator(device="cpu").manual_seed(config["run"]["seed"])
    all_samples, all_scores, truth, params = [], [], [], []
    start = time.perf_counter()
    bar = tqdm(total=len(dataset), desc="generate", unit="gal")
    for batch in dataset.iter_batches(s["batch_galaxies"]):
        images = batch["image"].to(device)
        samples = sample_for_images(generator_model, diffusion, images, s["n_samples"], s["sampler"], s["steps"], cfg,
                                    generator, eta=s["eta"], guidance=s["guidance"])
        all_scores.append(score(contrastive, images, samples).float().cpu().numpy())
        all_samples.append(samples.cpu().numpy())
        truth.append(batch["spectrum"][:, 0].numpy())
        params.append(batch["params"].numpy())
        bar.update(len(images))
    bar.close()
    seconds = time.perf_counter() - start
    samples, scores = np.concatenate(all_samples), np.concatenate(all_scores)
    truth_arr = np.concatenate(truth) if known else None
    baseline = pair.mean_train_spectrum if known else None
    if known and (baseline is None or np.shape(baseline) != (dataset.n_pixels,)):  # computed by the run; else now
        baseline = mean_spectrum(SpectraDataset.from_config(survey, "train", config["data"]))
    results = evaluate(samples, scores, truth_arr, s["top_k"], baseline)
    if known:
        par = np.concatenate(params)
        ivar = np.stack([dataset.flux(i)[1] for i in range(len(dataset))])
    else:
        cat = dataset.survey.catalog[dataset.rows]
        par = photometric_params(results["ranked"][:, 0], dataset.wave, np.asarray(cat["mag_r"]),
                                 np.asarray(cat["mag_i"]), config["data"]["preprocessing"])
    flux = {"ranked": dataset.invert(results["ranked"], par[:, None]), "mean": dataset.invert(results["mean"], par),
            "topk_mean": dataset.invert(results["topk_mean"], par)}
    if known:
        flux["truth"] = dataset.invert(truth_arr, par)
        flux["ivar"] = ivar
    write_fits(out_dir / "spectra.fits", dataset, results, flux, known, config)
    if s["per_galaxy_fits"]:
        write_per_galaxy(out_dir / "galaxies", dataset, results, flux, known, config)

    summary = {"n_galaxies": len(dataset), "n_samples": s["n_samples"], "sampler": s["sampler"], "steps": s["steps"],
               "top_k": s["top_k"], "seconds": seconds, "spectra_per_second": len(dataset) * s["n_samples"] / seconds,
               "diffusion_checkpoint": str(gen_path), "contrastive_checkpoint": str(con_path)}
    if known:
        summary["metrics"] = {k: float(np.mean(results[k])) for k in METRICS if k in results}
        print_table(summary["metrics"], s["top_k"], len(dataset))
    with open(out_dir / "metrics.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    draw_figures(out_dir / "figures", dataset, results, truth_arr, s["figures"], s["top_k"])
    logger.info("%d spectra in %.1f s (%.1f spectra/s); results in %s", len(dataset) * s["n_samples"], seconds,
                summary["spectra_per_second"], out_dir)
    return out_dir


def write_per_galaxy(folder: Path, dataset, results, flux, known, config) -> None:
    folder.mkdir()
    cat = dataset.survey.catalog[dataset.rows]
    for g in range(len(dataset)):
        cols = {"wavelength": dataset.wave, "mean": flux["mean"][g], "topk_mean": flux["topk_mean"][g]}
        if known:
            cols.update(true_flux=flux["truth"][g], true_ivar=flux["ivar"][g])
        for j in range(flux["ranked"].shape[1]):
            cols[f"sample_{j + 1:02d}"] = flux["ranked"][g, j]
        table = Table(cols)
        table["wavelength"].unit = "Angstrom"
        table.meta.update({"OBJID": int(cat["objid"][g]), "RA": float(cat["ra"][g]), "DEC": float(cat["dec"][g]),
                           "Z": float(cat["z"][g]), "SCORES": " ".join(f"{v:.4f}" for v in results["ranked_scores"][g])})
        table.write(folder / f"spectrum-{int(cat['objid'][g])}.fits")


def print_table(metrics: dict, top_k: int, n: int) -> None:
    width = max(len(v) for v in METRICS.values()) + 4
    lines = [f"Evaluation over {n} galaxies (preprocessed units, lower is better)", "-" * (width + 12)]
    for key, value in metrics.items():
        label = METRICS[key].replace("top-k", f"top-{top_k}")
        lines.append(f"{label:<{width}}{value:12.5f}")
    print("\n".join(lines))


def draw_figures(folder: Path, dataset, results, truth, n: int, top_k: int) -> None:
    raw = dataset.survey.images[dataset.kind]
    cat = dataset.survey.catalog
    for g in range(min(n, len(dataset))):
        row = dataset.rows[g]
        plot_ranked(folder / f"galaxy_{int(cat['objid'][row])}.png", dataset.wave, raw[row],
                    None if truth is None else truth[g], results["mean"][g], results["topk_mean"][g],
                    results["ranked"][g, :3], results["ranked_scores"][g, :3], top_k,
                    title=f"objid {int(cat['objid'][row])}, z = {float(cat['z'][row]):.3f}")


def main(argv: Sequence[str]) -> None:
    config = load_config(PARAMS, argv)
    keep_freed_memory()
    run(config)


if __name__ == "__main__":
    cli(main)
