"""Figures: mock survey overview, training progress grids, ranked generated spectra.

Every function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

WAVE_LABEL = r"observed wavelength [$\mathrm{\AA}$]"
FLUX_LABEL = r"$f_\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\mathrm{\AA}^{-1}$]"


def show_image(ax, image: np.ndarray) -> None:
    """Show a stored image: ``(64, 64, 3)`` uint8 colour, or ``(C, 64, 64)`` float (gri of ugriz
    or a normalised network input, rescaled to [0, 1] for display)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        ax.imshow(image, origin="lower")
    else:
        rgb = image[[3, 2, 1]] if image.shape[0] == 5 else image[:3]
        rgb = np.moveaxis(rgb, 0, -1)
        lo, hi = np.percentile(rgb, [1, 99.5])
        ax.imshow(np.clip((rgb - lo) / max(hi - lo, 1e-8), 0, 1), origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_mock_figures(root: str | Path, out_dir: str | Path, n_show: int = 6, seed: int = 1) -> list[Path]:
    """The README's mock figures: a galaxy grid and a colour-redshift diagram against the real catalog."""
    from utils.dataset import open_survey
    from utils.mock import TemplateSpectra, load_real_catalog, sample_galaxies

    survey = open_survey(root, check_values=False)
    wave = survey.wave
    rng = np.random.default_rng(seed)
    z = np.asarray(survey.catalog["z"])
    # one galaxy from each redshift slice, so the grid shows the range
    edges = np.quantile(z, np.linspace(0, 1, n_show + 1))
    rows = [int(rng.choice(np.flatnonzero((z >= lo) & (z <= hi)))) for lo, hi in zip(edges[:-1], edges[1:])]
    fig, axes = plt.subplots(n_show, 2, figsize=(11, 1.9 * n_show), gridspec_kw={"width_ratios": [1, 5]})
    for ax_img, ax_spec, row in zip(axes[:, 0], axes[:, 1], rows):
        show_image(ax_img, survey.images["gri"][row])
        ax_spec.plot(wave, survey.flux[row], lw=0.5, color="0.3")
        ax_spec.set_xlim(wave[0], wave[-1])
        lo, hi = np.percentile(survey.flux[row], [0.5, 99.8])
        ax_spec.set_ylim(lo - 0.1 * (hi - lo), hi + 0.2 * (hi - lo))
        cat = survey.catalog[row]
        ax_spec.text(0.01, 0.85, f"z = {cat['z']:.3f}   r = {cat['mag_r']:.2f}   B/T(r) = {cat['bulge_frac_r']:.2f}"
                     if "bulge_frac_r" in survey.catalog.colnames else f"z = {cat['z']:.3f}",
                     transform=ax_spec.transAxes, fontsize=8)
        ax_spec.set_ylabel(r"$f_\lambda$", fontsize=8)
    axes[-1, 1].set_xlabel(WAVE_LABEL)
    fig.suptitle("Mock SDSS galaxies: gri image (64 x 64, 0.396\"/px) and spectrum (1e-17 erg/s/cm2/A)")
    paths = [_save(fig, Path(out_dir) / "mock_galaxies.png")]

    # colour-redshift: real catalog photometry vs colours synthesised from the noiseless mock spectra
    import astropy.units as u
    import speclite.filters

    real = load_real_catalog()
    real_mag = -2.5 * np.log10(np.asarray(real["maggies"]))
    gal = sample_galaxies(len(survey), int(survey.meta.get("seed", 0)))
    pick = rng.choice(len(gal), size=min(1500, len(gal)), replace=False)
    grid = np.arange(3.52, 4.02, 1e-4)
    spec = TemplateSpectra().observed(gal.z[pick], gal.coeffs[pick], grid)
    filters = speclite.filters.load_filters("sdss2010-g", "sdss2010-r", "sdss2010-i")
    m = filters.get_ab_magnitudes(spec * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, 10 ** grid * u.AA)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (a, b), (ia, ib) in zip(axes, (("g", "r"), ("r", "i")), ((1, 2), (2, 3))):
        ax.scatter(real["z"], real_mag[:, ia] - real_mag[:, ib], s=2, alpha=0.3, color="tab:blue",
                   label=f"real SDSS (kcorrect sample, N={len(real)})")
        ax.scatter(gal.z[pick], m[f"sdss2010-{a}"] - m[f"sdss2010-{b}"], s=2, alpha=0.4, color="tab:red",
                   label=f"mock spectra, synthetic photometry (N={len(pick)})")
        ax.set_xlabel("redshift")
        ax.set_ylabel(f"{a} - {b} [AB mag]")
        ax.set_ylim(*((0, 1.6) if a == "g" else (0, 0.8)))
    axes[0].legend(loc="lower right", fontsize=8, markerscale=4)
    fig.suptitle("Colour-redshift: mock survey against the real SDSS galaxies it is built from")
    paths.append(_save(fig, Path(out_dir) / "mock_color_redshift.png"))
    return paths


def plot_spectra_grid(path: str | Path, wave: np.ndarray, images: Sequence[np.ndarray], truth: np.ndarray,
                      samples: np.ndarray, title: str = "", ylabel: str = "normalised flux") -> Path:
    """Grid for training progress: per row an image, the true spectrum and a few samples.

    ``truth`` is ``(G, L)``, ``samples`` ``(G, S, L)``, ``wave`` ``(L,)`` in A.
    """
    g = len(truth)
    fig, axes = plt.subplots(g, 2, figsize=(11, 1.9 * g), gridspec_kw={"width_ratios": [1, 5]}, squeeze=False)
    for i in range(g):
        show_image(axes[i, 0], images[i])
        axes[i, 1].plot(wave, truth[i], color="k", lw=0.8, label="true")
        for j in range(samples.shape[1]):
            axes[i, 1].plot(wave, samples[i, j], lw=0.6, alpha=0.7, label=f"sample {j + 1}")
        axes[i, 1].set_xlim(wave[0], wave[-1])
        axes[i, 1].set_ylabel(ylabel, fontsize=8)
    axes[0, 1].legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 1].set_xlabel(WAVE_LABEL)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_retrieval(path: str | Path, wave: np.ndarray, query: np.ndarray, query_image: np.ndarray,
                   images: Sequence[np.ndarray], image_scores: Sequence[float], image_is_true: Sequence[bool],
                   spectra: np.ndarray, spectra_scores: Sequence[float], title: str = "") -> Path:
    """One validation spectrum with the images and the spectra most similar to it.

    ``query`` ``(L,)``, ``spectra`` ``(S, L)`` (normalised flux), scores are cosine similarities.
    """
    k = len(images)
    fig = plt.figure(figsize=(12, 5.6))
    grid = fig.add_gridspec(2, k + 1, height_ratios=[1, 1.3])
    ax = fig.add_subplot(grid[0, 0])
    show_image(ax, query_image)
    ax.set_title("its own image", fontsize=9)
    for j in range(k):
        ax = fig.add_subplot(grid[0, j + 1])
        show_image(ax, images[j])
        mark = " (own)" if image_is_true[j] else ""
        ax.set_title(f"#{j + 1}  s={image_scores[j]:.2f}{mark}", fontsize=9, color="green" if image_is_true[j] else "k")
    ax = fig.add_subplot(grid[1, :])
    ax.plot(wave, query, color="k", lw=1.0, label="query spectrum")
    for j, (spec, score) in enumerate(zip(spectra, spectra_scores)):
        ax.plot(wave, spec, lw=0.6, alpha=0.8, label=f"most similar spectrum #{j + 1} (s={score:.2f})")
    ax.set_xlim(wave[0], wave[-1])
    ax.set_xlabel(WAVE_LABEL)
    ax.set_ylabel("normalised flux")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Most similar validation images and spectra to one spectrum")
    return _save(fig, path)


def plot_ranked(path: str | Path, wave: np.ndarray, image: np.ndarray, truth: np.ndarray | None, mean: np.ndarray,
                topk_mean: np.ndarray, best: np.ndarray, best_scores: Sequence[float], top_k: int,
                title: str = "") -> Path:
    """SPEC 4 figure for one galaxy: image, true spectrum, mean of all samples, mean of the top k,
    and the top-ranked samples, each titled with its contrastive score and MSE."""
    mse = (lambda s: f", MSE {np.mean((s - truth) ** 2):.4f}") if truth is not None else (lambda s: "")
    panels = [("mean of all samples" + mse(mean), mean), (f"mean of the top {top_k}" + mse(topk_mean), topk_mean)]
    panels += [(f"rank {j + 1}: score {best_scores[j]:.3f}" + mse(s), s) for j, s in enumerate(best)]
    fig = plt.figure(figsize=(12, 1.7 * (len(panels) + 1)))
    grid = fig.add_gridspec(len(panels), 2, width_ratios=[1, 5])
    ax = fig.add_subplot(grid[:2, 0])
    show_image(ax, image)
    for i, (label, spec) in enumerate(panels):
        ax = fig.add_subplot(grid[i, 1])
        if truth is not None:
            ax.plot(wave, truth, color="0.6", lw=0.8, label="true spectrum")
        ax.plot(wave, spec, color="tab:blue" if i < 2 else "tab:red", lw=0.9, label=label)
        ax.set_xlim(wave[0], wave[-1])
        ax.set_title(label, fontsize=9, loc="left")
        if i == 0 and truth is not None:
            ax.legend(fontsize=7, loc="lower right")
        if i < len(panels) - 1:
            ax.set_xticklabels([])
    ax.set_xlabel(WAVE_LABEL)
    fig.suptitle(title)
    return _save(fig, path)
