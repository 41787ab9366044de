"""Figures: training progress grids, retrieval, ranked generated spectra, and the drawing
primitives other modules use (the mock survey's own figures live in utils.data.mock). Depends on
nothing of this project.

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


#: colours of the BPT classes in their order (unclassified, star-forming, composite, AGN)
BPT_COLOURS = ("0.7", "tab:blue", "tab:green", "tab:red")
#: scores of the low-resolution samples printed in a cascade figure's title (the best ones)
LOW_SCORES_SHOWN = 5


def plot_bpt(ax, log_nii_ha: np.ndarray, log_oiii_hb: np.ndarray, codes: np.ndarray, labels: Sequence[str],
             demarcations: Sequence, **style) -> None:
    """A BPT diagram on ``ax``: the points coloured by class code (``labels[code]`` in the legend)
    and each demarcation ``(label, function, largest x, line style)`` drawn up to its largest x."""
    codes = np.asarray(codes)
    for code, (label, colour) in enumerate(zip(labels, BPT_COLOURS)):
        pick = codes == code
        ax.plot(log_nii_ha[pick], log_oiii_hb[pick], linestyle="none", color=colour, label=label, **style)
    grid = np.linspace(-2.0, 0.5, 300)
    for label, curve, x_max, line_style in demarcations:
        ax.plot(grid[grid < x_max], curve(grid[grid < x_max]), color="k", linestyle=line_style, lw=1, label=label)
    ax.set_xlabel(r"log [N II] 6584 / H$\alpha$")
    ax.set_ylabel(r"log [O III] 5007 / H$\beta$")


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (creating its folder), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
    return save(fig, path)


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
    return save(fig, path)


def plot_ranked(path: str | Path, wave: np.ndarray, image: np.ndarray, truth: np.ndarray | None, mean: np.ndarray,
                topk_mean: np.ndarray, best: np.ndarray, best_scores: Sequence[float], top_k: int,
                title: str = "", low: tuple[np.ndarray, np.ndarray, Sequence[float]] | None = None) -> Path:
    """SPEC 4 figure for one galaxy: image, true spectrum, mean of all samples, mean of the top k,
    and the top-ranked samples, each titled with its contrastive score and MSE. ``low``: a
    cascade's first stage, ``(wave (L_low,), samples (N_low, L_low) ranked, their scores)``, drawn
    in a last panel over the true spectrum."""
    mse = (lambda s: f", MSE {np.mean((s - truth) ** 2):.4f}") if truth is not None else (lambda s: "")
    panels = [("mean of all samples" + mse(mean), wave, mean), (f"mean of the top {top_k}" + mse(topk_mean), wave,
                                                                 topk_mean)]
    panels += [(f"rank {j + 1}: score {best_scores[j]:.3f}" + mse(s), wave, s) for j, s in enumerate(best)]
    if low is not None:
        shown = ", ".join(f"{v:.2f}" for v in low[2][:LOW_SCORES_SHOWN])
        more = ", ..." if len(low[2]) > LOW_SCORES_SHOWN else ""
        panels.append((f"low-resolution stage: its {len(low[1])} samples, scores {shown}{more} (best first)",
                       low[0], low[1]))
    fig = plt.figure(figsize=(12, 1.7 * (len(panels) + 1)))
    grid = fig.add_gridspec(len(panels), 2, width_ratios=[1, 5])
    ax = fig.add_subplot(grid[:2, 0])
    show_image(ax, image)
    for i, (label, x, spec) in enumerate(panels):
        ax = fig.add_subplot(grid[i, 1])
        if truth is not None:
            ax.plot(wave, truth, color="0.6", lw=0.8, label="true spectrum")
        colour = "tab:blue" if i < 2 else ("tab:red" if x is wave else "tab:green")
        for row in np.atleast_2d(spec):
            ax.plot(x, row, color=colour, lw=0.9 if x is wave else 0.7, alpha=1.0 if x is wave else 0.6)
        ax.set_xlim(wave[0], wave[-1])
        ax.set_title(label, fontsize=9, loc="left")
        if i == 0 and truth is not None:
            ax.legend(fontsize=7, loc="lower right")
        if i < len(panels) - 1:
            ax.set_xticklabels([])
    ax.set_xlabel(WAVE_LABEL)
    fig.suptitle(title)
    return save(fig, path)
