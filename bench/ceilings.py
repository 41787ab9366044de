"""What an image can tell about a mock galaxy's spectrum at best (utils.eval.ceilings, whose
docstring says what each predictor is): oracle retrievals and small networks on the validation
(or test) split of a mock survey.

    python bench/ceilings.py [--root data/mock] [--k 25] [--galaxies 0] [--split val] [--out FILE.json]
                             [--preprocessing log] [--scatter-free] [--regression]

``--split test`` evaluates the same predictors on the test galaxies (generate.py's subset with
``--galaxies``), to read a test result against what those galaxies' images can tell; nothing is
fitted or chosen on them, and no setting may be chosen by these numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.data.dataset import open_survey
from utils.errors import UserError
from utils.eval.ceilings import ceilings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/mock")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--galaxies", type=int, default=0, help="galaxies of the split (0: all; generate.py's subset "
                                                             "of the same size otherwise)")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="the galaxies evaluated (test: to read a test result, never to choose)")
    ap.add_argument("--out", default=None, help="JSON output (default: bench/ceilings_<split>.json)")
    ap.add_argument("--preprocessing", choices=("scale", "log"), help="also the spectral oracle in these units")
    ap.add_argument("--downsample", type=int, default=16)
    ap.add_argument("--scatter-free", action="store_true", help="also the lines without the H-alpha scatter")
    ap.add_argument("--regression", action="store_true", help="also an MLP on catalog values and on image photometry")
    a = ap.parse_args()
    try:
        result = ceilings(open_survey(a.root), a.split, a.galaxies, a.k, a.regression, a.scatter_free,
                          a.preprocessing, a.downsample)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    Path(a.out or f"bench/ceilings_{a.split}.json").write_text(json.dumps(result, indent=1))
    keys = ("z_sigma_nmad", "dn4000_corr", "ew_halpha_corr", "ew_oiii_5007_corr", "ew_nii_6584_corr", "bpt_accuracy")
    print(f"{result['n_galaxies']} {a.split} galaxies, {a.k} nearest training galaxies in true catalog values; "
          f"BPT majority-class rate {result['majority_rate']:.3f}")
    print(f"{'features':<28}" + "".join(f"{k:>22}" for k in keys))
    for name, s in result["predictors"].items():
        print(f"{name:<28}" + "".join(f"{s[k][0]:>13.4f} +- {s[k][1]:.4f}" if k in s else f"{'-':>22}" for k in keys))
    if a.preprocessing:
        print(f"\nper-pixel MSE ({a.preprocessing} units, {a.downsample}-pixel blocks):")
        for name, value in result["spectral_mse"].items():
            if name not in ("preprocessing", "downsample"):
                print(f"  {name:<44} {value[0]:.5f} +- {value[1]:.5f}")


if __name__ == "__main__":
    main()
