"""Benchmark: utils.astro.science.measure on G galaxies x N samples (the target: 5,000 x 25 in under a
minute on 2 cores).

    python bench/science_speed.py [--galaxies 5000] [--samples 25] [--downsample 16]

Spectra are kcorrect template mixtures at random redshifts with noise, on the NeurIPS grid
combined in blocks of ``--downsample`` pixels (16: the quick preset's 224 pixels; 1: all 3,598).
Prints the wall time of the redshift fitter's construction and of the measurement, and how well
the redshifts were recovered (a sanity check, not a quality figure).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from utils.astro.science import RedshiftFitter, measure
from utils.astro.spectra import block_grid, neurips_loglam
from utils.astro.templates import TemplateSpectra
from utils.eval.metrics import nmad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galaxies", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--downsample", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    loglam = block_grid(neurips_loglam(), args.downsample)
    wave = 10 ** loglam
    z = rng.uniform(0.02, 0.3, args.galaxies)
    clean = TemplateSpectra().observed(z, rng.uniform(0, 1, (args.galaxies, 5)), loglam).astype(np.float32)
    clean *= 10 / np.median(clean, 1, keepdims=True)
    m = args.galaxies * args.samples
    flux = np.repeat(clean, args.samples, axis=0)
    flux += rng.normal(0, 0.5, flux.shape).astype(np.float32)
    start = time.perf_counter()
    fitter = RedshiftFitter(wave)
    built = time.perf_counter()
    props = measure(flux, wave, fitter=fitter)
    done = time.perf_counter()
    dz = (props.z - np.repeat(z, args.samples)) / (1 + np.repeat(z, args.samples))
    print(f"{m} spectra x {len(wave)} pixels: fitter {built - start:.1f} s, measure {done - built:.1f} s "
          f"({m / (done - built):.0f} spectra/s); redshift sigma_NMAD {nmad(dz):.5f}, "
          f"outliers {np.mean(np.abs(dz) > 0.15):.4f}")


if __name__ == "__main__":
    main()
