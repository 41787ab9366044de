"""generate.py on a catalogue of images only: a property catalogue streamed in shards, the same
samples per galaxy whatever the shards, batches, order, resumption or processes, and a kill or a
damaged shard that costs only the shards it touched."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from test_images_only import write_cutouts

from conftest import ROOT, only_run, run_script
from utils.data.dataset import open_survey
from utils.data.prepare import prepare

GALAXIES = 30


@pytest.fixture(scope="module")
def catalogue(tiny_mock, tmp_path_factory):
    """30 galaxies of the tiny mock as a dataset of images only (gri JPEGs and ugriz cutouts, a
    catalog with model magnitudes), made by utils.data.prepare."""
    folder = tmp_path_factory.mktemp("catalogue")
    catalog, jpegs, cubes, _ = write_cutouts(tiny_mock, folder / "in", rows=range(GALAXIES))
    return prepare(catalog, None, jpegs, folder / "dataset", ugriz_dir=cubes)


def predict_args(tiny_mock, runs, catalogue, out, *extra):
    contrastive, generative = runs
    return [f"data.root={tiny_mock}", "data.source=folder", "data.downsample=16", f"sampling.catalog={catalogue}",
            f"sampling.contrastive_run={contrastive}", f"sampling.generative_run={generative}",
            f"sampling.out_dir={out}", "sampling.n_samples=4", "sampling.sampler=ddpm", "sampling.top_k=2",
            "sampling.figures=1", "sampling.batch_galaxies=3", "sampling.shard_size=10", *extra]


def predict(tiny_mock, runs, catalogue, out, *extra):
    """One catalogue prediction in this process (what generate.py runs); its output folder."""
    from utils.config import load_config
    from utils.generate_run import run

    return run(load_config("generative", predict_args(tiny_mock, runs, catalogue, out, *extra)))


def read(folder):
    """The merged catalogue and every shard's spectra, both by objid."""
    table = Table.read(folder / "catalogue.fits", hdu="CATALOGUE", mask_invalid=False)
    spectra = {}
    for path in sorted((folder / "shards").glob("shard-*.fits")):
        with fits.open(path) as hdus:
            for row in hdus["SPECTRA"].data:
                spectra[int(row["objid"])] = {k: np.array(row[k]) for k in ("mean", "best", "best_scores")}
    return table, spectra


def same_tables(a: Table, b: Table) -> bool:
    """Every column equal, NaN where the other has NaN."""
    return a.colnames == b.colnames and all(
        np.array_equal(np.asarray(a[c]), np.asarray(b[c]), equal_nan=np.asarray(a[c]).dtype.kind == "f")
        for c in a.colnames)


def test_a_catalogue_of_images_only_becomes_a_property_catalogue(tiny_mock, trained_runs, catalogue, tmp_path):
    folder = predict(tiny_mock, trained_runs, catalogue, tmp_path, "sampling.per_galaxy_fits=true")
    table, spectra = read(folder)
    survey = open_survey(catalogue, need_spectra=False)
    assert len(list((folder / "galaxies").glob("*.fits"))) == GALAXIES  # one spec-lite-like file a galaxy
    assert list(table["objid"]) == list(survey.catalog["objid"])  # catalogue order, every galaxy once
    for name in ("ra", "dec", "z_catalog", "z_gen", "z_gen_lo", "z_gen_hi", "dn4000_gen", "ew_halpha_gen",
                 "flux_halpha_gen_hi", "bpt_gen", "bpt_gen_frac", "bpt_frac_agn", "score_best", "fluxcal", "shard"):
        assert name in table.colnames, name
    assert np.isfinite(table["z_gen"]).all()
    assert np.all(table["z_gen_lo"] <= table["z_gen"])
    assert np.all(table["z_gen"] <= table["z_gen_hi"])
    shares = sum(np.asarray(table[c]) for c in table.colnames if c.startswith("bpt_frac_"))
    assert np.allclose(shares, 1.0)
    assert set(np.asarray(table["fluxcal"]).tolist()) == {2}  # no fibre magnitudes: the cutouts' fibre circle
    assert len(spectra) == GALAXIES
    first = spectra[int(table["objid"][0])]
    assert first["best"].shape == (2, 224)
    assert first["mean"].shape == (224,)
    assert len(list((folder / "shards").glob("shard-*.fits"))) == 3  # 30 galaxies, 10 a shard
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_galaxies"] == GALAXIES
    assert 1e3 < metrics["bytes_per_galaxy"] < 1e5
    assert (folder / "figures" / "catalogue.png").is_file()
    assert not (folder / "RUNNING.json").exists()
    with fits.open(folder / "catalogue.fits") as hdus:  # TOPCAT reads the header's codes
        assert "star-forming" in hdus["CATALOGUE"].header["BPTCODES"]


@pytest.mark.slow
def test_a_galaxys_samples_depend_only_on_the_seed_and_its_id(tiny_mock, trained_runs, catalogue, tmp_path):
    """Other shard and batch sizes, and the catalogue in reverse order, give each galaxy the same
    samples and properties; another seed gives other samples."""
    reference = read(predict(tiny_mock, trained_runs, catalogue, tmp_path / "a"))
    other = read(predict(tiny_mock, trained_runs, catalogue, tmp_path / "b", "sampling.shard_size=7",
                         "sampling.batch_galaxies=5"))
    reversed_catalogue = tmp_path / "reversed"
    shutil.copytree(catalogue, reversed_catalogue)
    cat = Table.read(reversed_catalogue / "catalog.fits")
    order = np.arange(len(cat))[::-1]
    cat[order].write(reversed_catalogue / "catalog.fits", overwrite=True)
    for name in ("images_gri.npy", "images_ugriz.npy"):
        np.save(reversed_catalogue / name, np.load(reversed_catalogue / name)[order])
    backwards = read(predict(tiny_mock, trained_runs, reversed_catalogue, tmp_path / "c"))
    reseeded = read(predict(tiny_mock, trained_runs, catalogue, tmp_path / "d", "run.seed=1"))
    by_id = lambda t: {int(o): row for o, row in zip(t["objid"], t)}  # noqa: E731
    for table, spectra in (other, backwards):
        rows = by_id(table)
        for objid, ref in by_id(reference[0]).items():
            best = reference[1][objid]["best"]  # the same up to float32 rounding in other batch shapes
            assert np.allclose(spectra[objid]["best"], best, rtol=1e-3, atol=1e-4 * np.abs(best).max())
            assert np.allclose(spectra[objid]["best_scores"], reference[1][objid]["best_scores"], atol=1e-5)
            assert rows[objid]["bpt_gen"] == ref["bpt_gen"]
            assert np.isclose(rows[objid]["dn4000_gen"], ref["dn4000_gen"], rtol=1e-3, equal_nan=True)
    some = int(reference[0]["objid"][0])
    assert not np.allclose(reseeded[1][some]["best"], reference[1][some]["best"], atol=1e-3)


def test_a_broken_run_continues_where_it_stopped(tiny_mock, trained_runs, catalogue, tmp_path):
    """A run without its catalogue (killed), one shard gone and one damaged: the same command
    continues that folder, does those two shards again and ends with the same output; the others
    are not touched. run.resume names a folder; one made with other settings is refused."""
    from utils.errors import UserError

    folder = predict(tiny_mock, trained_runs, catalogue, tmp_path)
    reference = read(folder)
    shards = sorted((folder / "shards").glob("shard-*.fits"))
    kept = {p.name: p.stat().st_mtime_ns for p in shards}
    (folder / "catalogue.fits").unlink()
    shards[1].unlink()
    with open(shards[2], "r+b") as handle:  # a crash's damage inside the data
        handle.seek(-3000, os.SEEK_END)
        handle.write(b"\0" * 1000)
    (folder / "RUNNING.json").write_text(json.dumps({"pid": 999999, "host": os.uname().nodename, "since": "x"}))
    again = predict(tiny_mock, trained_runs, catalogue, tmp_path)
    assert again == folder
    after = read(folder)
    assert same_tables(after[0], reference[0])
    assert all(np.array_equal(after[1][k]["best"], reference[1][k]["best"]) for k in reference[1])
    touched = {p.name for p in sorted((folder / "shards").glob("shard-*.fits"))
               if kept.get(p.name) != p.stat().st_mtime_ns}
    assert touched == {shards[1].name, shards[2].name}
    with pytest.raises(UserError, match="another plan: sampling.n_samples"):
        predict(tiny_mock, trained_runs, catalogue, tmp_path / "x", f"run.resume={folder}", "sampling.n_samples=3")
    finished = predict(tiny_mock, trained_runs, catalogue, tmp_path)  # a finished output is not continued
    assert finished != folder


def test_refusals_of_a_catalogue_prediction(tiny_mock, trained_runs, catalogue, tmp_path):
    """Images of another kind than the models read, models of another grid: one line each."""
    import dataclasses

    from utils.config import load_config
    from utils.data.survey import load_survey
    from utils.errors import UserError
    from utils.trained import catalog_set, check_grid, find_models

    config = load_config("generative", predict_args(tiny_mock, trained_runs, catalogue, tmp_path, "data.image=ugriz"))
    gri_only = tmp_path / "gri_only"
    shutil.copytree(catalogue, gri_only)
    (gri_only / "images_ugriz.npy").unlink()
    with pytest.raises(UserError, match="the models read ugriz images"):
        catalog_set(config, load_survey(config["data"]), open_survey(gri_only, need_spectra=False))
    config = load_config("generative", predict_args(tiny_mock, trained_runs, catalogue, tmp_path))
    pair = find_models(config)
    assert pair.gen_grid is not None
    check_grid(pair, pair.gen_grid, "here")  # its own grid passes
    wrong = dataclasses.replace(pair, con_grid=pair.con_grid[:-1])
    with pytest.raises(UserError, match="contrastive network .* another wavelength grid .*223 pixels"):
        check_grid(wrong, pair.gen_grid, "data.root")
    missing = run_script("generate.py", predict_args(tiny_mock, trained_runs, tmp_path / "nothing", tmp_path))
    assert missing.returncode == 1
    assert "nothing' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_flux_scales_come_from_the_best_photometry_a_galaxy_has(catalogue):
    """Catalogue fibre magnitudes first, then the 5-band cutout's fibre circle, then model
    magnitudes, else a normalised spectrum; a source's magnitudes are what the scaled spectrum
    shows."""
    import astropy.units as u
    import speclite.filters

    from utils.astro.spectra import neurips_loglam
    from utils.catalog_run import flux_scales
    from utils.data.dataset import SpectraDataset

    survey = open_survey(catalogue, need_spectra=False)
    with_cutouts = SpectraDataset(survey, None, "ugriz", "log", 16, loglam=neurips_loglam())
    ranked = np.zeros((len(survey), 2, with_cutouts.n_pixels), np.float32)
    ranked += np.log(1 + np.linspace(0, 1, with_cutouts.n_pixels))
    assert set(flux_scales(with_cutouts, ranked)[1]) == {2}  # the cutouts' fibre circle before model magnitudes
    bands = speclite.filters.load_filters("sdss2010-r", "sdss2010-i")

    def magnitudes(flux):
        m = bands.get_ab_magnitudes(flux * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, with_cutouts.wave * u.AA)
        return np.asarray(m["sdss2010-r"]), np.asarray(m["sdss2010-i"])

    r0, i0 = magnitudes(np.exp(ranked[:, 0]))  # the shape itself, norm 1
    cat = survey.catalog
    cat["fibermag_r"], cat["fibermag_i"] = np.nan, np.nan
    cat["fibermag_r"][:5], cat["fibermag_i"][:5] = r0[:5] - 1.0, i0[:5] - 1.0
    cat["mag_r"], cat["mag_i"] = r0 - 2.0, i0 - 2.0
    cat["mag_r"][25:], cat["mag_i"][25:] = np.nan, np.nan
    survey.images.pop("ugriz")
    gri = SpectraDataset(survey, None, "gri", "log", 16, loglam=neurips_loglam())
    params, codes = flux_scales(gri, ranked)
    assert list(codes[:5]) == [1] * 5
    assert set(codes[5:25]) == {3}
    assert set(codes[25:]) == {0}
    assert np.allclose(params[25:], [1.0, 0.0])  # normalised: exp(x)
    r, _ = magnitudes(gri.deprocess(ranked[:, 0], params))
    assert np.allclose(r[:5], r0[:5] - 1.0, atol=1e-3)
    assert np.allclose(r[5:25], r0[5:25] - 2.0, atol=1e-3)
    assert np.allclose(r[25:], r0[25:], atol=1e-3)


@pytest.mark.slow
def test_a_kill_costs_only_its_shard_and_two_processes_give_one_process_catalogue(tiny_mock, trained_runs,
                                                                                  catalogue, tmp_path):
    """The real thing, against one uninterrupted single-process run (one thread per process
    everywhere, so bit for bit): generate.py killed with SIGKILL once its first shard is written,
    then the same command again; and torchrun with 2 processes (gloo), each taking its own shards."""
    uninterrupted = run_script("generate.py", predict_args(tiny_mock, trained_runs, catalogue, tmp_path / "reference"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    reference = read(only_run(tmp_path / "reference"))

    def same_as_reference(folder) -> bool:
        after = read(folder)
        return same_tables(after[0], reference[0]) and all(
            np.array_equal(after[1][k]["best"], reference[1][k]["best"]) for k in reference[1])

    args = predict_args(tiny_mock, trained_runs, catalogue, tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "killed").glob("*/shards/shard-*.fits")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    folder = only_run(tmp_path / "killed")
    assert not (folder / "catalogue.fits").exists()
    again = run_script("generate.py", args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing the unfinished output" in again.stderr
    assert same_as_reference(folder)

    args = predict_args(tiny_mock, trained_runs, catalogue, tmp_path / "two", "run.backend=gloo")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29541", str(ROOT / "generate.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_as_reference(only_run(tmp_path / "two"))


def test_per_galaxy_generators_make_a_galaxys_samples_independent_of_its_batch():
    """DDPM draws new noise at every step: with one generator per galaxy, a galaxy sampled beside
    others equals the galaxy sampled alone."""
    from models.diffusion import GaussianDiffusion, cosine_betas
    from models.unet import ConditionalUNet1D
    from utils.generation import galaxy_generators, galaxy_seeds, sample_for_images

    torch.manual_seed(0)
    model = ConditionalUNet1D(40, 3, width=8, mults=(1, 2), attn_levels=(1,), image_width=8).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    diffusion = GaussianDiffusion(cosine_betas(12), prediction="v")
    images = torch.randn(3, 3, 64, 64)
    ids = np.array([11, 22, 33])
    together = sample_for_images(model, diffusion, images, 4, "ddpm", None, generator=galaxy_generators(0, ids))
    alone = sample_for_images(model, diffusion, images[1:2], 4, "ddpm", None, generator=galaxy_generators(0, ids[1:2]))
    assert torch.allclose(together[1], alone[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    assert len(set(galaxy_seeds(0, np.arange(1000)).tolist())) == 1000
    assert not np.array_equal(galaxy_seeds(0, ids), galaxy_seeds(1, ids))
