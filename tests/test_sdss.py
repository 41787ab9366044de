"""SDSS download and preparation, offline: a loopback HTTP server with injected faults, a mocked
SQL service, and synthetic spec files."""
from __future__ import annotations

import gzip
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from astropy.io import fits
from astropy.table import Table
from PIL import Image

from utils.astro.photometry import fibre_diameters
from utils.astro.spectra import neurips_loglam
from utils.data.dataset import open_survey
from utils.data.prepare import prepare, to_grid
from utils.data.sdss import (
    Downloader,
    NetworkUnreachable,
    Task,
    build_query,
    jpeg_url,
    query_catalog,
    spec_url,
    valid_jpeg,
    valid_spectrum,
)


# --------------------------------------------------------------------------------------------
# synthetic files
# --------------------------------------------------------------------------------------------
def spec_bytes(loglam: np.ndarray, flux: np.ndarray, ivar: np.ndarray, boss: bool = False) -> bytes:
    coadd = fits.BinTableHDU(Table({"flux": flux.astype(np.float32), "loglam": loglam.astype(np.float32),
                                    "ivar": ivar.astype(np.float32), "and_mask": np.zeros(len(flux), np.int32)}),
                             name="COADD")
    row = fits.BinTableHDU(Table({"PLATE": [1]}), name="SPALL" if boss else "SPECOBJ")
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), coadd, row]).writeto(buffer)
    return buffer.getvalue()


def good_spectrum(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    loglam = np.round(np.arange(3.5800, 3.9600, 1e-4), 4)
    flux = 10 + np.sin(loglam * 200) + rng.normal(0, 0.1, len(loglam))
    return loglam, flux, np.full(len(loglam), 100.0)


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# loopback server with faults
# --------------------------------------------------------------------------------------------
class FaultyServer:
    """Serves ``files`` (path -> bytes). ``faults[path]`` is a list of faults consumed one per
    request: 503, 429, 'truncate', 'stall', 'redirect-loop', 'gzip' (a correct gzip-encoded
    response), 'bad-gzip' (declared gzip, undecodable); 404 for unknown paths."""

    def __init__(self, files: dict[str, bytes], faults: dict[str, list] | None = None,
                 die_after: int | None = None) -> None:
        self.files = files
        self.die_after = die_after  # after this many requests the server hangs (answers nothing)
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.requests: list[str] = []
        self.served: list[str] = []  # paths whose whole body was written
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                with outer.lock:
                    outer.requests.append(self.path)
                    fault = outer.faults.get(self.path, []).pop(0) if outer.faults.get(self.path) else None
                    dead = outer.die_after is not None and len(outer.requests) > outer.die_after
                if dead:
                    time.sleep(1.0)
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if fault in (503, 429):
                    self.send_response(fault)
                    if fault == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if fault == "stall":
                    time.sleep(1.5)
                if fault == "redirect-loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.end_headers()
                    return
                if fault in ("gzip", "bad-gzip"):
                    body = gzip.compress(body) if fault == "gzip" else b"\x1f\x8b not gzip at all" * 10
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[: len(body) // 2] if fault == "truncate" else body)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if fault != "truncate":
                    with outer.lock:
                        outer.served.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def fast_downloader(**kw) -> Downloader:
    return Downloader(**{"workers": 4, "rate": 0, "timeout": 0.5, "retries": 4, "backoff": 0.01, **kw})


def test_downloader_survives_faults_and_lists_failures(tmp_path):
    files = {f"/spec/{i}.fits": spec_bytes(*good_spectrum(i)) for i in range(6)}
    files.update({f"/img/{i}.jpg": jpeg_bytes(seed=i) for i in range(4)})
    files["/img/small.jpg"] = jpeg_bytes(size=32)
    faults = {"/spec/0.fits": [503, 503], "/spec/1.fits": [429], "/spec/2.fits": ["truncate"],
              "/spec/3.fits": ["stall"], "/img/0.jpg": [503, "truncate"]}
    with FaultyServer(files, faults) as server:
        tasks = [Task(str(i), f"{server.url}/spec/{i}.fits", tmp_path / "spec" / f"{i}.fits", valid_spectrum)
                 for i in range(6)]
        tasks += [Task(f"img{i}", f"{server.url}/img/{i}.jpg", tmp_path / "img" / f"{i}.jpg", valid_jpeg)
                  for i in range(4)]
        tasks += [Task("gone", f"{server.url}/spec/404.fits", tmp_path / "spec" / "404.fits", valid_spectrum),
                  Task("small", f"{server.url}/img/small.jpg", tmp_path / "img" / "small.jpg", valid_jpeg)]
        report = fast_downloader().run(tasks, tmp_path / "failures.csv")
    assert report.fetched == 10
    assert set(report.failures) == {"gone", "small"}
    for task in tasks[:10]:
        assert task.validate(task.dest) is None
    assert not list(tmp_path.rglob("*.part"))
    assert not (tmp_path / "spec" / "404.fits").exists()
    failures = (tmp_path / "failures.csv").read_text()
    assert "HTTP 404" in failures
    assert "(32, 32, 3)" in failures


def test_interrupted_download_resumes_without_refetching(tmp_path):
    files = {f"/spec/{i}.fits": spec_bytes(*good_spectrum(i)) for i in range(8)}
    outage = {f"/spec/{i}.fits": [503] * 20 for i in range(4, 8)}  # the second half is down
    with FaultyServer(files, outage) as server:
        tasks = [Task(str(i), f"{server.url}/spec/{i}.fits", tmp_path / f"{i}.fits", valid_spectrum) for i in range(8)]
        first = fast_downloader(retries=1).run(tasks, tmp_path / "failures.csv")
        assert first.fetched == 4
        assert len(first.failures) == 4
        (tmp_path / "1.fits").write_bytes(b"broken")  # a damaged file is fetched again
        server.faults.clear()
        server.requests.clear()
        second = fast_downloader().run(tasks, tmp_path / "failures.csv")
    assert second.fetched == 5
    assert second.skipped == 3
    assert not second.failures
    assert sorted(server.requests) == sorted(["/spec/1.fits"] + [f"/spec/{i}.fits" for i in range(4, 8)])


def test_unreachable_network_gives_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tasks = [Task(str(i), f"http://127.0.0.1:{port}/{i}", tmp_path / f"{i}.fits", valid_spectrum) for i in range(8)]
    with pytest.raises(NetworkUnreachable, match=f"cannot connect to 127.0.0.1:{port}"):
        fast_downloader(retries=0).run(tasks)


def test_rate_limit_spaces_requests(tmp_path):
    files = {f"/{i}.jpg": jpeg_bytes(seed=i) for i in range(6)}
    with FaultyServer(files) as server:
        tasks = [Task(str(i), f"{server.url}/{i}.jpg", tmp_path / f"{i}.jpg", valid_jpeg) for i in range(6)]
        start = time.monotonic()
        fast_downloader(rate=20).run(tasks)
    assert time.monotonic() - start >= 5 / 20 - 0.02


# --------------------------------------------------------------------------------------------
# catalog query
# --------------------------------------------------------------------------------------------
class FakeSQL:
    """Answers the paged query from a synthetic table by reading TOP and specObjID > from the SQL."""

    def __init__(self, n: int, fail_on_call: int | None = None) -> None:
        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(10 ** 12, size=n, replace=False)) + 10 ** 15
        self.table = Table({"specObjID": ids, "z": rng.uniform(0.01, 0.3, n),
                            # MPA-JHU columns come NULL (masked) for spectra the tables do not cover
                            "h_alpha_eqw": np.ma.masked_array(-rng.uniform(0, 50, n), mask=np.arange(n) % 7 == 0),
                            "bptclass": np.ma.masked_array(rng.integers(1, 6, n), mask=np.arange(n) % 7 == 0)})
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, sql: str, data_release: int = 17) -> Table:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise requests.ConnectionError("simulated outage")
        top = int(sql.split("TOP ")[1].split()[0])
        after = int(sql.split("s.specObjID > ")[1].split()[0])
        rows = self.table[self.table["specObjID"] > after][:top]
        return rows if len(rows) else None


def test_query_is_paged_by_specobjid(tmp_path):
    sql = build_query(100, 1234, z_min=0.05, z_max=0.15, mag_max=17.77)
    for part in ("TOP 100", "s.specObjID > 1234", "ORDER BY s.specObjID", "s.class = 'GALAXY'", "s.zWarning = 0",
                 "s.z > 0.05", "s.z < 0.15", "p.cModelMag_r < 17.77", "p.petroRad_r", "s.run2d", "p.objID",
                 "s.velDisp", "LEFT OUTER JOIN galSpecLine AS m0 ON m0.specObjID = s.specObjID", "m0.h_alpha_eqw",
                 "m0.nii_6584_flux_err", "LEFT OUTER JOIN galSpecIndx AS m1", "m1.d4000_n",
                 "LEFT OUTER JOIN galSpecExtra AS m2", "m2.bptclass"):
        assert part in sql
    assert sql.index("LEFT OUTER JOIN") < sql.index("WHERE")
    fake = FakeSQL(250)
    table = query_catalog(230, tmp_path / "cat.fits", page_size=40, query_fn=fake)
    assert len(table) == 230
    assert fake.calls == 6
    saved = Table.read(tmp_path / "cat.fits")
    assert np.array_equal(saved["specObjID"], fake.table["specObjID"][:230])
    # the survey's own measurements survive paging and saving, NULLs included
    assert np.array_equal(np.ma.getmaskarray(saved["h_alpha_eqw"]), np.arange(230) % 7 == 0)
    assert np.allclose(np.ma.filled(saved["h_alpha_eqw"], 0), np.ma.filled(fake.table["h_alpha_eqw"][:230], 0))


def test_interrupted_query_resumes(tmp_path):
    fake = FakeSQL(200, fail_on_call=3)
    with pytest.raises(NetworkUnreachable, match="resume after 80 rows"):
        query_catalog(200, tmp_path / "cat.fits", page_size=40, query_fn=fake)
    fake.fail_on_call = None
    table = query_catalog(200, tmp_path / "cat.fits", page_size=40, query_fn=fake)
    assert fake.calls == 3 + 3
    assert len(table) == 200
    assert len(np.unique(table["specObjID"])) == 200


def test_urls_for_sdss_and_eboss():
    legacy = {"run2d": "26", "plate": 266, "mjd": 51602, "fiberID": 1}
    boss = {"run2d": b"v5_13_2", "plate": 10000, "mjd": 57346, "fiberID": 12}
    assert spec_url(legacy, 16, "https://m") == \
        "https://m/dr16/sdss/spectro/redux/26/spectra/lite/0266/spec-0266-51602-0001.fits"
    assert spec_url(boss) == ("https://data.sdss.org/sas/dr17/eboss/spectro/redux/v5_13_2/spectra/lite/10000/"
                              "spec-10000-57346-0012.fits")
    url = jpeg_url(150.1, 2.2)
    assert url.startswith("https://skyserver.sdss.org/dr17/SkyServerWS/ImgCutout/getjpeg?")
    assert "scale=0.4" in url
    assert "width=64" in url
    assert "height=64" in url
    assert "ra=150.100000" in url


# --------------------------------------------------------------------------------------------
# preparation
# --------------------------------------------------------------------------------------------
def test_to_grid_handles_gaps_and_refuses_bad_spectra():
    loglam, flux, ivar = good_spectrum()
    ivar[300:310] = 0
    flux[400] = np.nan
    out = to_grid(loglam, flux, ivar)
    assert not isinstance(out, str)
    f, iv, mask = out
    grid = neurips_loglam()
    gap = (grid >= loglam[300] - 5e-5) & (grid <= loglam[309] + 5e-5)
    assert gap.sum() == 10
    assert np.all(mask[gap] == 1)
    assert np.all(iv[gap] == 0)
    assert np.all(np.isfinite(f))
    assert np.allclose(f[~mask.astype(bool)], np.interp(grid, loglam, flux)[~mask.astype(bool)], atol=1e-4)
    assert to_grid(loglam[200:], flux[200:], ivar[200:]) == "does not cover the wavelength window"
    assert to_grid(loglam, np.full_like(flux, 3.0), np.ones_like(flux)) == "constant flux"
    assert to_grid(loglam, flux, np.zeros_like(ivar)) == "no valid pixels in the window"
    apj = to_grid(*good_spectrum(), grid="apj")
    assert apj[0].shape == (4501,)


def test_prepare_writes_dataset_and_report(tmp_path):
    n = 9
    rng = np.random.default_rng(1)
    ids = np.arange(n, dtype=np.int64) + 5000
    cat = Table({"specObjID": ids, "plate": np.full(n, 266), "mjd": np.full(n, 51602), "fiberID": np.arange(n) + 1,
                 "ra": rng.uniform(0, 10, n), "dec": rng.uniform(0, 10, n), "z": rng.uniform(0.02, 0.2, n),
                 **{f"cModelMag_{b}": rng.uniform(15, 18, n) for b in "ugriz"}})
    cat.write(tmp_path / "catalog.fits")
    (tmp_path / "spectra").mkdir()
    (tmp_path / "images").mkdir()
    for i, objid in enumerate(ids):
        loglam, flux, ivar = good_spectrum(i)
        if i == 1:
            loglam, flux, ivar = loglam[500:], flux[500:], ivar[500:]  # short coverage
        if i == 2:
            flux[:] = 7.0  # constant
        if i == 3:
            ivar[1000:1100] = 0  # a gap
            flux[1050] = np.nan
        if i != 4:  # spectrum 4 missing; a SAS-style name for spectrum 5
            name = f"spec-0266-51602-{i + 1:04d}.fits" if i == 5 else f"{objid}.fits"
            (tmp_path / "spectra" / name).write_bytes(spec_bytes(loglam, flux, ivar, boss=i % 2 == 0))
        if i != 6:
            (tmp_path / "images" / f"{objid}.jpg").write_bytes(jpeg_bytes(seed=i))
    # the survey's own measurements as the SQL service returns them: NULL (masked) where MPA-JHU has none
    cat["h_alpha_eqw"] = np.ma.masked_array(-rng.uniform(1, 50, n), mask=np.arange(n) == 3)
    cat["bptclass"] = np.ma.masked_array(np.arange(n) % 5 + 1, mask=np.arange(n) == 3)
    cat["d4000_n"] = rng.uniform(1, 2, n)
    cat["velDisp"] = rng.uniform(50, 250, n)
    cat["instrument"] = np.where(np.arange(n) % 2 == 0, "BOSS", "SDSS")
    cat.write(tmp_path / "catalog.fits", overwrite=True)
    out = prepare(tmp_path / "catalog.fits", tmp_path / "spectra", tmp_path / "images", tmp_path / "ds", chunk=2)
    survey = open_survey(out)
    assert sorted(np.asarray(survey.catalog["objid"]) - 5000) == [0, 3, 5, 7, 8]
    kept = survey.catalog
    order = np.asarray(kept["objid"]) - 5000
    assert np.allclose(kept["d4000_n"], cat["d4000_n"][order])
    assert np.allclose(kept["velDisp"], cat["velDisp"][order])
    null = order == 3
    ew = np.ma.filled(np.ma.asarray(kept["h_alpha_eqw"], dtype=np.float64), np.nan)  # astropy masks NaN on reading
    assert np.isnan(ew[null]).all()
    assert (np.asarray(kept["bptclass"])[null] == -1).all()
    assert np.allclose(ew[~null], cat["h_alpha_eqw"].data[order[~null]])
    assert list(kept["instrument"]) == list(cat["instrument"][order])  # the fibre's diameter (utils.astro.photometry)
    assert fibre_diameters(kept, survey.meta).tolist() == [2.0 if i % 2 == 0 else 3.0 for i in order]
    assert survey.flux.shape == (5, 3598)
    assert survey.mask is not None
    row3 = int(np.flatnonzero(np.asarray(survey.catalog["objid"]) == 5003)[0])
    assert survey.mask[row3].sum() >= 100
    assert np.all(np.isfinite(survey.flux[row3]))
    report = (tmp_path / "ds.dropped.csv").read_text()
    for objid, reason in ((5001, "does not cover"), (5002, "constant flux"), (5004, "spectrum file missing"),
                          (5006, "gri image missing")):
        assert f"{objid},{reason}" in report
    with pytest.raises(Exception, match="already exists"):
        prepare(tmp_path / "catalog.fits", tmp_path / "spectra", tmp_path / "images", tmp_path / "ds")


def _mirror(tmp_path, n: int = 3, with_specobjid: bool = True):
    """A tiny local mirror: SAS-named spectra, images named by (derived) specObjID, a catalog."""
    from utils.data.prepare import spec_obj_id

    rng = np.random.default_rng(2)
    plate, mjd, fiber = np.full(n, 266), np.full(n, 51602), np.arange(n) + 1
    ids = spec_obj_id(plate, mjd, fiber)
    cat = Table({"plate": plate, "mjd": mjd, "fiberID": fiber, "ra": rng.uniform(0, 10, n),
                 "dec": rng.uniform(0, 10, n), "z": rng.uniform(0.02, 0.2, n),
                 **{f"cModelMag_{b}": rng.uniform(15, 18, n) for b in "ugriz"}})
    if with_specobjid:
        cat["specObjID"] = ids
    for folder in ("spectra", "images"):
        (tmp_path / folder).mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / "spectra" / f"spec-0266-51602-{i + 1:04d}.fits").write_bytes(spec_bytes(*good_spectrum(i)))
        (tmp_path / "images" / f"{ids[i]}.jpg").write_bytes(jpeg_bytes(seed=i))
    return cat, ids


def test_prepare_accepts_a_plate_mjd_fiber_catalog(tmp_path):
    cat, ids = _mirror(tmp_path, with_specobjid=False)
    cat.write(tmp_path / "catalog.fits")
    out = prepare(tmp_path / "catalog.fits", tmp_path / "spectra", tmp_path / "images", tmp_path / "ds")
    assert sorted(np.asarray(open_survey(out).catalog["objid"])) == sorted(ids.tolist())
    assert (ids[0] >> 50) == 266
    assert ((ids[0] >> 38) & 0xFFF) == 1  # the specObjID bit layout


def test_prepare_checks_the_catalog_first_and_cleans_up_after_a_failure(tmp_path, monkeypatch):
    from utils.data import prepare as prep
    from utils.errors import UserError

    cat, _ = _mirror(tmp_path)
    cat.remove_columns(["cModelMag_r", "z"])
    cat.write(tmp_path / "bad.fits")
    calls = []
    monkeypatch.setattr(prep, "read_spec", lambda path: calls.append(path))
    with pytest.raises(UserError, match=r"lacks the column\(s\) z, cModelMag_r"):
        prepare(tmp_path / "bad.fits", tmp_path / "spectra", tmp_path / "images", tmp_path / "ds")
    assert calls == []
    assert not list(tmp_path.glob("ds*"))  # nothing read, nothing written
    monkeypatch.undo()
    good, _ = _mirror(tmp_path)
    good.write(tmp_path / "catalog.fits")

    def dying_finish(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while finishing")

    monkeypatch.setattr(prep.DatasetWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "catalog.fits", tmp_path / "spectra", tmp_path / "images", tmp_path / "ds")
    assert not list(tmp_path.glob("ds*"))  # no ds.staging, no ds.partial


@pytest.mark.network
def test_live_sdss_query(tmp_path):
    try:
        requests.get("https://skyserver.sdss.org", timeout=5)
    except requests.RequestException:
        pytest.skip("SDSS is unreachable from here")
    table = query_catalog(3, tmp_path / "cat.fits")
    assert len(table) == 3
    assert "specObjID" in table.colnames


def frame_bytes(band_index: int) -> bytes:
    """A 300 x 300 'corrected frame' in nanomaggies with a TAN WCS centred on (150, 2)."""
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [150.5, 150.5]
    wcs.wcs.cdelt = [-0.396 / 3600, 0.396 / 3600]
    yy, xx = np.mgrid[:300, :300]
    data = (band_index + 1) * np.exp(-((xx - 120) ** 2 + (yy - 160) ** 2) / 20.0).astype(np.float32)
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header=wcs.to_header()).writeto(buffer)
    import bz2
    return bz2.compress(buffer.getvalue())


def test_ugriz_cutouts_share_each_frame(tmp_path):
    from utils.data.sdss import download_ugriz

    files = {f"/dr17/eboss/photoObj/frames/301/752/1/frame-{b}-000752-1-0100.fits.bz2": frame_bytes(i)
             for i, b in enumerate("ugriz")}
    catalog = Table({"specObjID": [11, 12], "ra": [150.0 + 30 * 0.396 / 3600, 150.001],
                     "dec": [2.0 + 10 * 0.396 / 3600, 1.999], "run": [752, 752], "rerun": [301, 301],
                     "camcol": [1, 1], "field": [100, 100]})
    with FaultyServer(files, {next(iter(files)): [503]}) as server:
        report = download_ugriz(catalog, tmp_path, fast_downloader(), base=server.url)
    assert not report.failures
    frame_requests = [r for r in server.requests if "frame-" in r]
    assert sorted(set(frame_requests)) == sorted(files)
    assert len(frame_requests) == 6  # one retry, else once each
    cut = np.load(tmp_path / "11.npy")
    assert cut.shape == (5, 64, 64)
    assert cut.dtype == np.float32
    peak = np.unravel_index(np.argmax(cut[2]), cut[2].shape)
    assert abs(peak[0] - 32) <= 2
    assert abs(peak[1] - 32) <= 2  # the source sits at the requested position
    assert np.allclose(cut.max((1, 2)), np.arange(1, 6), rtol=0.05)  # nanomaggies of each band kept


def test_compression_redirects_and_stale_partial_files(tmp_path):
    """A gzip response is checked against its compressed length and kept; a redirect loop and an
    undecodable body become listed failures, not tracebacks; a kill's partial files are swept."""
    files = {f"/spec/{i}.fits": spec_bytes(*good_spectrum(i)) for i in range(3)}
    faults = {"/spec/0.fits": ["gzip"], "/spec/1.fits": ["redirect-loop"] * 100, "/spec/2.fits": ["bad-gzip"] * 10}
    stale = tmp_path / ".0.fits.999.1.part"
    stale.write_bytes(b"left by kill -9")
    with FaultyServer(files, faults) as server:
        tasks = [Task(str(i), f"{server.url}/spec/{i}.fits", tmp_path / f"{i}.fits", valid_spectrum) for i in range(3)]
        report = fast_downloader(retries=1).run(tasks, tmp_path / "failures.csv")
    assert report.fetched == 1
    assert valid_spectrum(tmp_path / "0.fits") is None
    assert "TooManyRedirects" in report.failures["1"]
    assert "ContentDecodingError" in report.failures["2"]
    assert not stale.exists()
    assert not list(tmp_path.glob(".*.part"))
    assert (tmp_path / "failures.csv").read_text().count("\n") == 3  # header + 2 failures


def test_silent_server_stops_the_run_in_bounded_time(tmp_path):
    """A server that accepts connections but never answers (time-outs, not refusals) stops the
    run with one line after a bounded time; files fetched before are kept."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # never accepted: every request times out
        port = silent.getsockname()[1]
        (tmp_path / "kept.fits").write_bytes(spec_bytes(*good_spectrum(0)))
        tasks = [Task("kept", f"http://127.0.0.1:{port}/kept", tmp_path / "kept.fits", valid_spectrum)]
        tasks += [Task(str(i), f"http://127.0.0.1:{port}/{i}", tmp_path / f"{i}.fits", valid_spectrum)
                  for i in range(40)]
        start = time.perf_counter()
        with pytest.raises(NetworkUnreachable, match=f"cannot connect to 127.0.0.1:{port}: it stopped answering"):
            fast_downloader(timeout=0.2, retries=1).run(tasks, tmp_path / "failures.csv")
        elapsed = time.perf_counter() - start
    assert elapsed < 10
    assert valid_spectrum(tmp_path / "kept.fits") is None
    assert "Timeout" in (tmp_path / "failures.csv").read_text()


def test_server_dying_midway_stops_the_run_and_keeps_what_was_fetched(tmp_path):
    files = {f"/spec/{i}.fits": spec_bytes(*good_spectrum(i)) for i in range(40)}
    with FaultyServer(files, die_after=6) as server:
        tasks = [Task(str(i), f"{server.url}/spec/{i}.fits", tmp_path / f"{i}.fits", valid_spectrum) for i in range(40)]
        start = time.perf_counter()
        with pytest.raises(NetworkUnreachable, match="stopped answering") as stopped:
            fast_downloader(workers=2, timeout=0.2, retries=1).run(tasks, tmp_path / "failures.csv")
        elapsed = time.perf_counter() - start
    kept = {p.stem for p in tmp_path.glob("*.fits") if valid_spectrum(p) is None}
    served = {path.rsplit("/", 1)[-1].removesuffix(".fits") for path in server.served}
    failed = {str(key) for key in Table.read(tmp_path / "failures.csv", format="ascii.csv")["key"]}
    # the files the run says it kept are on disk, valid, and were served in full; a served file the
    # client gave up on (a slow answer on a loaded machine) is listed as failed, never half-written
    assert kept
    assert kept <= served
    assert served - kept <= failed
    assert f"{len(kept)} fetched in this run are kept" in str(stopped.value)
    assert elapsed < 15
    assert not list(tmp_path.glob(".*.part"))
    assert len(server.requests) < 40  # it stopped asking
