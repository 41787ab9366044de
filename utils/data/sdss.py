"""Download SDSS galaxies: catalog (SQL), spec-lite spectra, colour JPEG and ugriz cutouts.

    python -m utils.sdss catalog --n 100000 --out data/sdss/catalog.fits [--release 16]
    python -m utils.sdss spectra --catalog data/sdss/catalog.fits --out data/sdss/spectra
    python -m utils.sdss images  --catalog data/sdss/catalog.fits --out data/sdss/images [--ugriz]
    python -m utils.sdss all --n 100000 --root data/sdss        # all of the above, then prepare
    python -m utils.sdss all --photometric --n 20000 --mag-max 17.77 --root data/sdss_phot --ugriz

``--photometric`` selects PhotoObj galaxies instead (the survey's imaging catalogue, most of which
has no spectrum): by magnitude (``--mag-max``), area (``--area RA_MIN RA_MAX DEC_MIN DEC_MAX``) or a
list of coordinates (``--coords FILE``, a FITS or CSV table with ra and dec: the nearest galaxy
within ``--match-arcsec`` of each), with or without spectra (``--spectra with|without|any``). Its
files are named by objID; ``all --photometric`` ends in a dataset of images only, for
generate.py's ``sampling.catalog``.

Every step can be interrupted and rerun: the catalog query resumes after the last saved page;
downloads skip files that are already there and valid, and fetch broken ones again. Files are
written under a temporary name, validated, then renamed. Objects that fail for good are listed
with the reason in ``failures.csv`` next to the files.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import requests
import urllib3
from astropy.table import Table, vstack

from utils.data.dataset import IMAGE_SIZE, read_table
from utils.data.files import (
    ID_KEYWORD,
    MPA_JHU_COLUMNS,
    cutout_path,
    jpeg_path,
    object_ids,
    read_cutout_5band,
    read_cutout_jpeg,
    spectrum_path,
)
from utils.data.prepare import prepare
from utils.errors import UserError

logger = logging.getLogger(__name__)

SAS_URL = "https://data.sdss.org/sas"
SKYSERVER_URL = "https://skyserver.sdss.org"
#: columns of the catalog query (SPEC 1, plus the imaging frame of each object for ugriz cutouts)
SPEC_COLUMNS = ("specObjID", "plate", "mjd", "fiberID", "run2d", "instrument", "ra", "dec", "z", "zErr", "velDisp",
                "velDispErr")
PHOTO_COLUMNS = ("objID", "cModelMag_u", "cModelMag_g", "cModelMag_r", "cModelMag_i", "cModelMag_z", "petroRad_r",
                 "run", "rerun", "camcol", "field")
PAGE_SIZE = 25000
JPEG_SCALE = 0.4  # arcsec per pixel of the SkyServer colour cutouts
RETRY_STATUS = {429, 500, 502, 503, 504}


class NetworkUnreachable(UserError):
    """The servers cannot be reached at all."""


# --------------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------------
def build_query(top: int, after: int, z_min: float | None = None, z_max: float | None = None,
                mag_max: float | None = None) -> str:
    """SQL for one page of galaxies with specObjID > ``after``, ordered by specObjID."""
    aliases = {table: f"m{i}" for i, table in enumerate(MPA_JHU_COLUMNS)}
    cols = ", ".join([f"s.{c}" for c in SPEC_COLUMNS] + [f"p.{c}" for c in PHOTO_COLUMNS]
                     + [f"{aliases[t]}.{c}" for t, columns in MPA_JHU_COLUMNS.items() for c in columns])
    joins = "".join(f" LEFT OUTER JOIN {t} AS {a} ON {a}.specObjID = s.specObjID" for t, a in aliases.items())
    where = ["s.class = 'GALAXY'", "s.zWarning = 0", f"s.specObjID > {int(after)}"]
    if z_min is not None:
        where.append(f"s.z > {z_min}")
    if z_max is not None:
        where.append(f"s.z < {z_max}")
    if mag_max is not None:
        where.append(f"p.cModelMag_r < {mag_max}")
    return (f"SELECT TOP {int(top)} {cols} FROM SpecObj AS s JOIN PhotoObj AS p ON s.bestObjID = p.objID{joins} "
            f"WHERE {' AND '.join(where)} ORDER BY s.specObjID")


#: columns of the photometric catalog query (PhotoObj; SDSS's 3" fibre magnitudes among them)
PHOTOMETRIC_COLUMNS = ("objID", "ra", "dec", *(f"cModelMag_{b}" for b in "ugriz"), *(f"fiberMag_{b}" for b in "ugriz"),
                       "petroRad_r", "run", "rerun", "camcol", "field")
#: which photometric galaxies: those with a spectrum, those without, or both
SPECTRA_CHOICES = ("any", "with", "without")
#: PhotoObj's type code of a galaxy
GALAXY_TYPE = 3


def build_photometric_query(top: int, after: int, mag_max: float | None = None, spectra: str = "any",
                            area: tuple[float, float, float, float] | None = None) -> str:
    """SQL for one page of PhotoObj galaxies (primary detections) with objID > ``after``, ordered
    by objID, with their spectrum's specObjID and redshift where they have one (``spectra`` 'with'
    keeps only those, 'without' only the others); ``area`` is (ra_min, ra_max, dec_min, dec_max)
    in degrees."""
    if spectra not in SPECTRA_CHOICES:
        raise ValueError(f"spectra must be one of {SPECTRA_CHOICES}, got {spectra!r}")
    cols = ", ".join([f"p.{c}" for c in PHOTOMETRIC_COLUMNS] + ["s.specObjID", "s.z"])
    join = "JOIN" if spectra == "with" else "LEFT OUTER JOIN"
    where = [f"p.type = {GALAXY_TYPE}", "p.mode = 1", f"p.objID > {int(after)}"]
    if mag_max is not None:
        where.append(f"p.cModelMag_r < {mag_max}")
    if area is not None:
        ra_min, ra_max, dec_min, dec_max = area
        where.append(f"p.ra BETWEEN {ra_min} AND {ra_max} AND p.dec BETWEEN {dec_min} AND {dec_max}")
    if spectra == "without":
        where.append("s.specObjID IS NULL")
    return (f"SELECT TOP {int(top)} {cols} FROM PhotoObj AS p {join} SpecObj AS s ON s.bestObjID = p.objID "
            f"AND s.sciencePrimary = 1 WHERE {' AND '.join(where)} ORDER BY p.objID")


def query_catalog(n: int, out: str | Path, release: int = 17, page_size: int = PAGE_SIZE,
                  query_fn: Callable[..., Table] | None = None, photometric: bool = False, **cuts) -> Table:
    """Fetch ``n`` galaxies page by page into the FITS table ``out``: spectroscopic ones (keyset
    paging on specObjID; ``cuts`` of :func:`build_query`), or with ``photometric`` PhotoObj
    galaxies (keyset paging on objID; ``cuts`` of :func:`build_photometric_query`).

    Each page is saved in ``<out>.pages/`` as it arrives, so an interrupted query resumes after
    the last saved page. ``query_fn(sql, data_release=...)`` defaults to astroquery's
    ``SDSS.query_sql``.
    """
    key = "objID" if photometric else "specObjID"
    build = build_photometric_query if photometric else build_query
    out = Path(out)
    pages_dir = out.with_name(out.name + ".pages")
    pages_dir.mkdir(parents=True, exist_ok=True)
    if query_fn is None:
        from astroquery.sdss import SDSS
        query_fn = SDSS.query_sql
    pages = [Table.read(p) for p in sorted(pages_dir.glob("page_*.fits"))]
    have = sum(len(p) for p in pages)
    last = int(max(p[key].max() for p in pages)) if pages else 0
    if pages:
        logger.info("resuming the catalog query after %d saved rows (%s > %d)", have, key, last)
    from tqdm import tqdm
    bar = tqdm(total=n, initial=min(have, n), desc="catalog", unit="row")
    while have < n:
        sql = build(min(page_size, n - have), last, **cuts)
        try:
            page = query_fn(sql, data_release=release)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise NetworkUnreachable(f"the SDSS SQL service cannot be reached ({type(err).__name__}); "
                                     f"rerun the same command to resume after {have} rows") from None
        if page is None or len(page) == 0:
            logger.info("the query returned no more rows after %d", have)
            break
        page.write(pages_dir / f"page_{len(pages):05d}.fits")
        pages.append(page)
        have += len(page)
        last = int(page[key].max())
        bar.update(len(page))
    bar.close()
    if not pages:
        raise UserError("the catalog query returned no galaxies: check the cuts")
    return write_catalog(vstack(pages)[:n], out, key)


def write_catalog(table: Table, out: Path, key: str) -> Table:
    """Write a catalog atomically, recording the id column its files are named by (``IDCOL``)."""
    table.meta[ID_KEYWORD] = key
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, out)
    return table


def match_coordinates(coords: Table, out: str | Path, radius_arcsec: float = 2.0, release: int = 17,
                      crossid_fn: Callable[..., Table] | None = None, chunk: int = 1000) -> Table:
    """The nearest PhotoObj galaxy within ``radius_arcsec`` of each (ra, dec) of ``coords``, by
    astroquery's ``SDSS.query_crossid`` (or ``crossid_fn`` with its signature), ``chunk``
    coordinates per request; written like :func:`query_catalog`'s catalogs (files named by objID).
    Coordinates without a galaxy are counted in the log and left out."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    if crossid_fn is None:
        from astroquery.sdss import SDSS
        crossid_fn = SDSS.query_crossid
    missing = [c for c in ("ra", "dec") if c not in coords.colnames]
    if missing:
        raise UserError(f"--coords: the table lacks {', '.join(missing)} (degrees); it has "
                        f"{', '.join(coords.colnames) or 'none'}")
    parts = []
    for start in range(0, len(coords), chunk):
        rows = coords[start:start + chunk]
        where = SkyCoord(np.asarray(rows["ra"], float), np.asarray(rows["dec"], float), unit="deg")
        try:
            found = crossid_fn(where, photoobj_fields=[*PHOTOMETRIC_COLUMNS, "type"], radius=radius_arcsec * u.arcsec,
                               data_release=release)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise NetworkUnreachable(f"the SDSS cross-match service cannot be reached ({type(err).__name__})"
                                     ) from None
        if found is not None and len(found):
            parts.append(found[np.asarray(found["type"]) == GALAXY_TYPE] if "type" in found.colnames else found)
    table = vstack(parts) if parts else Table()
    if len(table) == 0:
        raise UserError(f"no SDSS galaxy lies within {radius_arcsec}\" of any of the {len(coords)} coordinates")
    _, first = np.unique(np.asarray(table["objID"]), return_index=True)  # one row per galaxy
    table = table[np.sort(first)]
    if len(table) < len(coords):
        logger.warning("%d of %d coordinates have no SDSS galaxy within %.1f\"", len(coords) - len(table),
                       len(coords), radius_arcsec)
    return write_catalog(table[[c for c in PHOTOMETRIC_COLUMNS if c in table.colnames]], Path(out), "objID")


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: the catalog columns that name a spectrum's spec-lite file
SPEC_FILE_COLUMNS = ("specObjID", "plate", "mjd", "fiberID", "run2d")


def spec_url(row, release: int = 17, base: str = SAS_URL) -> str:
    """spec-lite URL of a catalog row: the SDSS tree for legacy run2d (26, 103, 104), the eBOSS
    tree for BOSS/eBOSS reductions (run2d v5_*)."""
    run2d = _text(row["run2d"]).strip()
    tree = "eboss" if run2d.startswith("v") else "sdss"
    plate, mjd, fiber = int(row["plate"]), int(row["mjd"]), int(row["fiberID"])
    return (f"{base}/dr{release}/{tree}/spectro/redux/{run2d}/spectra/lite/{plate:04d}/"
            f"spec-{plate:04d}-{mjd:05d}-{fiber:04d}.fits")


def jpeg_url(ra: float, dec: float, release: int = 17, base: str = SKYSERVER_URL) -> str:
    """SkyServer colour cutout: 64 x 64 at 0.4"/pixel centred on (ra, dec)."""
    return (f"{base}/dr{release}/SkyServerWS/ImgCutout/getjpeg?ra={ra:.6f}&dec={dec:.6f}&scale={JPEG_SCALE}"
            f"&width={IMAGE_SIZE}&height={IMAGE_SIZE}")


def frame_url(run: int, rerun: int, camcol: int, field_: int, band: str, release: int = 17, base: str = SAS_URL) -> str:
    """A calibrated imaging frame (nanomaggies, with WCS)."""
    return (f"{base}/dr{release}/eboss/photoObj/frames/{rerun}/{run}/{camcol}/"
            f"frame-{band}-{run:06d}-{camcol}-{field_:04d}.fits.bz2")


# --------------------------------------------------------------------------------------------
# validators
# --------------------------------------------------------------------------------------------
def valid_spectrum(path: Path) -> str | None:
    """None when ``path`` is a spec(-lite) file with loglam, flux and ivar in HDU 1; else why not."""
    from astropy.io import fits
    try:
        with fits.open(path, memmap=False) as hdus:
            names = {n.lower() for n in hdus[1].columns.names}
            if not {"loglam", "flux", "ivar"} <= names:
                return "HDU 1 lacks loglam/flux/ivar"
            if len(hdus[1].data) == 0:
                return "empty spectrum"
    except Exception as err:
        return f"not a readable FITS file ({type(err).__name__})"
    return None


def valid_jpeg(path: Path) -> str | None:
    """None for a decodable 64 x 64 colour JPEG, else the reason."""
    image = read_cutout_jpeg(path)
    return image if isinstance(image, str) else None


def valid_frame(path: Path) -> str | None:
    from astropy.io import fits
    try:
        with fits.open(path) as hdus:
            if hdus[0].data is None or hdus[0].data.ndim != 2:
                return "HDU 0 is not an image"
    except Exception as err:
        return f"not a readable FITS file ({type(err).__name__})"
    return None


# --------------------------------------------------------------------------------------------
# the downloader
# --------------------------------------------------------------------------------------------
@dataclass
class Task:
    key: str  # object id or frame name, for the failures file
    url: str
    dest: Path
    validate: Callable[[Path], str | None]


@dataclass
class Report:
    fetched: int = 0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)


class RateLimiter:
    """At most ``rate`` request starts per second across all threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.lock = threading.Lock()
        self.next = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


#: suffix of a download in progress (``.<name>.<pid>.<thread>.part``)
PART_SUFFIX = ".part"
#: why a file was not attempted: the run stopped once the server was taken for unreachable
STOPPED = "not attempted: the run stopped (server unreachable)"
#: errors worth another attempt
RETRY_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError, http.client.IncompleteRead)
#: errors that say the server cannot be reached (refused, reset, or silent)
UNREACHABLE_ERRORS = (requests.ConnectionError, requests.Timeout)


def sweep_partial_files(folder: Path) -> int:
    """Delete downloads in progress that a killed run left in ``folder``; returns how many."""
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f".*{PART_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d unfinished download(s) left in %s", len(stale), folder)
    return len(stale)


class Downloader:
    """Concurrent, rate-limited downloads with retries, validation and atomic writes.

    Parameters
    ----------
    workers : parallel connections.
    rate : request starts per second over all workers (0: unlimited).
    timeout : seconds to connect and between bytes of the body.
    retries : extra attempts after a connection error, timeout, truncated body, 429 or 5xx.
    backoff : first retry delay in seconds; doubles every attempt (with jitter); a 429's
        Retry-After header is honoured.
    """

    def __init__(self, workers: int = 8, rate: float = 10.0, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 1.0, session: requests.Session | None = None, give_up_after: int = 0) -> None:
        self.workers = workers
        self.limiter = RateLimiter(rate)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = session or requests.Session()
        #: consecutive files lost to connection errors or time-outs after which the server is taken
        #: for unreachable and the run stops (0: twice the number of workers, at least 5)
        self.give_up_after = give_up_after or max(5, 2 * workers)
        self._stop = threading.Event()

    def _attempt(self, task: Task) -> str | None:
        """One download; None on success, else the reason (a retryable one starts with 'retry:').
        Every exception of the HTTP stack becomes a reason, never a traceback."""
        self.limiter.wait()
        tmp = task.dest.with_name(f".{task.dest.name}.{os.getpid()}.{threading.get_ident()}{PART_SUFFIX}")
        try:
            with self.session.get(task.url, timeout=self.timeout, stream=True) as response:
                if response.status_code in RETRY_STATUS:
                    delay = response.headers.get("Retry-After")
                    return f"retry:HTTP {response.status_code}" + (f":{delay}" if delay else "")
                if response.status_code != 200:
                    return f"HTTP {response.status_code}"
                expected = response.headers.get("Content-Length")
                with open(tmp, "wb") as handle:
                    for chunk in response.iter_content(65536):
                        handle.write(chunk)
                # Content-Length counts the bytes on the wire: compare with the raw (still compressed,
                # for a gzip response) byte count, not with the decoded size
                size = response.raw.tell()
                if expected is not None and expected.strip().isdigit() and size != int(expected):
                    return f"retry:truncated body ({size} of {expected} bytes)"
            problem = task.validate(tmp)
            if problem:
                return f"retry:invalid file: {problem}"
            os.replace(tmp, task.dest)
            return None
        except RETRY_ERRORS as err:
            return f"retry:{type(err).__name__}"
        except (requests.RequestException, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError) as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'}"
        finally:
            if tmp.exists():
                tmp.unlink()

    def fetch(self, task: Task) -> str | None:
        """Download one file with retries; None on success, else the final reason."""
        reason = None
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                return STOPPED
            reason = self._attempt(task)
            if reason is None or not reason.startswith("retry:"):
                return reason
            parts = reason.split(":")
            delay = self.backoff * 2 ** attempt * (1 + 0.25 * random.random())
            if len(parts) > 2 and parts[-1].strip().isdigit():
                delay = max(delay, float(parts[-1]))
            if attempt < self.retries and self._stop.wait(delay):
                return STOPPED
        return reason.removeprefix("retry:") + f" (after {self.retries + 1} attempts)"

    def run(self, tasks: Iterable[Task], failures_file: Path | None = None, desc: str = "download") -> Report:
        """Fetch every task whose file is missing or invalid; list permanent failures."""
        from tqdm import tqdm
        tasks = list(tasks)
        report = Report()
        todo = []
        self._stop.clear()
        for folder in {task.dest.parent for task in tasks}:
            sweep_partial_files(folder)
        for task in tasks:
            task.dest.parent.mkdir(parents=True, exist_ok=True)
            if task.dest.exists() and task.validate(task.dest) is None:
                report.skipped += 1
            else:
                todo.append(task)
        bar = tqdm(total=len(tasks), initial=report.skipped, desc=desc, unit="file")
        consecutive, unreachable = 0, None
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.fetch, task): task for task in todo}
            for future in as_completed(futures):
                if future.cancelled():  # after the server was taken for unreachable
                    continue
                task, reason = futures[future], future.result()
                if reason is None:
                    report.fetched += 1
                    consecutive = 0
                elif reason != STOPPED:
                    report.failures[task.key] = f"{reason}: {task.url}"
                    consecutive = consecutive + 1 if any(e.__name__ in reason for e in UNREACHABLE_ERRORS) else 0
                bar.update(1)
                bar.set_postfix(new=report.fetched, kept=report.skipped, failed=len(report.failures))
                if consecutive >= self.give_up_after and unreachable is None:
                    unreachable = requests.utils.urlparse(task.url).netloc
                    self._stop.set()  # running downloads end after their current attempt
                    for other in futures:
                        other.cancel()
        bar.close()
        if unreachable is not None:
            if failures_file is not None:
                write_failures(failures_file, report.failures)
            raise NetworkUnreachable(f"cannot connect to {unreachable}: it stopped answering ({consecutive} files in a "
                                     f"row lost to "
                                     f"connection errors or time-outs; {report.fetched} fetched in this run are kept); "
                                     f"rerun the same command later; nothing valid is fetched twice")
        if failures_file is not None:
            write_failures(failures_file, report.failures)
        logger.info("%s: %d fetched, %d already valid, %d failed%s", desc, report.fetched, report.skipped,
                    len(report.failures), f" (listed in {failures_file})" if report.failures and failures_file else "")
        return report


def write_failures(path: Path, failures: dict[str, str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "reason"])
        for key, reason in sorted(failures.items()):
            writer.writerow([key, reason])


# --------------------------------------------------------------------------------------------
# spectra and images
# --------------------------------------------------------------------------------------------
def download_spectra(catalog: Table, out: Path, downloader: Downloader, release: int = 17,
                     base: str = SAS_URL) -> Report:
    tasks = [Task(str(int(r["specObjID"])), spec_url(r, release, base), spectrum_path(out, r["specObjID"]),
                  valid_spectrum)
             for r in catalog]
    return downloader.run(tasks, Path(out) / "failures.csv", desc="spectra")


def download_jpegs(catalog: Table, out: Path, downloader: Downloader, release: int = 17,
                   base: str = SKYSERVER_URL) -> Report:
    """The SkyServer colour cutout of every catalog row, named by its id (utils.data.files.object_ids)."""
    tasks = [Task(str(objid), jpeg_url(float(r["ra"]), float(r["dec"]), release, base), jpeg_path(out, objid),
                  valid_jpeg) for objid, r in zip(object_ids(catalog), catalog)]
    return downloader.run(tasks, Path(out) / "failures.csv", desc="jpeg cutouts")


def download_ugriz(catalog: Table, out: Path, downloader: Downloader, release: int = 17, base: str = SAS_URL) -> Report:
    """5-band cutouts in nanomaggies: every frame is downloaded once and cut for all its objects."""
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.wcs import WCS

    out = Path(out)
    frames_dir = out / "frames"
    key = lambda r: (int(r["run"]), int(r["rerun"]), int(r["camcol"]), int(r["field"]))  # noqa: E731
    groups: dict[tuple, list] = {}
    for objid, r in zip(object_ids(catalog), catalog):
        groups.setdefault(key(r), []).append((objid, r))
    tasks = [Task(f"frame-{b}-{run:06d}-{camcol}-{fld:04d}", frame_url(run, rerun, camcol, fld, b, release, base),
                  frames_dir / f"frame-{b}-{run:06d}-{camcol}-{fld:04d}.fits.bz2", valid_frame)
             for (run, rerun, camcol, fld) in groups for b in "ugriz"]
    report = downloader.run(tasks, out / "frame_failures.csv", desc="ugriz frames")
    failures: dict[str, str] = {}
    for (run, rerun, camcol, fld), rows in groups.items():
        names = [frames_dir / f"frame-{b}-{run:06d}-{camcol}-{fld:04d}.fits.bz2" for b in "ugriz"]
        if not all(p.exists() for p in names):
            for objid, _ in rows:
                failures[str(objid)] = "a frame of its field could not be downloaded"
            continue
        images = []
        for p in names:
            with fits.open(p) as hdus:
                images.append((hdus[0].data.astype(np.float32), WCS(hdus[0].header)))
        for objid, r in rows:
            dest = cutout_path(out, objid)
            if dest.exists():
                continue
            position = SkyCoord(float(r["ra"]), float(r["dec"]), unit="deg")
            try:
                stack = np.stack([Cutout2D(data, position, IMAGE_SIZE, wcs=wcs, mode="partial", fill_value=0.0).data
                                  for data, wcs in images])
            except Exception as err:  # outside the frame
                failures[str(objid)] = f"cutout failed: {err}"
                continue
            tmp = dest.with_name(dest.name + ".part.npy")
            np.save(tmp, stack.astype(np.float32))
            os.replace(tmp, dest)
    write_failures(out / "failures.csv", failures)
    report.failures.update(failures)
    return report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _downloader(args) -> Downloader:
    return Downloader(workers=args.workers, rate=args.rate, timeout=args.timeout, retries=args.retries,
                      backoff=args.backoff)


def add_selection(parser: argparse.ArgumentParser) -> None:
    """The options that choose the catalog's galaxies."""
    parser.add_argument("--n", type=int, default=None, help="galaxies to fetch (required unless --coords)")
    for name in ("z-min", "z-max"):
        parser.add_argument(f"--{name}", type=float, default=None, help="redshift cut (spectroscopic catalog)")
    parser.add_argument("--mag-max", type=float, default=None, help="r-band model magnitude limit")
    parser.add_argument("--photometric", action="store_true", help="PhotoObj galaxies (most without a spectrum) "
                        "instead of spectroscopic ones; their files are named by objID")
    parser.add_argument("--spectra", dest="with_spectra", choices=SPECTRA_CHOICES, default="any",
                        help="--photometric: galaxies with a spectrum, without one, or both")
    parser.add_argument("--area", type=float, nargs=4, default=None, metavar=("RA_MIN", "RA_MAX", "DEC_MIN", "DEC_MAX"),
                        help="--photometric: a box on the sky, degrees")
    parser.add_argument("--coords", default=None, help="--photometric: a FITS or CSV table with ra and dec; the "
                        "nearest galaxy of each")
    parser.add_argument("--match-arcsec", type=float, default=2.0, help="--coords: the largest separation")


def fetch_catalog(args, out: Path) -> Table:
    """The catalog the selection options ask for, written to ``out``."""
    if not args.photometric:
        for flag in ("coords", "area"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} selects photometric galaxies: add --photometric")
        if args.n is None:
            raise UserError("give --n, the number of galaxies to fetch")
        return query_catalog(args.n, out, args.release, z_min=args.z_min, z_max=args.z_max, mag_max=args.mag_max)
    if args.coords:
        return match_coordinates(read_table(Path(args.coords), "--coords table"), out, args.match_arcsec, args.release)
    if args.n is None:
        raise UserError("give --n, the number of galaxies to fetch (or --coords)")
    return query_catalog(args.n, out, args.release, photometric=True, mag_max=args.mag_max,
                         spectra=args.with_spectra, area=tuple(args.area) if args.area else None)


def with_cutouts(catalog: Table, images_dir: Path, ugriz_dir: Path | None, out: Path) -> Path:
    """Write the rows of ``catalog`` whose downloaded cutouts are all usable to ``out`` (a FITS
    catalog); the others are listed with the reason in ``<out>.dropped.csv``."""
    ids = object_ids(catalog)
    keep, dropped = np.ones(len(catalog), bool), []
    for i, objid in enumerate(ids):
        reason = valid_jpeg(jpeg_path(images_dir, objid)) if jpeg_path(images_dir, objid).exists() else "no JPEG"
        if reason is None and ugriz_dir is not None:
            cut = read_cutout_5band(cutout_path(ugriz_dir, objid))
            reason = cut if isinstance(cut, str) else None
        if reason:
            keep[i] = False
            dropped.append((int(objid), reason))
    if not keep.any():
        raise UserError(f"none of the {len(catalog)} galaxies has its cutouts (see {images_dir}/failures.csv)")
    kept = catalog[keep]
    write_catalog(kept, out, catalog.meta.get(ID_KEYWORD, "objID"))
    write_failures(out.with_name(out.name + ".dropped.csv"), {str(k): v for k, v in dropped})
    if dropped:
        logger.warning("%d of %d galaxies lack a usable cutout and are left out (listed in %s)", len(dropped),
                       len(catalog), out.with_name(out.name + ".dropped.csv"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download SDSS galaxies (catalog, spectra, images).")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--release", type=int, default=17, help="SDSS data release (16 for the paper)")
    common.add_argument("--workers", type=int, default=8)
    common.add_argument("--rate", type=float, default=10.0, help="requests per second, all workers together")
    common.add_argument("--timeout", type=float, default=30.0)
    common.add_argument("--retries", type=int, default=5)
    common.add_argument("--backoff", type=float, default=1.0)
    common.add_argument("--sas-url", default=SAS_URL, help="base URL of the Science Archive Server (or a mirror)")
    common.add_argument("--skyserver-url", default=SKYSERVER_URL, help="base URL of SkyServer (or a mirror)")
    cat = sub.add_parser("catalog", parents=[common])
    cat.add_argument("--out", required=True)
    add_selection(cat)
    for name in ("spectra", "images"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--catalog", required=True)
        p.add_argument("--out", required=True)
        if name == "images":
            p.add_argument("--ugriz", action="store_true", help="also 5-band cutouts from the corrected frames")
    every = sub.add_parser("all", parents=[common])
    every.add_argument("--root", default="data/sdss")
    every.add_argument("--ugriz", action="store_true")
    add_selection(every)
    args = parser.parse_args(argv)
    if args.command == "catalog":
        fetch_catalog(args, Path(args.out))
        return
    if args.command == "all":
        run_all(args, Path(args.root))
        return
    catalog = read_table(Path(args.catalog))
    if args.command == "spectra":
        missing = [c for c in SPEC_FILE_COLUMNS if c not in catalog.colnames]
        if missing:
            raise UserError(f"catalog '{args.catalog}' has no {', '.join(missing)}: spectra are fetched for a "
                            "spectroscopic catalog ('catalog' without --photometric), which names each spectrum's file")

        download_spectra(catalog, Path(args.out), _downloader(args), args.release, args.sas_url)
    else:
        download_jpegs(catalog, Path(args.out), _downloader(args), args.release, args.skyserver_url)
        if args.ugriz:
            download_ugriz(catalog, Path(args.out) / "ugriz", _downloader(args), args.release, args.sas_url)


def run_all(args, root: Path) -> Path:
    """Catalog, downloads and preparation into ``root``: a dataset with spectra, or with
    ``--photometric`` a dataset of images only (of the galaxies whose cutouts arrived)."""
    catalog = fetch_catalog(args, root / "catalog.fits")
    if not args.photometric:
        download_spectra(catalog, root / "spectra", _downloader(args), args.release, args.sas_url)
    download_jpegs(catalog, root / "images", _downloader(args), args.release, args.skyserver_url)
    ugriz = root / "ugriz" if args.ugriz else None
    if ugriz is not None:
        download_ugriz(catalog, ugriz, _downloader(args), args.release, args.sas_url)
    if args.photometric:
        usable = with_cutouts(catalog, root / "images", ugriz, root / "catalog_with_cutouts.fits")
        return prepare(usable, None, root / "images", root / "dataset", ugriz_dir=ugriz)
    return prepare(root / "catalog.fits", root / "spectra", root / "images", root / "dataset", ugriz_dir=ugriz)


if __name__ == "__main__":
    from utils.errors import cli
    cli(main)
