"""What an image can tell about a mock galaxy's spectrum at best: oracle retrievals and small
networks on the validation (or test) split (bench/ceilings.py is the command line).

The image of a mock galaxy is made from its ugriz light profiles: everything it holds about the
spectrum is in the galaxy's colours, magnitude, bulge share and sizes (plus noise and pixels).
This retrieves, for each validation galaxy, the k training galaxies nearest in those **true,
noise-free** catalog values (standardised; the photo-z baseline's search, utils.eval.baselines) and
predicts the median of their redshifts, Dn4000 and equivalent widths and the mode of their BPT
classes. That is a retrieval
with perfect information, not an upper bound proven for every model, but a generated spectrum
that beats it would be a surprise: where it falls short of a science target, the target asks
for physics the mock does not put in the image (the drawn line strengths are scattered 0.35 dex
around star formation, AGN are drawn at random with a probability that rises with bulge mass).
A second row adds the true redshift to the features (what a perfect redshift would add).

The statistics are utils.eval.report.compare's, the same code as generate.py's science evaluation.

With ``--preprocessing log --downsample 16`` (a dataset's preparation) it also averages the same
neighbours' spectra in those units, as the kNN image baseline does (utils.eval.baselines), and reports
the per-pixel MSE of that oracle spectral retrieval, of the mean training spectrum, and the
observational noise floor of the true spectra (the mean squared change of an observed spectrum
when a second noise draw at its inverse variance is added: the error of a perfect prediction of
the noise-free spectrum; 20 draws): what an image could tell about the whole
spectrum to a retrieval, against which generate.py's MSEs can be read.

With ``--scatter-free`` it regenerates the mock (its seed and size from meta.json, in a temporary
folder, about 2 minutes) without the 0.35 dex scatter of the star-forming H-alpha
(utils.data.mock_physics.draw_lines) and takes those line strengths as a prediction: the same galaxies
with the same images, redshifts, dust, metallicities and AGN, so this is what a predictor that
knew everything about a galaxy except that one draw would reach; since the image holds nothing of
the draw, it bounds the equivalent widths' correlations of any image-based method from above
(exactly for the correlation of log H-alpha where no AGN adds to the line; approximately for rank
correlations).

With ``--regression`` a small neural network (two hidden layers of 64) is trained on the training
galaxies to predict log equivalent widths, Dn4000 and redshift: from the same true catalog values;
from the true colours and r magnitude alone; from the colours and r measured on the ugriz images
themselves (their summed fluxes as asinh magnitudes, with the images' sky and photon noise); and
from those plus the colours and r inside the fibre's circle at the image centre (what the images
say about the light the fibre sees). Smoother than the 25-neighbour median, and the last two see
only what the noisy images show (10% of the training galaxies stop its training; the validation
galaxies are only evaluated).

``--split test`` evaluates the same predictors on the test galaxies (generate.py's subset with
``--galaxies``), to read a test result against what those galaxies' images can tell; nothing is
fitted or chosen on them (the predictors learn from the training split only), and no setting
of the project may be chosen by these numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.astro.photometry import FIBRE_DIAMETER, fibre_diameters, photometry_features
from utils.astro.science import BPT_CLASSES
from utils.data.dataset import BANDS, SpectraDataset, open_survey
from utils.data.survey import subset_rows
from utils.errors import UserError
from utils.eval.baselines import catalog_neighbours, colour_features, neighbour_average
from utils.eval.metrics import catalog_truth
from utils.eval.report import class_mode, compare


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
    from utils.astro.spectra import preprocess

    train = SpectraDataset(survey, "train", preprocessing=preprocessing, downsample=downsample)
    val = train.like(val_rows)
    cat = survey.catalog
    idx = catalog_neighbours(features(cat[train.rows], False), features(cat[val.rows], False), k)
    truth = np.stack([val.spectrum(i)[0] for i in range(len(val))])
    mean_train = np.mean([train.spectrum(i)[0] for i in range(len(train))], axis=0)
    flux, ivar = val.all_flux()
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


#: what the regression predicts (equivalent widths as log10(EW + 1))
REGRESSED = ("z", "dn4000", "ew_hbeta", "ew_oiii_5007", "ew_halpha", "ew_nii_6584")


def image_photometry(survey, rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """utils.astro.photometry's colours u-g, g-r, r-i, i-z and r of the ugriz images' summed fluxes,
    then those inside the fibre's circle at the image centre ``(N, 10)`` (the mock centres galaxy
    and fibre within half a pixel of it)."""
    if "ugriz" not in survey.images:
        raise UserError(f"{survey.root}: the regression on image photometry needs the ugriz images (images_ugriz.npy)")
    fibre = fibre_diameters(survey.catalog[rows], survey.meta)
    return np.concatenate([photometry_features(survey.images["ugriz"][rows[i:i + chunk]], fibre[i:i + chunk])
                           for i in range(0, len(rows), chunk)]).astype(np.float64)


def regression(x_train: np.ndarray, truth_train: dict, x_val: np.ndarray, seed: int = 0, epochs: int = 150) -> dict:
    """An MLP's predictions of :data:`REGRESSED` for ``x_val``, trained on ``x_train`` with the
    epoch of the lowest loss on a held-out tenth of the training galaxies."""
    import torch

    def target(prop, values):
        return np.log10(np.clip(values, 0, None) + 1) if prop.startswith("ew_") else values

    y = np.stack([target(p, truth_train[p]) for p in REGRESSED], 1)
    good = np.all(np.isfinite(x_train), 1) & np.all(np.isfinite(y), 1)
    x_train, y = x_train[good], y[good]
    xm, xs, ym, ys = x_train.mean(0), x_train.std(0) + 1e-12, y.mean(0), y.std(0) + 1e-12
    rng = np.random.default_rng(seed)
    hold = rng.random(len(y)) < 0.1
    fit_rows = torch.as_tensor(np.flatnonzero(~hold))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                              torch.nn.SiLU(), torch.nn.Linear(64, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-5)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    xt, yt = as_t((x_train - xm) / xs), as_t((y - ym) / ys)
    best, state = np.inf, None
    for _ in range(epochs):
        for idx in torch.randperm(len(fit_rows)).split(256):
            rows = fit_rows[idx]
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(xt[rows]), yt[rows]).backward()
            opt.step()
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(net(xt[hold]), yt[hold]))
        if loss < best:
            best, state = loss, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    with torch.no_grad():
        pred = net(as_t(np.nan_to_num((x_val - xm) / xs))).numpy() * ys + ym
    return {p: (10 ** pred[:, i] - 1 if p.startswith("ew_") else pred[:, i]) for i, p in enumerate(REGRESSED)}


def scatter_free(survey, val_rows: np.ndarray) -> dict:
    """The validation galaxies' true line properties in the same mock regenerated without the
    H-alpha scatter (see the module docstring)."""
    import tempfile

    from utils.data.mock import generate_mock

    meta = survey.meta
    fibre = {v: k for k, v in FIBRE_DIAMETER.items()}[meta.get("fibre_arcsec", 3.0)]
    with tempfile.TemporaryDirectory() as tmp:
        again = open_survey(generate_mock(Path(tmp) / "mock", meta["n_requested"], meta["seed"], fibre=fibre,
                                          halpha_scatter_dex=0.0))
        if not np.array_equal(np.asarray(again.catalog["objid"]), np.asarray(survey.catalog["objid"])):
            raise UserError(f"{survey.root}: regenerating the mock from meta.json (seed {meta['seed']}, "
                            f"{meta['n_requested']} objects) gave other galaxies: was it made by this version?")
        return {k: v for k, v in catalog_truth(again.catalog[val_rows]).items() if k.startswith("ew_")}


def ceilings(survey, split: str = "val", galaxies: int = 0, k: int = 25, regressions: bool = False,
             scatter: bool = False, preprocessing: str | None = None, downsample: int = 16) -> dict:
    """Every predictor of the module docstring on the ``split`` galaxies of a mock ``survey``
    (``galaxies`` > 0: generate.py's subset of that many), the statistics of utils.eval.report.compare
    for each, the BPT majority-class rate and, with ``preprocessing``, the spectral oracle's MSE."""
    cat = survey.catalog
    if "true_ew_halpha" not in cat.colnames:
        raise UserError(f"{survey.root}: not a mock survey with true properties (no true_ew_halpha column)")
    evaluated = survey.rows(split)
    if len(evaluated) == 0:
        raise UserError(f"{survey.root}: no galaxies in the {split} split")
    if galaxies:
        evaluated = subset_rows(evaluated, galaxies, seed=0)
    train_cat, eval_cat = cat[survey.rows("train")], cat[evaluated]
    truth = catalog_truth(eval_cat) | {"z": np.asarray(eval_cat["z"], dtype=float)}
    predictions = {"colours, r, B/T, sizes": oracle(train_cat, eval_cat, k, False),
                   "the same + true z": oracle(train_cat, eval_cat, k, True)}
    if regressions:
        train_truth = catalog_truth(train_cat) | {"z": np.asarray(train_cat["z"], dtype=float)}
        predictions["MLP: colours, r, B/T, sizes"] = regression(features(train_cat, False), train_truth,
                                                                features(eval_cat, False))
        predictions["MLP: colours, r"] = regression(colour_features(train_cat), train_truth, colour_features(eval_cat))
        # total colours and r first, then the fibre circle's
        photometry = {name: image_photometry(survey, rows) for name, rows in
                      (("train", survey.rows("train")), ("evaluated", evaluated))}
        total = len(BANDS)
        predictions["MLP: image photometry"] = regression(photometry["train"][:, :total], train_truth,
                                                          photometry["evaluated"][:, :total])
        predictions["MLP: + fibre aperture"] = regression(photometry["train"], train_truth, photometry["evaluated"])
    if scatter:
        predictions["all but the H-alpha scatter"] = scatter_free(survey, evaluated)
    stats, _ = compare(predictions, truth)
    counts = np.bincount(truth["bpt"], minlength=len(BPT_CLASSES))
    result = {"root": str(survey.root), "split": split, "k": k, "n_galaxies": len(evaluated),
              "majority_rate": float(counts.max() / len(evaluated)), "predictors": stats}
    if preprocessing:
        result["spectral_mse"] = {"preprocessing": preprocessing, "downsample": downsample,
                                  **spectral_oracle(survey, evaluated, k, preprocessing, downsample)}
    return result
