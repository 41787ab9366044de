"""generate.py on galaxies whose true spectra are known (a split of the dataset, or a catalog with
spectra): draw, rank, measure against honest baselines, write, draw figures.

One output folder ``sampling.out_dir/<time>/``: spectra.fits (a row per galaxy), metrics.json,
config.yml, figures/ and, with ``sampling.per_galaxy_fits``, galaxies/.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.astro.science import redshift_weights
from utils.checkpoints import METRICS_FILE, new_stamped_folder, write_json
from utils.config import save_config
from utils.data.dataset import SpectraDataset
from utils.data.survey import configured_dataset, subset
from utils.eval.baselines import TRAIN_SEARCHED, compute_baselines
from utils.eval.export import galaxy_figures, write_fits, write_per_galaxy
from utils.eval.metrics import METRICS, format_table, summarise_samples
from utils.eval.report import ScienceReport, science_figures, science_report
from utils.generation import Draws, SamplingPlan, check_plan, draw_samples, mean_spectrum, validation_calibration
from utils.trained import TrainedPair

logger = logging.getLogger(__name__)


@dataclass
class Evaluated:
    """The samples of the evaluated galaxies, ranked and summarised, in both units."""

    drawn: Draws
    results: dict  # utils.eval.metrics.summarise_samples
    flux: dict  # 'ranked' (G, N, L), 'mean', 'topk_mean', 'truth', 'ivar' (G, L): flux units
    baseline: np.ndarray  # (L,) the mean training spectrum, preprocessed


def summarise(pair: TrainedPair, survey, dataset: SpectraDataset, data: dict, drawn: Draws, top_k: int) -> Evaluated:
    """Rank and summarise the samples against the truth and the mean training spectrum (the run's,
    else computed now), and put everything on each galaxy's flux scale."""
    baseline = pair.mean_train_spectrum
    if baseline is None or np.shape(baseline) != (dataset.n_pixels,):
        baseline = mean_spectrum(configured_dataset(survey, "train", data))
    results = summarise_samples(drawn.samples, drawn.scores, drawn.truth, top_k, baseline)
    par = drawn.params
    flux = {"ranked": dataset.deprocess(results["ranked"], par[:, None]),
            "mean": dataset.deprocess(results["mean"], par), "topk_mean": dataset.deprocess(results["topk_mean"], par),
            "truth": dataset.deprocess(drawn.truth, par),
            "ivar": dataset.all_flux()[1]}
    return Evaluated(drawn, results, flux, baseline)


def science_of(pair: TrainedPair, survey, dataset: SpectraDataset, config: dict, plan: SamplingPlan,
               ev: Evaluated, device) -> ScienceReport:
    """The science evaluation against the baselines of this run, with the intervals calibrated
    on validation galaxies first where ``sampling.calibration_objects`` asks for it."""
    s = config["sampling"]
    weights = redshift_weights(ev.flux["ivar"])
    calibration = None
    if s["calibration_objects"]:
        calibration = validation_calibration(pair, survey, config["data"], plan, s["calibration_objects"],
                                             config["run"]["seed"], weights)
    train = subset(configured_dataset(survey, "train", config["data"]), TRAIN_SEARCHED, seed=0)
    baselines, photo_z = compute_baselines(train, dataset, pair.contrastive, device, ev.baseline,
                                           ev.drawn.params)
    return science_report(ev.flux["ranked"], dataset.wave, ev.flux["truth"], ev.results["ranked"], ev.drawn.truth,
                          baselines, photo_z, dataset.survey.catalog[dataset.rows], weights=weights,
                          split="catalog" if s["catalog"] else s["split"], calibration=calibration)


def run(config: dict, pair: TrainedPair, survey, dataset: SpectraDataset, device) -> Path:
    """Evaluate the trained ``pair`` on ``dataset`` (true spectra known); returns the output folder."""
    s = config["sampling"]
    plan = SamplingPlan.from_config(config)
    check_plan(pair, plan)
    steps = pair.diffusion.num_timesteps if plan.sampler == "ddpm" else plan.steps  # DDPM walks every step
    out_dir = new_stamped_folder(Path(s["out_dir"]), "sampling.out_dir")
    (out_dir / "figures").mkdir()
    save_config(config, out_dir / "config.yml")
    logger.info("diffusion model %s; contrastive network %s; %d galaxies x %d samples (%s, %s steps) -> %s",
                pair.gen_path, pair.con_path, len(dataset), plan.n_samples, plan.sampler, steps, out_dir)
    drawn = draw_samples(pair, dataset, plan, known=True, seed=config["run"]["seed"])
    ev = summarise(pair, survey, dataset, config["data"], drawn, s["top_k"])
    science = science_of(pair, survey, dataset, config, plan, ev, device) if s["science"] else None
    calibration = science.figure_data["calibration"] if science else None
    columns = science.columns if science else None
    low = None
    if drawn.low_samples is not None:  # a cascade: its first stage's samples, in flux units
        low_wave = 10 ** pair.low_stage.low.coordinate(dataset.loglam)
        low = (low_wave, dataset.deprocess(drawn.low_samples, drawn.params[:, None]), drawn.low_scores)
    write_fits(out_dir / "spectra.fits", dataset, ev.results, ev.flux, True, config, steps, columns, calibration,
               low)
    if s["per_galaxy_fits"]:
        write_per_galaxy(out_dir / "galaxies", dataset, ev.results, ev.flux, True, columns, calibration)
    summary = {"n_galaxies": len(dataset), "n_samples": plan.n_samples, "sampler": plan.sampler, "steps": steps,
               "top_k": s["top_k"], "seconds": drawn.seconds,
               "spectra_per_second": len(dataset) * plan.n_samples / drawn.seconds,
               "diffusion_checkpoint": str(pair.gen_path), "contrastive_checkpoint": str(pair.con_path),
               "metrics": {k: float(np.mean(ev.results[k])) for k in METRICS if k in ev.results}}
    print(format_table(summary["metrics"], s["top_k"], len(dataset)))
    if science:
        summary["science"] = science.summary
        print(science.table)
    write_json(out_dir / METRICS_FILE, summary)
    galaxy_figures(out_dir / "figures", dataset, ev.results, drawn.truth, s["figures"], s["top_k"],
                   None if low is None else (low[0], drawn.low_samples, drawn.low_scores))
    if science:
        science_figures(out_dir / "figures", science)
    logger.info("%d spectra in %.1f s (%.1f spectra/s); results in %s", len(dataset) * plan.n_samples, drawn.seconds,
                summary["spectra_per_second"], out_dir)
    return out_dir
