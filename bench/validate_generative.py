"""Validate a trained diffusion model on more galaxies than its run's in-training validation.

    python bench/validate_generative.py [RUN_OR_CHECKPOINT] [--galaxies 975] [--steps 5] [--n 25]

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
from pathlib import Path

from utils.eval.metrics import ratio_se
from utils.generation import validate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=None, help="run folder or checkpoint file")
    parser.add_argument("--galaxies", type=int, default=975)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's val.steps)")
    parser.add_argument("--n", type=int, default=None, help="samples per galaxy (default: the run's val.n_samples)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    v = validate_run(args.run, args.galaxies, args.steps, args.n, progress=True)
    mse, base, path = v["mse"], v["base"], v["checkpoint"]
    ratio = float(mse.mean() / base.mean())
    half = len(mse) // 2
    result = {"checkpoint": str(path), "galaxies": len(mse), "sampler": "ddim", "steps": v["steps"],
              "n_samples": v["n_samples"], "mse_mean": float(mse.mean()), "mse_mean_train_spectrum": float(base.mean()),
              "mse_ratio": ratio, "mse_ratio_se": ratio_se(mse, base),
              "mse_ratio_halves": [float(mse[:half].mean() / base[:half].mean()),
                                   float(mse[half:].mean() / base[half:].mean())]}
    print(f"{path}: {len(mse)} validation galaxies, DDIM {v['steps']} steps, mean of {v['n_samples']}: "
          f"MSE {result['mse_mean']:.5f} / mean-spectrum MSE {result['mse_mean_train_spectrum']:.5f} = "
          f"{ratio:.3f} +- {result['mse_ratio_se']:.3f} (halves {result['mse_ratio_halves'][0]:.3f}, "
          f"{result['mse_ratio_halves'][1]:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
