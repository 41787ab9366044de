"""The science evaluation of one generate.py run.

Measures every property of utils.astro.science on every generated sample, on the true spectra and on
the baselines' spectra (utils.eval.baselines), all in flux units on the dataset's grid and through the
same code, then summarises generation and baselines side by side with standard errors (bootstrap
over galaxies for medians, NMADs and correlations; the standard error of the mean for means):
redshift sigma_NMAD, bias and outliers; bias, scatter and rank correlation of Dn4000, the
equivalent widths, the lines' velocity dispersion, the Balmer-decrement E(B-V) and the N2
metallicity; BPT accuracy, confusion and the ROC AUC of the share of each galaxy's samples in each
class (which shows what the samples know where accuracy cannot: a mock's majority class can be
as accurate as any retrieval); MSE and CRPS per pixel; the coverage of the
samples' central 68% and 90% intervals per property and per pixel (widened by a calibration fitted
on validation galaxies where one is given, utils.eval.calibration). Where the catalog carries the
survey's own measurements (MPA-JHU columns of a real-SDSS dataset), the same statistics are also
computed against those. Finally every run judges the samples against the science targets
(:func:`targets`), each against a baseline of the same run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.astro.science import (
    BPT_CLASSES,
    BPT_DEMARCATIONS,
    DERIVED,
    LINES,
    PROPERTIES,
    RedshiftFitter,
    balmer_ebv,
    bpt_ratios,
    measure,
    n2_metallicity,
)
from utils.eval.calibration import PIXELS, Calibration, uncalibrated
from utils.eval.metrics import (
    COVERAGE_LEVELS,
    confusion,
    crps,
    inside_interval,
    interval_coverage,
    median_and_interval,
    property_stats,
    redshift_stats,
    reference_values,
    sample_properties,
)

#: predictors in the order of the console table: key -> column heading
PREDICTORS = {"samples": "generated", "mean_of_n": "mean of N", "knn_embedding": "kNN image",
              "mean_train": "mean train", "photo_z": "kNN photo-z", "observed": "true spectrum"}
#: properties whose point predictions are compared (the line fluxes go to the FITS file only)
COMPARED = ("dn4000", *(f"ew_{name}" for name in LINES), *DERIVED)
#: properties whose sample intervals' coverage is a science target
TARGET_COVERED = ("z", "dn4000", "ew_halpha", "ew_oiii_5007")
#: properties whose sample intervals are checked for coverage
COVERED = (*TARGET_COVERED, *DERIVED)
#: BPT classes judged by the ROC AUC of the predicted share of each galaxy in them
AUC_CLASSES = ("star-forming", "composite", "AGN")
#: survey catalog columns (MPA-JHU, SpecObj) -> (property, conversion)
SURVEY_COLUMNS = {
    "d4000_n": ("dn4000", lambda v: v),
    "h_alpha_eqw": ("ew_halpha", lambda v: -v),  # MPA-JHU equivalent widths are negative for emission
    "h_beta_eqw": ("ew_hbeta", lambda v: -v),
    "oiii_5007_eqw": ("ew_oiii_5007", lambda v: -v),
    "nii_6584_eqw": ("ew_nii_6584", lambda v: -v),
}
#: MPA-JHU BPTCLASS -> our codes: -1 unclassifiable, 1 and 2 star-forming (2: low S/N),
#: 3 composite, 4 AGN (non-LINER), 5 low-S/N LINER
MPA_BPT = {-1: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 3}


@dataclass
class ScienceReport:
    """What :func:`science_report` returns."""

    columns: dict  # name -> (G,) or (G, k) array, for spectra.fits
    summary: dict = field(default_factory=dict)  # for metrics.json
    table: str = ""  # for the console
    figure_data: dict = field(default_factory=dict)


def _sample_intervals(values: np.ndarray, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and the central 68% interval (16% and 84% quantiles, widened about the median by
    ``factor``) over the samples (axis 1), NaN where no sample has a value."""
    return median_and_interval(values, 0.68, factor)


def class_mode(codes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The most frequent of ``n_classes`` integer codes along axis 1 ``(G,)`` and its share."""
    counts = np.stack([(codes == c).sum(1) for c in range(n_classes)], 1)
    return counts.argmax(1), counts.max(1) / codes.shape[1]


def _mean_se(values: np.ndarray) -> list[float]:
    """Mean and its standard error over galaxies."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return [float(np.mean(values)) if len(values) else float("nan"), float("nan")]
    return [float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))]


def _stats_with_se(fn, pred: np.ndarray, true: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, list[float]]:
    """``fn(pred, true)``'s statistics, each as [value, bootstrap standard error over galaxies]."""
    value = fn(pred, true)
    rng = np.random.default_rng(seed)
    draws = [fn(pred[idx], true[idx]) for idx in (rng.integers(0, len(pred), len(pred)) for _ in range(n_boot))]
    out = {}
    for key, v in value.items():
        boot = np.asarray([d[key] for d in draws], dtype=np.float64)
        out[key] = [v, float(np.nanstd(boot, ddof=1)) if np.isfinite(boot).sum() > 1 else float("nan")]
    return out


def compare(predictions: dict, truth: dict, n_boot: int = 200) -> tuple[dict, dict]:
    """Statistics ``{predictor: {metric: [value, standard error]}}`` and BPT confusion matrices
    ``{predictor: (4, 4) list}`` of point predictions against ``truth`` (dicts of property arrays)."""
    stats, matrices = {}, {}
    for name, pred in predictions.items():
        out = {}
        if "z" in pred and "z" in truth:
            out.update({f"z_{k}": v for k, v in _stats_with_se(redshift_stats, pred["z"], truth["z"], n_boot).items()})
        for prop in COMPARED:
            if prop in pred and prop in truth:
                out.update({f"{prop}_{k}": v for k, v in
                            _stats_with_se(property_stats, pred[prop], truth[prop], n_boot).items()})
        if "bpt" in pred and "bpt" in truth:
            p, t = np.asarray(pred["bpt"]), np.asarray(truth["bpt"])
            out["bpt_accuracy"] = _mean_se((p == t).astype(float))
            matrices[name] = confusion(p, t, len(BPT_CLASSES)).tolist()
            shares = pred.get("bpt_shares", np.eye(len(BPT_CLASSES))[p])
            out.update(_stats_with_se(class_aucs, shares, t, n_boot))
        stats[name] = out
    return stats, matrices


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The area under the ROC curve of ``score`` for the boolean labels ``positive``: the chance
    that a random positive scores above a random negative, ties counting one half (the
    Mann-Whitney U statistic over the number of pairs); NaN without both labels."""
    from scipy.stats import mannwhitneyu

    positive = np.asarray(positive, bool)
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


def class_aucs(shares: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """``bpt_auc_<class>`` for each of :data:`AUC_CLASSES`: the ROC AUC of each galaxy's share
    ``(G, classes)`` in the class against whether its true class (``(G,)`` codes) is that one. A
    point prediction's share is 1 or 0; a constant share gives 0.5."""
    out = {}
    for name in AUC_CLASSES:
        c = BPT_CLASSES.index(name)
        out[f"bpt_auc_{name.replace('-', '_')}"] = roc_auc(np.asarray(shares)[:, c], np.asarray(true) == c)
    return out


def class_shares(codes: np.ndarray, n_classes: int = len(BPT_CLASSES)) -> np.ndarray:
    """The share ``(G, n_classes)`` of each galaxy's samples ``(G, N)`` in each class."""
    return np.stack([(np.asarray(codes) == c).mean(1) for c in range(n_classes)], 1)


def sample_columns(sample_props: dict, calibration: Calibration | None = None) -> dict:
    """The per-galaxy columns of the samples' properties ``{name: (G, N)}``: for every property the
    median ``<p>_gen`` and the central 68% interval ``<p>_gen_lo`` / ``<p>_gen_hi`` (widened by the
    ``calibration`` where one is given), the BPT class the samples hold most often ``bpt_gen`` and
    the share of them in it ``bpt_gen_frac``."""
    widen = (calibration or uncalibrated()).factor
    columns = {}
    for prop in PROPERTIES:
        med, lo, hi = _sample_intervals(sample_props[prop], widen(prop, 0.68))
        columns.update({f"{prop}_gen": med, f"{prop}_gen_lo": lo, f"{prop}_gen_hi": hi})
    columns["bpt_gen"], columns["bpt_gen_frac"] = class_mode(sample_props["bpt"], len(BPT_CLASSES))
    return columns


def predictions_of(columns: dict, samples: np.ndarray, samples_pre: np.ndarray | None, wave: np.ndarray,
                   fitter: RedshiftFitter, baselines: dict, photo_z: np.ndarray | None,
                   true_props: dict | None, bpt_shares: np.ndarray | None = None) -> tuple[dict, dict]:
    """Every predictor's properties ``{predictor: {property: (G,)}}`` and preprocessed spectra
    ``{predictor: (G, L) or None}``: the samples' medians (and ``bpt_shares``, the share of the
    samples in each BPT class, where given), the mean of the N samples, each spectral baseline, the
    photo-z and, where given, the observed true spectrum (the ceiling)."""
    predictions = {"samples": {k: columns[f"{k}_gen"] for k in PROPERTIES} | {"bpt": columns["bpt_gen"]},
                   "mean_of_n": measure(samples.mean(1), wave, fitter=fitter).table()}
    spectra_pre = {"samples": samples_pre, "mean_of_n": None if samples_pre is None else samples_pre.mean(1)}
    for name, (flux, pre) in baselines.items():
        predictions[name] = measure(flux, wave, fitter=fitter).table()
        spectra_pre[name] = pre
    if bpt_shares is not None:
        predictions["samples"]["bpt_shares"] = bpt_shares
    if photo_z is not None:
        predictions["photo_z"] = {"z": np.asarray(photo_z, dtype=np.float64)}
    if true_props is not None:
        predictions["observed"] = true_props
        spectra_pre["observed"] = None
    return predictions, spectra_pre


def truth_columns(true_props: dict, predictions: dict) -> dict:
    """The per-galaxy columns of the true spectra's properties (``<p>_true``, ``bpt_true``), the
    retrieval baseline's (``<p>_knn``, ``bpt_knn``) and the photo-z (``z_photo``)."""
    columns = {f"{prop}_true": true_props[prop] for prop in PROPERTIES} | {"bpt_true": true_props["bpt"]}
    if "knn_embedding" in predictions:
        columns |= {f"{prop}_knn": predictions["knn_embedding"][prop] for prop in PROPERTIES}
        columns["bpt_knn"] = predictions["knn_embedding"]["bpt"]
    if "photo_z" in predictions:
        columns["z_photo"] = predictions["photo_z"]["z"]
    return columns


def coverage_stats(stats: dict, sample_props: dict, truth_values: dict, samples_pre: np.ndarray | None,
                   truth_pre: np.ndarray | None, calibration: Calibration | None) -> None:
    """Add to the samples' statistics the share of truths inside their central intervals at each
    of :data:`COVERAGE_LEVELS` (``coverage68_<p>``), per pixel and for :data:`COVERED`; with a
    calibration, the widened intervals' and the samples' own (``..._raw``)."""
    widen = (calibration or uncalibrated()).factor
    covered = {PIXELS: (samples_pre, truth_pre)} if truth_pre is not None else {}
    covered.update({prop: (sample_props[prop], truth_values[prop]) for prop in COVERED})
    for prop, (values, reference) in covered.items():
        for level in COVERAGE_LEVELS:
            key = f"coverage{round(level * 100)}_{prop}"
            for suffix, factor in (("", widen(prop, level)), ("_raw", 1.0)) if calibration else (("", 1.0),):
                inside = inside_interval(values, reference, level, factor)
                if prop == PIXELS:  # each galaxy's share of pixels inside
                    inside = np.nanmean(inside, -1)
                stats["samples"][key + suffix] = _mean_se(inside[np.isfinite(inside)])


def science_report(samples: np.ndarray, wave: np.ndarray, truth: np.ndarray, samples_pre: np.ndarray | None = None,
                   truth_pre: np.ndarray | None = None, baselines: dict | None = None,
                   photo_z: np.ndarray | None = None, catalog=None, weights: np.ndarray | None = None,
                   n_boot: int = 200, split: str = "test", calibration: Calibration | None = None) -> ScienceReport:
    """The science evaluation of G galaxies whose true spectra are known.

    Parameters
    ----------
    samples : ``(G, N, L)`` generated spectra in flux units.
    wave : ``(L,)`` observed wavelengths, Angstrom.
    truth : ``(G, L)`` true spectra in flux units.
    samples_pre, truth_pre : the same in preprocessed units, for the per-pixel MSE, CRPS and coverage.
    baselines : ``{name: ((G, L) flux, (G, L) preprocessed)}`` spectral baselines (keys of
        :data:`PREDICTORS`), e.g. 'knn_embedding' and 'mean_train'.
    photo_z : ``(G,)`` photometric redshifts (the 'photo_z' predictor), or None.
    catalog : the galaxies' catalog rows: its 'z' is the redshift truth; MPA-JHU columns
        (:data:`SURVEY_COLUMNS`, 'bptclass') give the survey-value comparison.
    weights : ``(L,)`` pixel weights for the redshift fit (a typical inverse variance).
    split : which galaxies these are, for the table's title.
    calibration : interval widening fitted on other galaxies (utils.eval.calibration.calibrate): the
        intervals written and whose coverage is reported are the widened ones; the samples' own
        intervals' coverage is reported beside them (``coverage68_z_raw``). The samples are not
        changed.
    """
    g, n, _ = samples.shape
    fitter = RedshiftFitter(wave, weights=weights)
    sample_props = sample_properties(samples, wave, fitter)
    columns = sample_columns(sample_props, calibration)
    true_props = measure(truth, wave, fitter=fitter).table()
    truth_values, known = reference_values(true_props, catalog)
    # with a mock's intrinsic truth, the same code on the observed (noisy) true spectrum is the ceiling
    predictions, spectra_pre = predictions_of(columns, samples, samples_pre, wave, fitter, baselines or {}, photo_z,
                                              true_props if known else None, class_shares(sample_props["bpt"]))
    columns |= truth_columns(true_props, predictions)
    stats, matrices = compare(predictions, truth_values, n_boot)
    if truth_pre is not None:
        _pixel_stats(stats, spectra_pre, samples_pre, truth_pre)
    coverage_stats(stats, sample_props, truth_values, samples_pre, truth_pre, calibration)
    summary = {"truth": ("the catalog's true (intrinsic, noise-free) properties" if known else
                         "properties measured on the true spectra with the same code") + "; redshift: the catalog's",
               "n_galaxies": g, "n_samples": n, "predictors": stats, "bpt_classes": list(BPT_CLASSES),
               "bpt_confusion (rows true, columns predicted)": matrices}
    if calibration:
        summary["calibration"] = calibration.to_dict()
    counts = np.bincount(np.asarray(truth_values["bpt"]), minlength=len(BPT_CLASSES))
    summary["bpt_true_counts"] = dict(zip(BPT_CLASSES, counts.tolist()))
    summary["bpt_majority_rate"] = float(counts.max() / g)
    summary["targets"] = targets(stats, summary["bpt_majority_rate"])
    table = (format_science_table(stats, g, n, split=split) + f"\ntruth: {summary['truth']}\ntrue BPT classes: "
             + ", ".join(f"{name} {c}" for name, c in zip(BPT_CLASSES, counts))
             + f" (majority-class rate {counts.max() / g:.2f})\n\n" + format_targets(summary["targets"]))
    survey_truth = survey_values(catalog)
    if survey_truth:
        survey_stats, survey_matrices = compare({k: v for k, v in predictions.items() if k != "photo_z"},
                                                survey_truth, n_boot)
        summary["against_survey_values"] = {"columns": sorted(survey_truth), "predictors": survey_stats,
                                            "bpt_confusion (rows true, columns predicted)": survey_matrices}
        table += "\n\n" + format_science_table(
            survey_stats, g, n, f"Against the survey's own measurements (MPA-JHU; {', '.join(sorted(survey_truth))}):")
    figure_data = {"truth": truth_values, "intrinsic": known, "true_props": true_props, "predictions": predictions,
                   "sample_props": sample_props, "samples_pre": samples_pre, "truth_pre": truth_pre,
                   "calibration": calibration}
    return ScienceReport(columns, summary, table, figure_data)


def _pixel_stats(stats: dict, spectra_pre: dict, samples_pre: np.ndarray, truth_pre: np.ndarray) -> None:
    """MSE (one sample for 'samples', else the prediction) and CRPS per pixel, each as the mean
    over galaxies with its standard error; and the paired per-galaxy differences against the kNN
    image baseline ('mse_minus_knn' of the mean of N, 'crps_minus_knn' of the samples), whose
    standard errors are far smaller than either's."""
    per_galaxy = {}
    for name, pre in spectra_pre.items():
        if pre is None:
            continue
        if name == "samples":
            per_galaxy[name] = (((pre - truth_pre[:, None]) ** 2).mean((1, 2)), crps(pre, truth_pre).mean(-1))
        else:  # a point forecast's CRPS is its absolute error
            per_galaxy[name] = (((pre - truth_pre) ** 2).mean(-1), np.abs(pre - truth_pre).mean(-1))
        stats[name]["mse"], stats[name]["crps_pixels"] = map(_mean_se, per_galaxy[name])
    if "knn_embedding" in per_galaxy:
        knn_mse, knn_crps = per_galaxy["knn_embedding"]
        stats["mean_of_n"]["mse_minus_knn"] = _mean_se(per_galaxy["mean_of_n"][0] - knn_mse)
        stats["samples"]["crps_minus_knn"] = _mean_se(per_galaxy["samples"][1] - knn_crps)


def survey_values(catalog) -> dict:
    """The survey's own measurements in the catalog (MPA-JHU), converted to our conventions."""
    if catalog is None:
        return {}
    out = {}
    for column, (prop, convert) in SURVEY_COLUMNS.items():
        if column in catalog.colnames:
            values = np.ma.filled(np.ma.asarray(catalog[column], dtype=np.float64), np.nan)
            out[prop] = np.where(values == -9999, np.nan, convert(values))  # MPA-JHU's missing-value flag
    if "bptclass" in catalog.colnames:
        codes = np.ma.filled(np.ma.asarray(catalog["bptclass"]), -1).astype(int)
        out["bpt"] = np.array([MPA_BPT.get(int(c), 0) for c in codes])
    lines = {"halpha": "h_alpha", "hbeta": "h_beta", "nii_6584": "nii_6584"}
    if all(f"{col}_{what}" in catalog.colnames for col in lines.values() for what in ("flux", "flux_err")):
        read = lambda name: np.ma.filled(np.ma.asarray(catalog[name], dtype=np.float64), np.nan)  # noqa: E731
        flux = {ours: read(f"{col}_flux") for ours, col in lines.items()}
        err = {ours: np.where(read(f"{col}_flux_err") > 0, read(f"{col}_flux_err"), np.nan)
               for ours, col in lines.items()}
        out["ebv_gas"] = balmer_ebv(flux, err)  # the survey's fluxes through our conventions
        if "bpt" in out:
            out["oh_n2"] = n2_metallicity(flux, err, out["bpt"])
    if out and "z" in catalog.colnames:
        out["z"] = np.asarray(catalog["z"], dtype=np.float64)
    return out


#: the central intervals' required coverage: nominal level -> (lowest, highest) share inside
COVERAGE_TARGETS = {0.68: (0.63, 0.73), 0.90: (0.86, 0.94)}
#: rank correlations with the truth the samples' median must reach
CORRELATION_TARGETS = {"ew_halpha": 0.6, "dn4000": 0.8}


def targets(stats: dict, majority_rate: float) -> list[dict]:
    """The method's targets, each judged against the baselines of the same run on the same galaxies.

    Returns one dict per target: ``target`` (what is required), ``value`` ([value, standard
    error] of the generation), ``reference`` (the baseline value or the required range, as text)
    and ``met`` (bool; None where the run could not measure it, e.g. without a baseline).
    """
    gen, mean_n = stats.get("samples", {}), stats.get("mean_of_n", {})
    knn, photo = stats.get("knn_embedding", {}), stats.get("photo_z", {})
    rows = []

    def add(target, value, reference, met):
        finite = value is not None and np.isfinite(value[0])
        rows.append({"target": target, "value": value if finite else None, "reference": reference,
                     "met": bool(met) if finite and met is not None else None})

    diff = mean_n.get("mse_minus_knn")
    add("MSE of the mean of N below the kNN image average", mean_n.get("mse"),
        f"kNN {knn['mse'][0]:.4f}; paired difference {diff[0]:+.4f} +- {diff[1]:.4f}" if diff else "no kNN baseline",
        diff[0] < 0 if diff else None)
    ref = photo.get("z_sigma_nmad")
    add("redshift sigma_NMAD below the colour photo-z", gen.get("z_sigma_nmad"),
        f"photo-z {ref[0]:.4f} +- {ref[1]:.4f}" if ref else "no photo-z baseline",
        gen["z_sigma_nmad"][0] < ref[0] if ref and "z_sigma_nmad" in gen else None)
    for prop, floor in CORRELATION_TARGETS.items():
        value = gen.get(f"{prop}_corr")
        add(f"{prop} rank correlation with the truth >= {floor}", value, f">= {floor}",
            value[0] >= floor if value else None)
    value, ref = gen.get("bpt_accuracy"), knn.get("bpt_accuracy")
    bar = max(majority_rate, ref[0] if ref else -np.inf)
    add("BPT accuracy above the majority class and the kNN image average", value,
        f"majority {majority_rate:.3f}" + (f", kNN {ref[0]:.3f}" if ref else ""),
        value[0] > bar if value else None)
    for prop in ("pixels", *TARGET_COVERED):
        for level, (lo, hi) in COVERAGE_TARGETS.items():
            value = gen.get(f"coverage{round(level * 100)}_{prop}")
            add(f"{round(level * 100)}% intervals cover {lo:.0%}-{hi:.0%}: {prop}", value, f"{lo:.2f}-{hi:.2f}",
                lo <= value[0] <= hi if value else None)
    return rows


def format_targets(rows: list[dict]) -> str:
    """The targets as console lines: met / missed / not measured, value +- standard error, reference."""
    met = sum(r["met"] is True for r in rows)
    lines = [f"Science targets: {met} of {len(rows)} met"]
    for r in rows:
        mark = {True: "met   ", False: "missed", None: "n/a   "}[r["met"]]
        value = f"{r['value'][0]:.4f} +- {r['value'][1]:.4f}" if r["value"] else "-"
        lines.append(f"  {mark} {r['target']:<62} {value:>20}   ({r['reference']})")
    return "\n".join(lines)


#: console rows: (metric key, label)
TABLE_ROWS = (("mse", "MSE per pixel (preprocessed)"), ("crps_pixels", "CRPS per pixel (point: MAE)"),
              ("z_sigma_nmad", "redshift sigma_NMAD"), ("z_bias", "redshift bias"),
              ("z_outliers", "redshift outliers (>0.15)"), ("dn4000_bias", "Dn4000 bias"),
              ("dn4000_scatter", "Dn4000 scatter (NMAD)"), ("dn4000_corr", "Dn4000 rank corr."),
              ("ew_halpha_corr", "EW(Ha) rank corr."), ("ew_hbeta_corr", "EW(Hb) rank corr."),
              ("ew_oiii_5007_corr", "EW([OIII]) rank corr."), ("ew_nii_6584_corr", "EW([NII]) rank corr."),
              ("sigma_lines_bias", "line sigma bias (km/s)"), ("sigma_lines_scatter", "line sigma scatter (km/s)"),
              ("sigma_lines_corr", "line sigma rank corr."), ("ebv_gas_bias", "E(B-V) Balmer bias"),
              ("ebv_gas_scatter", "E(B-V) Balmer scatter"), ("ebv_gas_corr", "E(B-V) Balmer rank corr."),
              ("oh_n2_bias", "12+log(O/H) N2 bias"), ("oh_n2_scatter", "12+log(O/H) N2 scatter"),
              ("oh_n2_corr", "12+log(O/H) N2 rank corr."),
              ("bpt_accuracy", "BPT class accuracy"),
              *((f"bpt_auc_{c.replace('-', '_')}", f"BPT ROC AUC: {c}") for c in AUC_CLASSES),
              ("mse_minus_knn", "MSE minus kNN's (paired)"),
              ("crps_minus_knn", "CRPS minus kNN's (paired)"),
              *((f"coverage{round(lv * 100)}_{p}{raw}", f"{round(lv * 100)}% interval coverage: {p}{label}")
                for raw, label in (("", ""), ("_raw", " (raw)")) for p in (PIXELS, *COVERED) for lv in COVERAGE_LEVELS))


def format_science_table(stats: dict, g: int, n: int, title: str | None = None, split: str = "test") -> str:
    """Generation and baselines side by side, value +- standard error, '-' where not applicable,
    under ``title`` (default: what the table is over)."""
    names = [k for k in PREDICTORS if k in stats]
    width, col = 38, 17
    title = title or (f"Science evaluation over {g} {split} galaxies ({n} samples each; 'generated' = median of the "
                      f"samples' values; +- standard error)")
    lines = [title, f"{'':<{width}}" + "".join(f"{PREDICTORS[k]:>{col}}" for k in names),
             "-" * (width + col * len(names))]
    for key, label in TABLE_ROWS:
        if not any(key in stats[k] for k in names):
            continue
        cells = []
        for k in names:
            if key in stats[k] and np.isfinite(stats[k][key][0]):
                value, se = stats[k][key]
                cells.append(f"{value:.4f}+-{se:.4f}" if np.isfinite(se) else f"{value:.4f}")
            else:
                cells.append("-")
        lines.append(f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    return "\n".join(lines)


def science_figures(folder: Path, report: ScienceReport) -> list[Path]:
    """Generated against true redshift and Dn4000, a BPT diagram of true and generated line
    ratios, and the samples' coverage against the nominal level."""
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

    from utils.plotting import plot_bpt, save

    d = report.figure_data
    if not d:
        return []
    truth, preds, cols = d["truth"], d["predictions"], report.columns
    paths = []
    for prop, label in (("z", "redshift"), ("dn4000", "Dn4000")):
        fig, ax = plt.subplots(figsize=(5.2, 5))
        t = truth[prop]
        err = np.abs(np.stack([cols[f"{prop}_gen"] - cols[f"{prop}_gen_lo"],
                               cols[f"{prop}_gen_hi"] - cols[f"{prop}_gen"]]))
        ax.errorbar(t, cols[f"{prop}_gen"], yerr=np.nan_to_num(err), fmt="o", ms=3, lw=0.6, alpha=0.7,
                    label="generated: median, 16-84%")
        if "knn_embedding" in preds:
            ax.plot(t, preds["knn_embedding"][prop], "s", ms=3, alpha=0.6, label="kNN image embedding")
        if prop == "z" and "photo_z" in preds:
            ax.plot(t, preds["photo_z"]["z"], "^", ms=3, alpha=0.6, label="kNN photo-z")
        finite = t[np.isfinite(t)]
        if len(finite):
            lim = [finite.min(), finite.max()]
            ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel(f"true {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.legend(fontsize=8)
        paths.append(save(fig, folder / f"science_{prop}.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    intrinsic = d["intrinsic"]
    shown = truth if intrinsic else d["true_props"]
    generated = {f"flux_{name}": cols[f"flux_{name}_gen"] for name in LINES}
    panels = (("truth (the catalog's intrinsic lines)" if intrinsic else "true spectra", shown, shown["bpt"]),
              ("generated (median line fluxes; class: the samples' mode)", generated, cols["bpt_gen"]))
    for ax, (title, fluxes, codes) in zip(axes, panels):
        x, y = bpt_ratios(fluxes, "flux_")
        labels = [f"{name} ({int(np.sum(np.asarray(codes) == c))})" + (" [S/N < 3]" if c == 0 else "")
                  for c, name in enumerate(BPT_CLASSES)]
        plot_bpt(ax, x, y, codes, labels, BPT_DEMARCATIONS, marker="o", ms=3, alpha=0.7)
        ax.set_xlim(-1.6, 0.6)
        ax.set_ylim(-1.3, 1.5)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    paths.append(save(fig, folder / "science_bpt.png"))

    levels = np.linspace(0.1, 0.9, 9)
    calibration = d.get("calibration")
    panels = [("the samples' own intervals (above the diagonal: too wide)", None)]
    if calibration:
        panels.append((f"widened by the calibration fitted on {calibration.n_galaxies} {calibration.split} galaxies",
                       calibration))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False, sharey=True)
    for ax, (title, cal) in zip(axes[0], panels):
        factor = (cal or uncalibrated()).factor
        for prop in COVERED:
            ax.plot(levels, [interval_coverage(d["sample_props"][prop], truth[prop], lv, factor(prop, lv))
                             for lv in levels], "o-", ms=3, label=prop)
        if d["samples_pre"] is not None:
            ax.plot(levels, [interval_coverage(d["samples_pre"], d["truth_pre"], lv, factor(PIXELS, lv))
                             for lv in levels], "k-", lw=2, label=PIXELS)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("nominal central-interval level")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("share of truths inside")
    paths.append(save(fig, folder / "science_coverage.png"))
    return paths
