"""Validate a trained diffusion model on more galaxies than its run's in-training validation.

    python bench/validate_generative.py [RUN_OR_CHECKPOINT] [--galaxies 975] [--sampler ddim]
                                        [--steps 5] [--n 25]

The same measure as ``train_generative.py``'s validation (EMA weights; MSE of the mean of N
samples against the truth, over the MSE of the mean training spectrum), on a validation subset
of ``--galaxies`` (all of them when larger than the split). Per-galaxy errors are heavy-tailed,
so a small subset can read far better or worse than the split: the ratio is printed with a
bootstrap standard error. RUN defaults to the newest finished run in runs/generative (its best
checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.builders import GENERATIVE_PARAMS, build_diffusion  # noqa: E402
from utils.checkpoints import MEAN_SPECTRUM_KEY, default_runs  # noqa: E402
from utils.dataset import SpectraDataset  # noqa: E402
from utils.generation import build_denoiser, load_trained, mean_spectrum, validation_errors  # noqa: E402
from utils.runtime import default_device  # noqa: E402
from utils.training import load_survey, subset  # noqa: E402


def bootstrap_ratio_se(mse: np.ndarray, base: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """Standard error of mean(mse) / mean(base) over galaxies, by resampling galaxies."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(mse), (draws, len(mse)))
    return float(np.std(mse[idx].mean(1) / base[idx].mean(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=None, help="run folder or checkpoint file")
    parser.add_argument("--galaxies", type=int, default=975)
    parser.add_argument("--sampler", default=None, help="default: the run's val.sampler")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's val.steps")
    parser.add_argument("--n", type=int, default=None, help="samples per galaxy (default: the run's val.n_samples)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    config, weights, path, info = load_trained(args.run, default_runs(GENERATIVE_PARAMS), "diffusion model", "generative")
    v = config["val"]
    v.update({k: val for k, val in (("sampler", args.sampler), ("steps", args.steps), ("n_samples", args.n))
              if val is not None})
    d = config["data"]
    survey = load_survey(config)
    train = SpectraDataset.from_config(survey, "train", d)
    val = subset(SpectraDataset.from_config(survey, "val", d), args.galaxies,
                 seed=config["run"]["seed"])
    device = default_device()
    model = build_denoiser(config, weights, path, val.n_pixels, val.n_channels, device)
    baseline = info.get(MEAN_SPECTRUM_KEY)
    baseline = mean_spectrum(train) if baseline is None else baseline
    mse, base, _ = validation_errors(model, build_diffusion(config), val, config, device, baseline, progress=True)
    ratio = float(mse.mean() / base.mean())
    half = len(mse) // 2
    result = {"checkpoint": str(path), "galaxies": len(mse), "sampler": v["sampler"], "steps": v["steps"],
              "n_samples": v["n_samples"], "mse_mean": float(mse.mean()), "mse_mean_train_spectrum": float(base.mean()),
              "mse_ratio": ratio, "mse_ratio_se": bootstrap_ratio_se(mse, base),
              "mse_ratio_halves": [float(mse[:half].mean() / base[:half].mean()),
                                   float(mse[half:].mean() / base[half:].mean())]}
    print(f"{path}: {len(mse)} validation galaxies, {v['sampler']} {v['steps']} steps, mean of {v['n_samples']}: "
          f"MSE {result['mse_mean']:.5f} / mean-spectrum MSE {result['mse_mean_train_spectrum']:.5f} = "
          f"{ratio:.3f} +- {result['mse_ratio_se']:.3f} (halves {result['mse_ratio_halves'][0]:.3f}, "
          f"{result['mse_ratio_halves'][1]:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
