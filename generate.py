"""Generate, rank, evaluate and export spectra (SPEC section 4).

    python generate.py [--preset quick] [section.key=value ...]

Loads the diffusion model (EMA weights) and the contrastive network, by default from the newest
finished runs in runs/generative and runs/contrastive; draws ``sampling.n_samples`` spectra per
galaxy, ranks them by the contrastive similarity to the galaxy's image and, where true spectra
exist, reports their errors and their physics against baselines (utils.report), with the
samples' intervals calibrated on ``sampling.calibration_objects`` validation galaxies first where
that is above 0 (utils.calibration). Writes into ``sampling.out_dir/<timestamp>/``: spectra.fits
(one row per galaxy), metrics.json, config.yml, figures/.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.builders import GENERATIVE_PARAMS
from utils.checkpoints import METRICS_FILE, new_stamped_folder, write_json
from utils.config import cli, load_config, save_config
from utils.dataset import SpectraDataset
from utils.baselines import compute_baselines
from utils.evaluation import METRICS, evaluate, format_table, photometric_params
from utils.export import draw_figures, write_fits, write_per_galaxy
from utils.generation import build_models, draw, find_models, generation_set, mean_spectrum, validation_calibration
from utils.report import evaluate_science, science_figures
from utils.runtime import default_device, keep_freed_memory
from utils.science import redshift_weights
from utils.training import load_survey

PARAMS = GENERATIVE_PARAMS
logger = logging.getLogger("generate")


def run(config: dict) -> Path:
    s = config["sampling"]
    pair = find_models(config)
    survey = load_survey(config)
    dataset, known = generation_set(config, survey)
    device = default_device()
    pair = build_models(pair, dataset.n_pixels, dataset.n_channels, device)
    gen_path, con_path = pair.gen_path, pair.con_path
    steps = pair.diffusion.num_timesteps if s["sampler"] == "ddpm" else s["steps"]  # DDPM walks every step
    out_dir = new_stamped_folder(Path(s["out_dir"]), "sampling.out_dir")
    (out_dir / "figures").mkdir()
    save_config(config, out_dir / "config.yml")
    logger.info("diffusion model %s; contrastive network %s; %d galaxies x %d samples (%s, %s steps) -> %s",
                gen_path, con_path, len(dataset), s["n_samples"], s["sampler"], steps, out_dir)

    drawn = draw(pair, dataset, config, known, seed=config["run"]["seed"])
    samples, scores, truth_arr, seconds = drawn.samples, drawn.scores, drawn.truth, drawn.seconds
    baseline = pair.mean_train_spectrum if known else None
    if known and (baseline is None or np.shape(baseline) != (dataset.n_pixels,)):  # computed by the run; else now
        baseline = mean_spectrum(SpectraDataset.from_config(survey, "train", config["data"]))
    results = evaluate(samples, scores, truth_arr, s["top_k"], baseline)
    if known:
        par = drawn.params
        ivar = dataset.all_flux()[1]
    else:
        cat = dataset.survey.catalog[dataset.rows]
        par = photometric_params(results["ranked"][:, 0], dataset.wave, np.asarray(cat["mag_r"]),
                                 np.asarray(cat["mag_i"]), config["data"]["preprocessing"])
    flux = {"ranked": dataset.invert(results["ranked"], par[:, None]), "mean": dataset.invert(results["mean"], par),
            "topk_mean": dataset.invert(results["topk_mean"], par)}
    if known:
        flux["truth"] = dataset.invert(truth_arr, par)
        flux["ivar"] = ivar
    science, calibration = None, None
    weights = redshift_weights(ivar) if known else None
    if s["science"] and s["calibration_objects"]:  # interval widening fitted on validation galaxies
        calibration = validation_calibration(pair, survey, config, weights)
    if s["science"]:  # physical properties of samples, truth and baselines (utils.report)
        baselines, photo_z = compute_baselines(survey, dataset, config["data"], pair.contrastive, device, baseline, par,
                                               s["knn"], s["baseline_train_max"]) if known else ({}, None)
        science = evaluate_science(flux["ranked"], dataset.wave, flux.get("truth"), results["ranked"], truth_arr,
                                   baselines, photo_z, dataset.survey.catalog[dataset.rows],
                                   weights=weights, split="catalog" if s["catalog"] else s["split"],
                                   calibration=calibration)
    write_fits(out_dir / "spectra.fits", dataset, results, flux, known, config, steps,
               science.columns if science else None, calibration)
    if s["per_galaxy_fits"]:
        write_per_galaxy(out_dir / "galaxies", dataset, results, flux, known, science.columns if science else None,
                         calibration)

    summary = {"n_galaxies": len(dataset), "n_samples": s["n_samples"], "sampler": s["sampler"], "steps": steps,
               "top_k": s["top_k"], "seconds": seconds, "spectra_per_second": len(dataset) * s["n_samples"] / seconds,
               "diffusion_checkpoint": str(gen_path), "contrastive_checkpoint": str(con_path)}
    if known:
        summary["metrics"] = {k: float(np.mean(results[k])) for k in METRICS if k in results}
        print(format_table(summary["metrics"], s["top_k"], len(dataset)))
    if science and science.summary:
        summary["science"] = science.summary
        print(science.table)
    write_json(out_dir / METRICS_FILE, summary)
    draw_figures(out_dir / "figures", dataset, results, truth_arr, s["figures"], s["top_k"])
    if science:
        science_figures(out_dir / "figures", science)
    logger.info("%d spectra in %.1f s (%.1f spectra/s); results in %s", len(dataset) * s["n_samples"], seconds,
                summary["spectra_per_second"], out_dir)
    return out_dir


def main(argv: Sequence[str]) -> None:
    config = load_config(PARAMS, argv)
    keep_freed_memory()
    run(config)


if __name__ == "__main__":
    cli(main)
