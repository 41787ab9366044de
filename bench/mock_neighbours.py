"""How much of a mock spectrum its photometry already predicts.

    python bench/mock_neighbours.py [--root data/mock] [--k 25] [--downsample 16] [--test 1000]

For each test galaxy, averages the preprocessed spectra of the k training galaxies nearest in
standardised catalog features and reports the MSE against its true spectrum (the quickstart's
grid and preprocessing), with bootstrap standard errors over galaxies:

  photometry   colours u-g, g-r, r-i, i-z, the r magnitude and the true redshift;
  + morphology the same plus the true bulge-to-total ratio and half-light sizes (when the
               catalog has them: bulge_frac_r, r_disc_arcsec, r_bulge_arcsec).

If the spectrum were a function of the photometry (the former mock), the first would already
be near the noise floor and the morphology could not help; where fibre apertures and per-galaxy
line physics matter, adding the morphology lowers the MSE. The paired difference and its
standard error are printed last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from utils.astro.spectra import SpectralGrid
from utils.data.dataset import BANDS, open_survey

MORPHOLOGY = ("bulge_frac_r", "r_disc_arcsec", "r_bulge_arcsec")


def features(cat, rows: np.ndarray, morphology: bool) -> np.ndarray:
    mags = np.stack([np.asarray(cat[f"mag_{b}"], dtype=np.float64)[rows] for b in BANDS], 1)
    cols = [mags[:, :-1] - mags[:, 1:], mags[:, 2:3], np.asarray(cat["z"], dtype=np.float64)[rows, None]]
    if morphology:
        cols += [np.log10(np.asarray(cat[c], dtype=np.float64)[rows, None]) if c.startswith("r_")
                 else np.asarray(cat[c], dtype=np.float64)[rows, None] for c in MORPHOLOGY]
    return np.concatenate(cols, 1)


def neighbour_mse(train_x, test_x, train_spectra, test_spectra, k: int) -> np.ndarray:
    from scipy.spatial import cKDTree

    mean, std = train_x.mean(0), train_x.std(0) + 1e-12
    _, idx = cKDTree((train_x - mean) / std).query((test_x - mean) / std, k=k)
    return ((train_spectra[idx].mean(1) - test_spectra) ** 2).mean(1)


def bootstrap_se(values: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return float(np.std([values[rng.integers(0, len(values), len(values))].mean() for _ in range(n)], ddof=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/mock")
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--downsample", type=int, default=16)
    parser.add_argument("--test", type=int, default=1000, help="test galaxies (all when fewer)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    survey = open_survey(args.root, check_values=False)
    cat = survey.catalog
    grid = SpectralGrid(survey.loglam, args.downsample, "scale")
    train, test = survey.rows("train"), survey.rows("test")[: args.test]

    def spectra(rows: np.ndarray) -> np.ndarray:
        flux, _ = grid.rebin(np.asarray(survey.flux[rows]), np.asarray(survey.ivar[rows]))
        return grid.preprocess(flux)[0]

    train_spectra, test_spectra = spectra(train), spectra(test)
    results = {"root": str(args.root), "k": args.k, "n_test": len(test)}
    photometry = neighbour_mse(features(cat, train, False), features(cat, test, False), train_spectra,
                               test_spectra, args.k)
    results["photometry"] = [float(photometry.mean()), bootstrap_se(photometry)]
    print(f"{len(test)} test galaxies, {args.k} neighbours among {len(train)} training galaxies")
    print(f"colours, r, z:               MSE {photometry.mean():.4f} +- {results['photometry'][1]:.4f}")
    if all(c in cat.colnames for c in MORPHOLOGY):
        both = neighbour_mse(features(cat, train, True), features(cat, test, True), train_spectra, test_spectra,
                             args.k)
        diff = photometry - both
        results["with_morphology"] = [float(both.mean()), bootstrap_se(both)]
        results["improvement"] = [float(diff.mean()), bootstrap_se(diff)]
        print(f"+ B/T and sizes:              MSE {both.mean():.4f} +- {results['with_morphology'][1]:.4f}")
        print(f"improvement (paired):         {diff.mean():.4f} +- {results['improvement'][1]:.4f} "
              f"({100 * diff.mean() / photometry.mean():.1f}%)")
    else:
        print(f"(no morphology columns {', '.join(MORPHOLOGY)} in the catalog)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
