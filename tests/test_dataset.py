"""Dataset format: round trip, validation errors, transforms, preprocessing and the split."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from astropy.table import Table

from utils.astro.spectra import neurips_loglam
from utils.data.dataset import (
    DataError,
    DatasetWriter,
    ImageTransform,
    SpectraDataset,
    assign_split,
    center_crop,
    image_tensor,
    open_survey,
    random_crop_flip,
    resize,
)


def _write(root, n=20, npix=50, images=("gri",), seed=0):
    rng = np.random.default_rng(seed)
    loglam = neurips_loglam()[:npix]
    w = DatasetWriter(root, n, loglam, images=images, source="test")
    arrays = {}
    if "gri" in images:
        arrays["gri"] = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
    if "ugriz" in images:
        arrays["ugriz"] = rng.normal(0, 1, (n, 5, 64, 64)).astype(np.float32)
    w.write(0, rng.uniform(1, 10, (n, npix)), np.ones((n, npix)), arrays)
    objid = np.arange(n, dtype=np.int64) + 100
    cat = Table({"objid": objid, "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-10, 10, n),
                 "z": rng.uniform(0.02, 0.3, n), **{f"mag_{b}": np.full(n, 17.0) for b in "ugriz"},
                 "split": assign_split(objid)})
    return w.finish(cat)


def test_round_trip_and_memory_map(tmp_path):
    root = _write(tmp_path / "d", images=("gri", "ugriz"))
    s = open_survey(root)
    assert len(s) == 20
    assert s.flux.shape == (20, 50)
    assert isinstance(s.flux, np.memmap)
    assert set(s.images) == {"gri", "ugriz"}
    assert s.images["gri"].dtype == np.uint8
    assert len(s.meta["image_stats"]["gri"]["mean"]) == 3
    assert len(s.meta["image_stats"]["ugriz"]["std"]) == 5
    assert not (tmp_path / "d.partial").exists()


def test_writer_never_overwrites(tmp_path):
    root = _write(tmp_path / "d")
    before = (root / "flux.npy").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        _write(tmp_path / "d", seed=1)
    assert (root / "flux.npy").read_bytes() == before


@pytest.mark.parametrize("damage, words", [
    (lambda r: np.save(r / "flux.npy", np.ones((18, 50), np.float32)), ["flux.npy", "18 rows", "20"]),
    (lambda r: np.save(r / "ivar.npy", np.ones((20, 49), np.float32)), ["ivar.npy", "(49,)", "(50,)"]),
    (lambda r: (r / "loglam.npy").unlink(), ["loglam.npy", "missing"]),
    (lambda r: np.save(r / "images_gri.npy", np.zeros((20, 32, 32, 3), np.uint8)), ["images_gri.npy", "(32, 32, 3)"]),
    (lambda r: np.save(r / "images_gri.npy", np.zeros((20, 64, 64, 3), np.float32)), ["images_gri.npy", "dtype"]),
    (lambda r: (r / "flux.npy").write_bytes((r / "flux.npy").read_bytes()[:1000]), ["flux.npy", "truncated"]),
    (lambda r: (r / "catalog.fits").write_bytes(b"garbage"), ["catalog.fits", "FITS"]),
    (lambda r: (r / "meta.json").write_text("{"), ["meta.json", "JSON"]),
    (lambda r: (r / "images_gri.npy").unlink(), ["no image array"]),
])
def test_damaged_files_are_named(tmp_path, damage, words):
    root = _write(tmp_path / "d")
    damage(root)
    with pytest.raises(DataError) as err:
        open_survey(root)
    for word in words:
        assert word in str(err.value)


def test_nan_flux_and_missing_column_are_named(tmp_path):
    root = _write(tmp_path / "d")
    flux = np.load(root / "flux.npy")
    flux[7, 3] = np.nan
    np.save(root / "flux.npy", flux)
    with pytest.raises(DataError, match=r"flux.npy.*non-finite.*row 7"):
        open_survey(root)
    root2 = _write(tmp_path / "e")
    cat = Table.read(root2 / "catalog.fits")
    cat.remove_column("z")
    cat.write(root2 / "catalog.fits", overwrite=True)
    with pytest.raises(DataError, match="catalog.fits.*column.*z"):
        open_survey(root2)
    with pytest.raises(DataError, match="does not exist"):
        open_survey(tmp_path / "nowhere")


def test_unknown_split_values_are_named_plainly(tmp_path):
    root = _write(tmp_path / "d")
    cat = Table.read(root / "catalog.fits")
    cat["split"] = cat["split"].astype("U8")
    cat["split"][[2, 5]] = ["tset", "holdout"]
    cat.write(root / "catalog.fits", overwrite=True)
    with pytest.raises(DataError) as err:
        open_survey(root)
    message = str(err.value)
    assert "catalog.fits" in message
    assert "'holdout', 'tset'" in message
    assert "train, val, test" in message
    assert "np.str_" not in message


def test_missing_image_kind_is_named(tmp_path):
    s = open_survey(_write(tmp_path / "d"))
    with pytest.raises(DataError, match="images_ugriz.npy"):
        SpectraDataset(s, "train", image="ugriz")


def test_split_is_stable_when_objects_are_added():
    ids = np.arange(10_000, dtype=np.int64) * 7 + 3
    split = assign_split(ids, 0.1, 0.1)
    fractions = {k: np.mean(split == k) for k in ("train", "val", "test")}
    assert abs(fractions["val"] - 0.1) < 0.01
    assert abs(fractions["test"] - 0.1) < 0.01
    more = np.concatenate([ids, np.arange(5000, dtype=np.int64) * 11 + 100_000])
    assert np.array_equal(assign_split(more, 0.1, 0.1)[:10_000], split)
    assert np.array_equal(assign_split(ids[::-1], 0.1, 0.1), split[::-1])


def test_transforms():
    img = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 64, 64)
    big = resize(img, 71)
    assert big.shape == (3, 71, 71)
    assert center_crop(big, 64).shape == (3, 64, 64)
    assert torch.equal(center_crop(big, 64), big[:, 3:67, 3:67])
    g = torch.Generator().manual_seed(0)
    crops = [random_crop_flip(big, 64, g) for _ in range(20)]
    assert all(c.shape == (3, 64, 64) for c in crops)
    assert len({tuple(c[0, 0, :2].tolist()) for c in crops}) > 3  # crops and flips vary
    t = ImageTransform([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], train=False)
    out = t(torch.ones(3, 64, 64))
    assert torch.allclose(out[:, 10, 10], torch.tensor([0.0, -0.5, -1.0]))
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[0, 1] = (255, 0, 51)
    ten = image_tensor(rgb, "gri")
    assert ten.shape == (3, 64, 64)
    assert ten[0, 0, 1] == 1.0
    assert ten[2, 0, 1] == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["scale", "log"])
def test_dataset_items_and_inversion(tiny_mock, kind):
    s = open_survey(tiny_mock)
    ds = SpectraDataset(s, None, image="ugriz", preprocessing=kind, downsample=4, train=True)
    item = ds[5]
    assert item["image"].shape == (5, 64, 64)
    assert item["spectrum"].shape == (1, 3598 // 4)
    flux, _ = ds.flux(5)
    back = ds.deprocess(item["spectrum"][0].numpy(), item["params"].numpy())
    assert np.allclose(back, flux, rtol=1e-4, atol=1e-3)
    gri = SpectraDataset(s, "train", image="gri", preprocessing=kind, train=False)
    assert gri[0]["image"].shape == (3, 64, 64)
    assert torch.equal(gri[0]["image"], gri[0]["image"])
    batch = next(gri.iter_batches(4))
    assert batch["spectrum"].shape == (4, 1, 3598)


def test_all_flux_stacks_every_item_in_order(tiny_mock):
    s = open_survey(tiny_mock)
    ds = SpectraDataset(s, "val", downsample=4)
    flux, ivar = ds.all_flux()
    assert flux.shape == ivar.shape == (len(ds), 3598 // 4)
    assert len(ds) > 1
    for i in (0, len(ds) - 1):
        assert np.array_equal(flux[i], ds.flux(i)[0])
        assert np.array_equal(ivar[i], ds.flux(i)[1])
    empty = ds.like(np.zeros(0, dtype=np.int64)).all_flux()
    assert empty[0].shape == empty[1].shape == (0, 3598 // 4)


def test_dataset_stats_standardise_train_images(tiny_mock):
    s = open_survey(tiny_mock)
    ds = SpectraDataset(s, "train", image="gri", train=False)
    imgs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    # centre crops of a resize leave the statistics close to standardised
    assert imgs.mean().abs() < 0.3
    assert 0.6 < imgs.std() < 1.4


def test_copy_of_dataset_opens(tiny_mock, tmp_path):
    shutil.copytree(tiny_mock, tmp_path / "copy")
    assert len(open_survey(tmp_path / "copy")) == 48
