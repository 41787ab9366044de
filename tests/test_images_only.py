"""Datasets of images only, for galaxies without spectra: prepared from a catalog and a folder of
cutouts (gri JPEGs, 5-band arrays, 5-band FITS), or from an SDSS photometric selection; every bad
input refused in one line with nothing written."""
from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from PIL import Image

from conftest import run_script
from utils.data.dataset import DataError, open_survey
from utils.data.prepare import prepare
from utils.errors import UserError

N = 10


def write_cutouts(tiny_mock, folder, rows=range(N), fits_every: int = 3):
    """The tiny mock's first galaxies as a user would have them: catalog.csv (SDSS column names),
    gri JPEGs and ugriz cutouts, .npy for most, FITS for every ``fits_every``-th (a cube, or five
    image HDUs); returns (catalog path, jpeg folder, ugriz folder, the ugriz arrays)."""
    survey = open_survey(tiny_mock)
    cat = survey.catalog[list(rows)]
    jpegs, cubes = folder / "jpeg", folder / "ugriz"
    jpegs.mkdir(parents=True)
    cubes.mkdir()
    table = Table({"objid": cat["objid"], "ra": cat["ra"], "dec": cat["dec"], "z": cat["z"],
                   **{f"cModelMag_{b}": cat[f"mag_{b}"] for b in "ugriz"}})
    table.write(folder / "catalog.csv", format="ascii.csv")
    arrays = {}
    for k, row in enumerate(rows):
        objid = int(survey.catalog["objid"][row])
        Image.fromarray(np.asarray(survey.images["gri"][row])).save(jpegs / f"{objid}.jpg", quality=95)
        cube = np.asarray(survey.images["ugriz"][row], dtype=np.float32)
        arrays[objid] = cube
        if k % fits_every == 1:
            fits.PrimaryHDU(cube, header=fits.Header({"BUNIT": "nanomaggy"})).writeto(cubes / f"{objid}.fits")
        elif k % fits_every == 2:
            fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(band, name=name) for band, name in zip(cube, "ugriz")]
                         ).writeto(cubes / f"{objid}.fits")
        else:
            np.save(cubes / f"{objid}.npy", cube)
    return folder / "catalog.csv", jpegs, cubes, arrays


def test_prepare_builds_a_dataset_of_images_only_from_the_cutouts(tiny_mock, tmp_path):
    catalog, jpegs, cubes, arrays = write_cutouts(tiny_mock, tmp_path / "in")
    out = prepare(catalog, None, jpegs, tmp_path / "mine", ugriz_dir=cubes)
    with pytest.raises(DataError, match="holds images only"):
        open_survey(out)  # where spectra are needed
    survey = open_survey(out, need_spectra=False)
    assert survey.meta["spectra"] is False
    assert not survey.has_spectra
    assert survey.flux is None
    assert not (out / "flux.npy").exists()
    assert len(survey) == N
    source = open_survey(tiny_mock).catalog[:N]
    assert np.array_equal(survey.catalog["objid"], source["objid"])
    assert np.allclose(survey.catalog["mag_r"], source["mag_r"])  # from cModelMag_r
    assert np.allclose(survey.catalog["z"], source["z"])
    assert np.isnan(survey.catalog["fibermag_r"]).all()  # the catalog has none
    for i, objid in enumerate(survey.catalog["objid"]):  # .npy, FITS cubes and five-HDU FITS alike
        assert np.array_equal(survey.images["ugriz"][i], arrays[int(objid)])
    stored = np.asarray(open_survey(tiny_mock).images["gri"][:N], dtype=float)
    assert np.abs(np.asarray(survey.images["gri"], dtype=float) - stored).mean() < 3  # a JPEG round trip
    assert set(survey.meta["image_stats"]) == {"gri", "ugriz"}


def _bad_catalog(folder, catalog, jpegs, cubes):
    (folder / "catalog.fits").write_bytes(b"SIMPLE  =  no, this is not a FITS table at all" * 40)
    return folder / "catalog.fits", jpegs, cubes


def _edit_catalog(change):
    def edit(folder, catalog, jpegs, cubes):
        table = Table.read(catalog, format="ascii.csv")
        change(table)
        table.write(folder / "edited.csv", format="ascii.csv")
        return folder / "edited.csv", jpegs, cubes
    return edit


def _edit_cutout(change):
    def edit(folder, catalog, jpegs, cubes):
        objid = int(Table.read(catalog, format="ascii.csv")["objid"][3])
        change(jpegs, cubes, objid)
        return catalog, jpegs, cubes
    return edit


def _duplicate(table):
    table["objid"][4] = table["objid"][2]


def _nan_dec(table):
    table["dec"][5] = np.nan


def _no_cube(jpegs, cubes, objid):
    for path in cubes.glob(f"{objid}.*"):
        path.unlink()


def _four_bands(jpegs, cubes, objid):
    _no_cube(jpegs, cubes, objid)
    np.save(cubes / f"{objid}.npy", np.ones((4, 64, 64), np.float32))


def _text_array(jpegs, cubes, objid):
    _no_cube(jpegs, cubes, objid)
    np.save(cubes / f"{objid}.npy", np.full((5, 64, 64), "x"))


def _counts(jpegs, cubes, objid):
    _no_cube(jpegs, cubes, objid)
    fits.PrimaryHDU(np.ones((5, 64, 64), np.float32), header=fits.Header({"BUNIT": "counts"})).writeto(
        cubes / f"{objid}.fits")


def _grey_jpeg(jpegs, cubes, objid):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(jpegs / f"{objid}.jpg")


def _small_jpeg(jpegs, cubes, objid):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpegs / f"{objid}.jpg")


@pytest.mark.parametrize("fault, message", [
    (_bad_catalog, "cannot be read as a table"),
    (_edit_catalog(lambda t: t.remove_column("ra")), r"lacks the column\(s\) ra"),
    (_edit_catalog(lambda t: t.rename_column("objid", "name")), "no id column"),
    (_edit_catalog(_duplicate), "appears 2 times"),
    (_edit_catalog(_nan_dec), "dec of row 5"),
    (_edit_cutout(_no_cube), "no ugriz cutout"),
    (_edit_cutout(_four_bands), "has 4 bands"),
    (_edit_cutout(_text_array), "expected numbers"),
    (_edit_cutout(_counts), "BUNIT 'counts'"),
    (_edit_cutout(_grey_jpeg), "colour mode L"),
    (_edit_cutout(_small_jpeg), r"shape \(32, 32, 3\)"),
])
def test_bad_catalogs_and_cutouts_are_refused_and_nothing_is_written(tiny_mock, tmp_path, fault, message):
    catalog, jpegs, cubes = fault(tmp_path, *write_cutouts(tiny_mock, tmp_path / "in")[:3])
    with pytest.raises(UserError, match=message):
        prepare(catalog, None, jpegs, tmp_path / "out", ugriz_dir=cubes)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_the_command_reports_a_bad_cutout_in_one_line(tiny_mock, tmp_path):
    catalog, jpegs, cubes = _edit_cutout(_four_bands)(tmp_path, *write_cutouts(tiny_mock, tmp_path / "in")[:3])
    result = run_script("-m", ["utils.prepare", "--catalog", str(catalog), "--ugriz", str(cubes), "--out",
                               str(tmp_path / "out")])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "row 3" in lines[0]
    assert "has 4 bands" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_existing_dataset_is_never_overwritten(tiny_mock, tmp_path):
    catalog, jpegs, cubes, _ = write_cutouts(tiny_mock, tmp_path / "in")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        prepare(catalog, None, jpegs, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# SDSS photometric selections
# --------------------------------------------------------------------------------------------
class FakePhotoSQL:
    """Answers the photometric query's pages from a synthetic PhotoObj table (TOP, objID >)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(2)
        ids = np.sort(rng.choice(10 ** 12, size=n, replace=False)) + 1237 * 10 ** 15
        self.table = Table({"objID": ids, "ra": rng.uniform(150, 151, n), "dec": rng.uniform(2, 3, n),
                            **{f"cModelMag_{b}": rng.uniform(16, 18, n) for b in "ugriz"},
                            **{f"fiberMag_{b}": rng.uniform(17, 19, n) for b in "ugriz"},
                            "specObjID": np.ma.masked_array(ids + 7, mask=np.arange(n) % 2 == 0)})
        self.sql: list[str] = []

    def __call__(self, sql: str, data_release: int = 17) -> Table:
        self.sql.append(sql)
        top = int(sql.split("TOP ")[1].split()[0])
        after = int(sql.split("p.objID > ")[1].split()[0])
        rows = self.table[self.table["objID"] > after][:top]
        return rows if len(rows) else None


def test_photometric_query_pages_galaxies_by_objid(tmp_path):
    from utils.data.files import ID_KEYWORD
    from utils.data.sdss import build_photometric_query, query_catalog

    sql = build_photometric_query(50, 99, mag_max=17.0, spectra="without", area=(150.0, 151.0, 2.0, 3.0))
    for part in ("TOP 50", "FROM PhotoObj AS p", "p.type = 3", "p.mode = 1", "p.objID > 99", "p.cModelMag_r < 17.0",
                 "p.fiberMag_r", "LEFT OUTER JOIN SpecObj", "s.specObjID IS NULL", "p.ra BETWEEN 150.0 AND 151.0",
                 "p.dec BETWEEN 2.0 AND 3.0", "ORDER BY p.objID"):
        assert part in sql
    assert "JOIN SpecObj AS s" in build_photometric_query(5, 0, spectra="with")
    assert "LEFT OUTER" not in build_photometric_query(5, 0, spectra="with")
    fake = FakePhotoSQL(70)
    table = query_catalog(65, tmp_path / "phot.fits", page_size=20, query_fn=fake, photometric=True)
    assert len(table) == 65
    assert len(fake.sql) == 4
    saved = Table.read(tmp_path / "phot.fits")
    assert np.array_equal(saved["objID"], fake.table["objID"][:65])
    assert saved.meta[ID_KEYWORD] == "objID"


def test_a_list_of_coordinates_finds_the_nearest_galaxies(tmp_path):
    from utils.data.sdss import match_coordinates

    fake = FakePhotoSQL(6).table
    fake["type"] = [3, 3, 6, 3, 3, 3]  # a star among them

    def crossid(coordinates, photoobj_fields, radius, data_release):
        assert "fiberMag_r" in photoobj_fields
        assert radius.to_value("arcsec") == pytest.approx(1.5)
        out = fake[: len(coordinates)]
        return out[[0, 0, 1, 2, 3, 4][: len(out)]]  # the first galaxy matched twice

    coords = Table({"ra": np.asarray(fake["ra"]), "dec": np.asarray(fake["dec"])})
    table = match_coordinates(coords, tmp_path / "matched.fits", radius_arcsec=1.5, crossid_fn=crossid)
    assert list(table["objID"]) == list(fake["objID"][[0, 1, 3, 4]])  # one row each, no star
    with pytest.raises(UserError, match="lacks dec"):
        match_coordinates(Table({"ra": [1.0]}), tmp_path / "x.fits", crossid_fn=crossid)


def test_photometric_selection_ends_in_a_dataset_of_images_only(tmp_path, monkeypatch):
    """``python -m utils.sdss all --photometric``: the catalog, the JPEG cutouts from a loopback
    SkyServer (one of them missing there), then a dataset of images only of the galaxies whose
    cutouts arrived, named by objID."""
    from test_sdss import FaultyServer

    from utils.data import sdss

    fake = FakePhotoSQL(6)
    monkeypatch.setattr("astroquery.sdss.SDSS.query_sql", fake)
    rng = np.random.default_rng(0)
    files = {}
    for k, row in enumerate(fake.table):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        if k != 2:
            files[sdss.jpeg_url(float(row["ra"]), float(row["dec"]), 17, base="")] = buffer.getvalue()
    with FaultyServer(files) as server:
        sdss.main(["all", "--photometric", "--n", "6", "--root", str(tmp_path / "sdss"), "--skyserver-url", server.url,
                   "--retries", "0", "--rate", "0"])
    survey = open_survey(tmp_path / "sdss" / "dataset", need_spectra=False)
    assert len(survey) == 5
    assert list(survey.catalog["objid"]) == [int(v) for k, v in enumerate(fake.table["objID"]) if k != 2]
    assert np.allclose(survey.catalog["fibermag_r"], [v for k, v in enumerate(fake.table["fiberMag_r"]) if k != 2])
    dropped = Table.read(tmp_path / "sdss" / "catalog_with_cutouts.fits.dropped.csv", format="ascii.csv")
    assert list(dropped["key"]) == [int(fake.table["objID"][2])]
    with pytest.raises(UserError, match="--photometric"):
        sdss.fetch_catalog(argparse.Namespace(photometric=False, coords="x.csv", area=None, n=3), tmp_path / "c.fits")


def test_spectra_of_a_photometric_catalog_are_refused_in_one_line(tmp_path):
    """A photometric selection names no spectrum file (plate, mjd, fiberID, run2d): `utils.sdss
    spectra` says so instead of failing on the first row, and fetches nothing."""
    from astropy.table import Table

    from utils.data.sdss import main
    from utils.errors import UserError

    Table({"objID": [1, 2], "ra": [1.0, 2.0], "dec": [0.0, 0.0], "specObjID": [0, 5], "z": [0.0, 0.1]}).write(
        tmp_path / "phot.fits")
    with pytest.raises(UserError, match="no plate, mjd, fiberID, run2d: spectra are fetched for a spectroscopic"):
        main(["spectra", "--catalog", str(tmp_path / "phot.fits"), "--out", str(tmp_path / "spectra")])
    assert not (tmp_path / "spectra").exists()
