"""Download SDSS galaxies: catalog (SQL), spec-lite spectra, colour JPEG and ugriz cutouts.

    python -m utils.data.sdss catalog --n 100000 --out data/sdss/catalog.fits [--release 16]
    python -m utils.data.sdss spectra --catalog data/sdss/catalog.fits --out data/sdss/spectra
    python -m utils.data.sdss images  --catalog data/sdss/catalog.fits --out data/sdss/images [--ugriz]
    python -m utils.data.sdss all --n 100000 --root data/sdss        # all of the above, then prepare

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

from utils.data.dataset import IMAGE_SIZE
from utils.data.files import MPA_JHU_COLUMNS, cutout_path, jpeg_path, read_cutout_jpeg, spectrum_path
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


def query_catalog(n: int, out: str | Path, release: int = 17, page_size: int = PAGE_SIZE,
                  query_fn: Callable[..., Table] | None = None, **cuts) -> Table:
    """Fetch ``n`` galaxies page by page (keyset paging on specObjID) into the FITS table ``out``.

    Each page is saved in ``<out>.pages/`` as it arrives, so an interrupted query resumes after
    the last saved page. ``query_fn(sql, data_release=...)`` defaults to astroquery's
    ``SDSS.query_sql``.
    """
    out = Path(out)
    pages_dir = out.with_name(out.name + ".pages")
    pages_dir.mkdir(parents=True, exist_ok=True)
    if query_fn is None:
        from astroquery.sdss import SDSS
        query_fn = SDSS.query_sql
    pages = [Table.read(p) for p in sorted(pages_dir.glob("page_*.fits"))]
    have = sum(len(p) for p in pages)
    last = int(max(p["specObjID"].max() for p in pages)) if pages else 0
    if pages:
        logger.info("resuming the catalog query after %d saved rows (specObjID > %d)", have, last)
    from tqdm import tqdm
    bar = tqdm(total=n, initial=min(have, n), desc="catalog", unit="row")
    while have < n:
        sql = build_query(min(page_size, n - have), last, **cuts)
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
        last = int(page["specObjID"].max())
        bar.update(len(page))
    bar.close()
    if not pages:
        raise UserError("the catalog query returned no galaxies: check the cuts")
    table = vstack(pages)[:n]
    tmp = out.with_name(out.name + ".tmp")
    table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, out)
    return table


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
def download_spectra(catalog: Table, out: Path, downloader: Downloader, release: int = 17, base: str = SAS_URL) -> Report:
    tasks = [Task(str(int(r["specObjID"])), spec_url(r, release, base), spectrum_path(out, r["specObjID"]), valid_spectrum)
             for r in catalog]
    return downloader.run(tasks, Path(out) / "failures.csv", desc="spectra")


def download_jpegs(catalog: Table, out: Path, downloader: Downloader, release: int = 17,
                   base: str = SKYSERVER_URL) -> Report:
    tasks = [Task(str(int(r["specObjID"])), jpeg_url(float(r["ra"]), float(r["dec"]), release, base),
                  jpeg_path(out, r["specObjID"]), valid_jpeg) for r in catalog]
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
    for r in catalog:
        groups.setdefault(key(r), []).append(r)
    tasks = [Task(f"frame-{b}-{run:06d}-{camcol}-{fld:04d}", frame_url(run, rerun, camcol, fld, b, release, base),
                  frames_dir / f"frame-{b}-{run:06d}-{camcol}-{fld:04d}.fits.bz2", valid_frame)
             for (run, rerun, camcol, fld) in groups for b in "ugriz"]
    report = downloader.run(tasks, out / "frame_failures.csv", desc="ugriz frames")
    failures: dict[str, str] = {}
    for (run, rerun, camcol, fld), rows in groups.items():
        names = [frames_dir / f"frame-{b}-{run:06d}-{camcol}-{fld:04d}.fits.bz2" for b in "ugriz"]
        if not all(p.exists() for p in names):
            for r in rows:
                failures[str(int(r["specObjID"]))] = "a frame of its field could not be downloaded"
            continue
        images = []
        for p in names:
            with fits.open(p) as hdus:
                images.append((hdus[0].data.astype(np.float32), WCS(hdus[0].header)))
        for r in rows:
            dest = cutout_path(out, r["specObjID"])
            if dest.exists():
                continue
            position = SkyCoord(float(r["ra"]), float(r["dec"]), unit="deg")
            try:
                stack = np.stack([Cutout2D(data, position, IMAGE_SIZE, wcs=wcs, mode="partial", fill_value=0.0).data
                                  for data, wcs in images])
            except Exception as err:  # outside the frame
                failures[str(int(r["specObjID"]))] = f"cutout failed: {err}"
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
    cat.add_argument("--n", type=int, required=True)
    cat.add_argument("--out", required=True)
    for name in ("z-min", "z-max", "mag-max"):
        cat.add_argument(f"--{name}", type=float, default=None)
    for name in ("spectra", "images"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--catalog", required=True)
        p.add_argument("--out", required=True)
        if name == "images":
            p.add_argument("--ugriz", action="store_true", help="also 5-band cutouts from the corrected frames")
    every = sub.add_parser("all", parents=[common])
    every.add_argument("--n", type=int, required=True)
    every.add_argument("--root", default="data/sdss")
    every.add_argument("--ugriz", action="store_true")
    for name in ("z-min", "z-max", "mag-max"):
        every.add_argument(f"--{name}", type=float, default=None)
    args = parser.parse_args(argv)
    cuts = {k: getattr(args, k, None) for k in ("z_min", "z_max", "mag_max")}
    if args.command == "catalog":
        query_catalog(args.n, args.out, args.release, **cuts)
        return
    if args.command == "all":
        root = Path(args.root)
        catalog = query_catalog(args.n, root / "catalog.fits", args.release, **cuts)
        download_spectra(catalog, root / "spectra", _downloader(args), args.release, args.sas_url)
        download_jpegs(catalog, root / "images", _downloader(args), args.release, args.skyserver_url)
        if args.ugriz:
            download_ugriz(catalog, root / "ugriz", _downloader(args), args.release, args.sas_url)
        prepare(root / "catalog.fits", root / "spectra", root / "images", root / "dataset",
                ugriz_dir=root / "ugriz" if args.ugriz else None)
        return
    path = Path(args.catalog)
    if not path.is_file():
        raise UserError(f"catalog '{path}' does not exist (make it with: python -m utils.data.sdss catalog ...)")
    catalog = Table.read(path)
    if args.command == "spectra":
        download_spectra(catalog, Path(args.out), _downloader(args), args.release, args.sas_url)
    else:
        download_jpegs(catalog, Path(args.out), _downloader(args), args.release, args.skyserver_url)
        if args.ugriz:
            download_ugriz(catalog, Path(args.out) / "ugriz", _downloader(args), args.release, args.sas_url)


if __name__ == "__main__":
    from utils.errors import cli
    cli(main)
