"""Does the interval calibration hold on galaxies it was not fitted on? Validation galaxies only.

    python bench/calibration_check.py [--galaxies 300] [--out bench/calibration_val.json] [--preset standard]
                                      [key=value ...]

Draws ``sampling.n_samples`` spectra for ``--galaxies`` validation galaxies (generate.py's subset
and seed for its calibration) with the trained models generate.py would use, then fits the
calibration (utils.eval.calibration) on one half of them and measures, on the other half, the share
of truths inside the samples' own and the widened central 68% and 90% intervals, per pixel and
for z, Dn4000, EW(H-alpha) and EW([O III]); and the same with the halves swapped. The test split
is not touched. Prints a markdown table and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from utils.astro.science import redshift_weights
from utils.config import load_config
from utils.data.survey import configured_dataset, load_survey, subset
from utils.eval.calibration import PIXELS, calibration_inputs, fit_calibration
from utils.eval.metrics import COVERAGE_LEVELS, interval_coverage
from utils.eval.report import COVERED
from utils.generation import SamplingPlan, draw_samples
from utils.runtime import default_device
from utils.trained import build_models, find_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--galaxies", type=int, default=300)
    ap.add_argument("--out", default="bench/calibration_val.json")
    args, rest = ap.parse_known_args()
    config = load_config("generative", rest)
    survey = load_survey(config["data"])
    pair = find_models(config)
    val = subset(configured_dataset(survey, "val", config["data"]), args.galaxies, seed=0)
    pair = build_models(pair, val.n_pixels, val.n_channels, default_device())
    # generate.py's draw for its calibration: the same subset and seed
    drawn = draw_samples(pair, val, SamplingPlan.from_config(config), known=True, seed=config["run"]["seed"],
                         desc="calibrate (val)")
    props, reference = calibration_inputs(val.deprocess(drawn.samples, drawn.params[:, None]), val.wave,
                                          val.deprocess(drawn.truth, drawn.params), val.survey.catalog[val.rows],
                                          redshift_weights(val.all_flux()[1]))
    quantities = {PIXELS: (drawn.samples, drawn.truth), **{p: (props[p], reference[p]) for p in COVERED}}
    halves = (np.arange(len(val)) % 2 == 0, np.arange(len(val)) % 2 == 1)
    folds = []
    for fit, held_out in (halves, halves[::-1]):
        calibration = fit_calibration({p: props[p][fit] for p in COVERED}, {p: reference[p][fit] for p in COVERED},
                                      drawn.samples[fit], drawn.truth[fit], levels=COVERAGE_LEVELS)
        folds.append({q: {f"{lv:.2f}": {"factor": calibration.factor(q, lv),
                                        "raw": interval_coverage(s[held_out], t[held_out], lv),
                                        "calibrated": interval_coverage(s[held_out], t[held_out], lv,
                                                                        calibration.factor(q, lv))}
                          for lv in COVERAGE_LEVELS} for q, (s, t) in quantities.items()})
    print(f"Calibration fitted on one half of {len(val)} validation galaxies, coverage on the other "
          f"(mean of both ways; factor: the two fits)\n")
    print("| quantity | level | samples' own | calibrated | factors |\n|---|---|---|---|---|")
    for q in quantities:
        for lv in (f"{x:.2f}" for x in COVERAGE_LEVELS):
            cells = [[fold[q][lv][key] for fold in folds] for key in ("raw", "calibrated", "factor")]
            print(f"| {q} | {lv} | {np.mean(cells[0]):.3f} | {np.mean(cells[1]):.3f} | "
                  + " / ".join(f"{f:.2f}" for f in cells[2]) + " |")
    Path(args.out).write_text(json.dumps({"galaxies": len(val), "config": rest, "folds": folds}, indent=1))


if __name__ == "__main__":
    main()
