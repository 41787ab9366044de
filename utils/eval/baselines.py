"""Honest reference predictors, computed in generate.py's run on exactly the galaxies it evaluates.

- the mean training spectrum (one spectrum for every galaxy);
- retrieval: the average of the preprocessed spectra of the k training galaxies whose images are
  nearest to the galaxy's image in the contrastive image embedding;
- a photometric redshift: the median redshift of the k training galaxies nearest in catalog
  colours and r magnitude (standardised), found with scipy's k-d tree.

Each returns values for the evaluated galaxies in their order; generate.py measures the spectral
ones with the same property code (utils.astro.science) as the generated spectra.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from utils.data.dataset import BANDS, SpectraDataset

logger = logging.getLogger(__name__)

#: catalog features of the photometric redshift: adjacent-band colours and the r magnitude
PHOTO_Z_COLUMNS = tuple(f"mag_{b}" for b in BANDS)
#: neighbours averaged by the retrieval and the photo-z
NEIGHBOURS = 25
#: training galaxies the baselines search at most (a fixed random subset of the training split):
#: their images are embedded once per generate.py run
TRAIN_SEARCHED = 20000


@torch.no_grad()
def embed_images(contrastive, dataset: SpectraDataset, device: torch.device, batch_size: int = 256,
                 desc: str = "embed images") -> torch.Tensor:
    """Unit image embeddings ``(len(dataset), D)`` of every galaxy of ``dataset`` (evaluation transform)."""
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False):
        images = torch.stack([dataset.image(i) for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(contrastive.embed_images(images.to(device)).float().cpu())
    return torch.cat(out)


def embedding_neighbours(query: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices ``(G, k)`` of the ``k`` reference embeddings most similar (cosine) to each query."""
    k = min(k, len(reference))
    return np.concatenate([torch.topk(query[s:s + chunk] @ reference.T, k, dim=1).indices.numpy()
                           for s in range(0, len(query), chunk)])


def neighbour_average(train: SpectraDataset, neighbours: np.ndarray) -> np.ndarray:
    """The mean preprocessed spectrum ``(G, L)`` of each galaxy's neighbours (rows of ``train``);
    each training spectrum is read once."""
    needed = np.unique(neighbours)
    spectra = {int(i): train.spectrum(int(i))[0] for i in needed}
    return np.stack([np.mean([spectra[int(i)] for i in row], axis=0) for row in neighbours])


def colour_features(catalog) -> np.ndarray:
    """``(N, 5)`` photometric features of catalog rows: colours u-g, g-r, r-i, i-z and r."""
    mags = np.stack([np.asarray(catalog[c], dtype=np.float64) for c in PHOTO_Z_COLUMNS], 1)
    return np.concatenate([mags[:, :-1] - mags[:, 1:], mags[:, 2:3]], 1)


def catalog_neighbours(x_train: np.ndarray, x_query: np.ndarray, k: int,
                       usable: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``x_train`` ``(G, k)`` nearest to each query in features standardised on the
    training rows (scipy's k-d tree), searching only the ``usable`` training rows (default: those
    with finite features); k shrinks to the number of usable rows."""
    from scipy.spatial import cKDTree

    good = np.all(np.isfinite(x_train), 1) if usable is None else usable & np.all(np.isfinite(x_train), 1)
    mean, std = x_train[good].mean(0), x_train[good].std(0) + 1e-12
    k = min(k, int(good.sum()))
    _, idx = cKDTree((x_train[good] - mean) / std).query(np.nan_to_num((x_query - mean) / std), k=k)
    return np.flatnonzero(good)[np.reshape(idx, (len(x_query), k))]


def photo_z(train_catalog, train_z: np.ndarray, query_catalog, k: int) -> np.ndarray | None:
    """k-nearest-neighbour photometric redshifts ``(G,)`` from catalog colours (u-g, g-r, r-i,
    i-z) and r, each standardised on the training galaxies; None when the catalog lacks the
    magnitudes."""
    if any(c not in train_catalog.colnames for c in PHOTO_Z_COLUMNS):
        logger.warning("no photometric-redshift baseline: the catalog lacks %s", ", ".join(PHOTO_Z_COLUMNS))
        return None
    train_z = np.asarray(train_z)
    idx = catalog_neighbours(colour_features(train_catalog), colour_features(query_catalog), k, np.isfinite(train_z))
    return np.median(train_z[idx], axis=1)


def compute_baselines(train: SpectraDataset, dataset: SpectraDataset, contrastive, device: torch.device,
                      mean_train: np.ndarray | None, params: np.ndarray, k: int = NEIGHBOURS
                      ) -> tuple[dict, np.ndarray | None]:
    """The baselines for the galaxies of ``dataset``: ``({name: (flux (G, L), preprocessed (G, L))},
    photometric redshifts (G,) or None)``, with spectra put on each galaxy's flux scale by its own
    preprocessing ``params`` (as the generated samples are). Neighbours come from the galaxies of
    ``train`` (the training split, or a fixed subset of it: :data:`TRAIN_SEARCHED`)."""
    if len(train) == 0:
        logger.warning("no training galaxies in '%s': no retrieval or photo-z baseline", train.survey.root)
        return {}, None
    query = embed_images(contrastive, dataset, device, desc="embed evaluated images")
    reference = embed_images(contrastive, train, device, desc="embed training images")
    knn = neighbour_average(train, embedding_neighbours(query, reference, k))
    out = {"knn_embedding": (dataset.deprocess(knn, params), knn)}
    if mean_train is not None:
        pre = np.broadcast_to(mean_train, knn.shape)
        out["mean_train"] = (dataset.deprocess(pre, params), np.array(pre))
    cat = train.survey.catalog
    z = photo_z(cat[train.rows], np.asarray(cat["z"])[train.rows], dataset.survey.catalog[dataset.rows], k)
    return out, z
