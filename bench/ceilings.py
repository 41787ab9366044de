"""What an image can tell about a mock galaxy's spectrum at best: oracle retrievals on the validation split.

    python bench/ceilings.py [--root data/mock] [--k 25] [--galaxies 0] [--out bench/ceilings_val.json]

The image of a mock galaxy is made from its ugriz light profiles: everything it holds about the
spectrum is in the galaxy's colours, magnitude, bulge share and sizes (plus noise and pixels).
This retrieves, for each validation galaxy, the k training galaxies nearest in those **true,
noise-free** catalog values (standardised; the photo-z baseline's search, utils.baselines) and
predicts the median of their redshifts, Dn4000 and equivalent widths and the mode of their BPT
classes. That is a retrieval
with perfect information, not an upper bound proven for every model, but a generated spectrum
that beats it would be a surprise: where it falls short of a target (issue 15), the target asks
for physics the mock does not put in the image (the drawn line strengths are scattered 0.35 dex
around star formation, AGN are drawn at random with a probability that rises with bulge mass).
A second row adds the true redshift to the features (what a perfect redshift would add).

The statistics are utils.report.compare's, the same code as generate.py's science evaluation.

With ``--preprocessing log --downsample 16`` (a dataset's preparation) it also averages the same
neighbours' spectra in those units, as the kNN image baseline does (utils.baselines), and reports
the per-pixel MSE of that oracle spectral retrieval, of the mean training spectrum, and the
observational noise floor of the true spectra (the mean squared change of an observed spectrum
when a second noise draw at its inverse variance is added: the error of a perfect prediction of
the noise-free spectrum; 20 draws): what an image could tell about the whole
spectrum to a retrieval, against which generate.py's MSEs can be read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.baselines import catalog_neighbours, colour_features, neighbour_average  # noqa: E402
from utils.dataset import SpectraDataset, open_survey  # noqa: E402
from utils.report import catalog_truth, class_mode, compare  # noqa: E402
from utils.science import BPT_CLASSES  # noqa: E402
from utils.training import subset_rows  # noqa: E402

def features(cat, with_z: bool) -> np.ndarray:
    """The photo-z baseline's colours and r, then bulge share, log sizes (and the true redshift)."""
    cols = [colour_features(cat), np.asarray(cat["bulge_frac_r"], dtype=float)[:, None],
            np.log10(np.asarray(cat["r_disc_arcsec"], dtype=float))[:, None],
            np.log10(np.asarray(cat["r_bulge_arcsec"], dtype=float))[:, None]]
    if with_z:
        cols.append(np.asarray(cat["z"], dtype=float)[:, None])
    return np.concatenate(cols, 1)


def spectral_oracle(survey, val_rows: np.ndarray, k: int, preprocessing: str, downsample: int) -> dict:
    """Per-pixel MSE [mean, standard error] of the oracle retrieval's mean spectrum, of the mean
    training spectrum and of a second noise draw (the noise floor), in preprocessed units."""
    from utils.spectra import preprocess

    train = SpectraDataset(survey, "train", preprocessing=preprocessing, downsample=downsample)
    val = train.like(val_rows)
    cat = survey.catalog
    idx = catalog_neighbours(features(cat[train.rows], False), features(cat[val.rows], False), k)
    truth = np.stack([val.spectrum(i)[0] for i in range(len(val))])
    mean_train = np.mean([train.spectrum(i)[0] for i in range(len(train))], axis=0)
    flux, ivar = map(np.stack, zip(*(val.flux(i) for i in range(len(val)))))
    sigma = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0.0)
    rng = np.random.default_rng(0)
    redrawn = [preprocess(flux + rng.normal(size=flux.shape) * sigma, val.wave, preprocessing)[0] for _ in range(20)]
    per_galaxy = {"oracle retrieval (colours, r, B/T, sizes)": ((neighbour_average(train, idx) - truth) ** 2).mean(1),
                  "mean training spectrum": ((mean_train - truth) ** 2).mean(1),
                  "noise floor": np.mean([((x - truth) ** 2).mean(1) for x in redrawn], 0)}
    return {name: [float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))] for name, v in per_galaxy.items()}


def oracle(train_cat, val_cat, k: int, with_z: bool) -> dict:
    idx = catalog_neighbours(features(train_cat, with_z), features(val_cat, with_z), k)
    truth = catalog_truth(train_cat) | {"z": np.asarray(train_cat["z"], dtype=float)}
    pred = {prop: np.nanmedian(values[idx], 1) for prop, values in truth.items() if prop != "bpt"}
    pred["bpt"], _ = class_mode(truth["bpt"][idx], len(BPT_CLASSES))
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/mock")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--galaxies", type=int, default=0, help="validation galaxies (0: all; generate.py's subset "
                                                             "of the same size otherwise)")
    ap.add_argument("--out", default="bench/ceilings_val.json")
    ap.add_argument("--preprocessing", choices=("scale", "log"), help="also the spectral oracle in these units")
    ap.add_argument("--downsample", type=int, default=16)
    a = ap.parse_args()
    survey = open_survey(a.root)
    cat = survey.catalog
    if "true_ew_halpha" not in cat.colnames:
        raise SystemExit(f"{a.root}: not a mock survey with true properties (no true_ew_halpha column)")
    val = survey.rows("val")
    if a.galaxies:
        val = subset_rows(val, a.galaxies, seed=0)
    train_cat, val_cat = cat[survey.rows("train")], cat[val]
    truth = catalog_truth(val_cat) | {"z": np.asarray(val_cat["z"], dtype=float)}
    predictions = {"colours, r, B/T, sizes": oracle(train_cat, val_cat, a.k, False),
                   "the same + true z": oracle(train_cat, val_cat, a.k, True)}
    stats, _ = compare(predictions, truth)
    counts = np.bincount(truth["bpt"], minlength=len(BPT_CLASSES))
    result = {"root": a.root, "k": a.k, "n_galaxies": len(val), "majority_rate": float(counts.max() / len(val)),
              "predictors": stats}
    if a.preprocessing:
        result["spectral_mse"] = {"preprocessing": a.preprocessing, "downsample": a.downsample,
                                  **spectral_oracle(survey, val, a.k, a.preprocessing, a.downsample)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    keys = ("z_sigma_nmad", "dn4000_corr", "ew_halpha_corr", "ew_oiii_5007_corr", "ew_nii_6584_corr", "bpt_accuracy")
    print(f"{len(val)} validation galaxies, {a.k} nearest training galaxies in true catalog values; "
          f"BPT majority-class rate {result['majority_rate']:.3f}")
    print(f"{'features':<26}" + "".join(f"{k:>22}" for k in keys))
    for name, s in stats.items():
        print(f"{name:<26}" + "".join(f"{s[k][0]:>13.4f} +- {s[k][1]:.4f}" for k in keys))
    if a.preprocessing:
        print(f"\nper-pixel MSE ({a.preprocessing} units, {a.downsample}-pixel blocks):")
        for name, value in result["spectral_mse"].items():
            if name not in ("preprocessing", "downsample"):
                print(f"  {name:<44} {value[0]:.5f} +- {value[1]:.5f}")


if __name__ == "__main__":
    main()
