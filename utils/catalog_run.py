"""generate.py on a catalogue of images without spectra, at survey scale: streamed in shards,
resumable, reproducible per galaxy, spread over the processes of a torchrun launch.

The catalogue's galaxies are cut into shards of ``sampling.shard_size`` in catalogue order. Each
shard is drawn, ranked and measured on its own (memory is bounded by the shard, not the
catalogue) and written atomically as ``shards/shard-NNNNNN.fits`` with FITS checksums: HDU
``CATALOGUE`` holds a row of measured properties per galaxy, HDU ``SPECTRA`` the mean spectrum,
the median with its 16-84% interval and the ``sampling.top_k`` best-ranked samples. A galaxy's
samples come from a generator seeded by the run seed and its id alone
(utils.generation.galaxy_generators), so they do not depend on the shard size, the batch size,
the order of the catalogue, a resumption or the number of processes. Process r of a world of W
takes the shards i with i mod W = r.

Rerunning the same command continues the newest unfinished output of the same plan (the same
catalogue, models and settings) under ``sampling.out_dir``; ``run.resume=<output folder>`` names
one. Shards that are missing or fail their checksums are (re)done; the others are kept. When
every shard is done, process 0 writes ``catalogue.fits`` (every shard's CATALOGUE rows, streamed,
never the whole catalogue in memory), a figure of it and ``metrics.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import ignite.distributed as idist
import numpy as np
from astropy.io import fits
from astropy.table import Table
from tqdm import tqdm

from utils.astro.photometry import fibre_diameters, photometry_features
from utils.astro.science import BPT_CLASSES, RedshiftFitter, redshift_weights
from utils.checkpoints import METRICS_FILE, claim_run_folder, new_stamped_folder, release_run_folder, write_json
from utils.config import flatten, save_config
from utils.data.dataset import SpectraDataset
from utils.data.survey import configured_dataset, subset
from utils.errors import UserError
from utils.eval.calibration import PIXELS, Calibration, uncalibrated
from utils.eval.export import FLUX_UNIT, galaxy_figures, write_per_galaxy
from utils.eval.metrics import median_and_interval, photometric_params, sample_properties, summarise_samples
from utils.eval.report import sample_columns
from utils.generation import SamplingPlan, check_plan, draw_batch, validation_calibration
from utils.trained import TrainedPair

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
PLAN_FILE = "plan.json"
CALIBRATION_FILE = "calibration.json"
CATALOGUE_FILE = "catalogue.fits"
#: what puts a galaxy's spectra on a flux scale, best first: code -> meaning (the FLUXCAL column)
FLUX_SCALES = {1: "catalogue fibre magnitudes r, i", 2: "fibre-circle r, i photometry of the 5-band cutout",
               3: "catalogue model magnitudes r, i (total light)", 0: "none: normalised spectrum"}
#: training galaxies whose inverse variances weight the redshift fit (as their median)
WEIGHT_GALAXIES = 1000
#: the settings that decide a shard's contents: a continued output must share them all
PLAN_KEYS = ("data.image", "data.preprocessing", "data.downsample", "run.seed", "run.precision", "sampling.n_samples",
             "sampling.sampler", "sampling.steps", "sampling.guidance", "sampling.top_k", "sampling.shard_size",
             "sampling.calibration_objects", "sampling.per_galaxy_fits")


# --------------------------------------------------------------------------------------------
# the plan, and the output folder it continues or starts
# --------------------------------------------------------------------------------------------
def file_identity(path: Path) -> str:
    """A checkpoint's identity for the plan: its resolved path, size and modification time."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def plan_of(config: dict, pair: TrainedPair, objid: np.ndarray) -> dict:
    """What the output of this run is made of: the catalogue (its ids), the two models and the
    settings of :data:`PLAN_KEYS`."""
    flat = flatten(config)
    return {"catalog": str(Path(config["sampling"]["catalog"]).resolve()), "n_galaxies": int(len(objid)),
            "objid_sha256": hashlib.sha256(np.ascontiguousarray(objid, dtype=np.int64).tobytes()).hexdigest(),
            "diffusion_checkpoint": file_identity(pair.gen_path),
            "contrastive_checkpoint": file_identity(pair.con_path),
            **{key: flat[key] for key in PLAN_KEYS}}


def plan_differences(saved: dict, plan: dict) -> list[str]:
    return [f"{k} ({saved.get(k)!r} there, {v!r} here)" for k, v in plan.items() if saved.get(k) != v]


def read_plan(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


def output_folder(config: dict, plan: dict) -> Path:
    """The output folder to write into: ``run.resume`` (its plan must be this one), else the
    newest unfinished output of this plan under ``sampling.out_dir``, else a new one."""
    resume, out_dir = config["run"]["resume"], Path(config["sampling"]["out_dir"])
    if resume:
        folder = Path(resume)
        saved = read_plan(folder)
        if saved is None:
            raise UserError(f"run.resume '{folder}' is not a catalogue output of generate.py (no readable {PLAN_FILE})")
        differ = plan_differences(saved, plan)
        if differ:
            raise UserError(f"run.resume '{folder}' was made with another plan: {'; '.join(differ)}; rerun with its "
                            f"settings or start a new output")
        return folder
    candidates = sorted((p for p in out_dir.glob("*") if (p / PLAN_FILE).is_file()
                         and not (p / CATALOGUE_FILE).exists()), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        if read_plan(folder) == plan:
            logger.info("continuing the unfinished output %s (the same catalogue, models and settings)", folder)
            return folder
    folder = new_stamped_folder(out_dir, "sampling.out_dir")
    write_json(folder / PLAN_FILE, plan)
    return folder


def shared_folder(config: dict, plan: dict) -> Path:
    """:func:`output_folder` chosen by process 0, claimed (one writer per folder) and told to the
    others."""
    message = ""
    if idist.get_rank() == 0:
        folder = output_folder(config, plan)
        claim_run_folder(folder)
        (folder / SHARD_DIR).mkdir(exist_ok=True)
        (folder / "figures").mkdir(exist_ok=True)
        save_config(config, folder / "config.yml")
        for stale in (folder / SHARD_DIR).glob(".*.tmp"):  # a write a kill cut short
            stale.unlink()
        message = str(folder)
    if idist.get_world_size() > 1:
        message = idist.broadcast(message, src=0, safe_mode=True)
    return Path(message)


# --------------------------------------------------------------------------------------------
# one shard
# --------------------------------------------------------------------------------------------
def shard_path(folder: Path, index: int) -> Path:
    return folder / SHARD_DIR / f"shard-{index:06d}.fits"


def shard_ids_digest(objid: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(objid, dtype=np.int64).tobytes()).hexdigest()[:32]


def shard_is_done(path: Path, index: int, objid: np.ndarray) -> bool:
    """Whether ``path`` is a complete shard ``index`` of the galaxies ``objid``: readable, every
    HDU's checksum right, and the header's shard, row count and id digest as planned."""
    if not path.is_file():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's checksum warnings: the one line below says it
            with fits.open(path, checksum=True) as hdus:
                header = hdus[0].header
                complete = (header.get("SHARD") == index and header.get("NROWS") == len(objid)
                            and header.get("IDDIGEST") == shard_ids_digest(objid)
                            and all(h.verify_checksum() == 1 and h.verify_datasum() == 1 for h in hdus[1:])
                            and len(hdus["CATALOGUE"].data) == len(objid))
    except Exception:  # a truncated or damaged file
        complete = False
    if not complete:
        logger.warning("shard %s is damaged or incomplete: it is done again", path)
    return complete


def flux_scales(dataset: SpectraDataset, ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per galaxy the preprocessing parameters ``(G, 2)`` that put its samples on a flux scale,
    from the first source of :data:`FLUX_SCALES` it has, and that source's code ``(G,)``."""
    cat = dataset.survey.catalog[dataset.rows]
    g = len(dataset)
    mags = {}
    for code, prefix in ((1, "fibermag_"), (3, "mag_")):
        if f"{prefix}r" in cat.colnames and f"{prefix}i" in cat.colnames:
            mags[code] = np.stack([np.ma.filled(np.ma.asarray(cat[f"{prefix}{b}"], dtype=np.float64), np.nan)
                                   for b in "ri"], 1)
    if "ugriz" in dataset.survey.images:
        fibre = photometry_features(dataset.survey.images["ugriz"][dataset.rows],
                                    fibre_diameters(cat, dataset.survey.meta))[:, 5:]
        mags[2] = np.stack([fibre[:, 4], fibre[:, 4] - fibre[:, 2]], 1)  # r, and i = r - (r - i)
    neutral = [1.0, 0.0] if dataset.preprocessing == "log" else [0.0, 1.0]  # exp(x); (x + 1) / 2 in [0, 1]
    params, codes = np.tile(neutral, (g, 1)).astype(np.float64), np.zeros(g, dtype=np.int16)
    for code in (1, 2, 3):
        if code not in mags:
            continue
        todo = (codes == 0) & np.isfinite(mags[code]).all(1)
        if todo.any():
            params[todo] = photometric_params(ranked[todo, 0], dataset.wave, mags[code][todo, 0], mags[code][todo, 1],
                                              dataset.preprocessing)
            codes[todo] = code
    return params, codes


@dataclass
class Shard:
    """A shard's galaxies and what it is written with."""

    index: int
    dataset: SpectraDataset  # its galaxies
    objid: np.ndarray


def predict_shard(shard: Shard, pair: TrainedPair, plan: SamplingPlan, seed: int, top_k: int, fitter: RedshiftFitter,
                  calibration: Calibration, bar) -> tuple[Table, Table, dict]:
    """Draw, rank and measure one shard: its CATALOGUE and SPECTRA tables and, for figures and
    per-galaxy files, the ranked samples."""
    ds = shard.dataset
    ids = np.asarray(ds.survey.catalog["objid"], dtype=np.int64)  # by survey row, as batches carry them
    samples, scores = [], []
    for batch in ds.iter_batches(plan.batch_galaxies):
        drawn = draw_batch(pair, batch, ids[batch["index"].numpy()], plan, seed)
        samples.append(drawn.samples.cpu().numpy())
        scores.append(drawn.scores.float().cpu().numpy())
        bar.update(len(drawn.samples))
    results = summarise_samples(np.concatenate(samples), np.concatenate(scores), None, top_k)
    params, codes = flux_scales(ds, results["ranked"])
    flux = ds.deprocess(results["ranked"], params[:, None])
    props = sample_properties(flux, ds.wave, fitter)
    columns = sample_columns(props, calibration)
    cat = ds.survey.catalog[ds.rows]
    table = Table({"objid": shard.objid, "ra": np.asarray(cat["ra"], np.float64),
                   "dec": np.asarray(cat["dec"], np.float64), "z_catalog": ds.z.astype(np.float32)})
    for name, values in columns.items():
        table[name] = np.asarray(values, dtype=np.int16 if name == "bpt_gen" else np.float32)
    counts = np.stack([(props["bpt"] == c).mean(1) for c in range(len(BPT_CLASSES))], 1)
    for c, name in enumerate(BPT_CLASSES):
        table[f"bpt_frac_{name.lower().replace('-', '_')}"] = counts[:, c].astype(np.float32)
    table["score_best"] = results["ranked_scores"][:, 0].astype(np.float32)
    table["fluxcal"] = codes
    table["shard"] = np.full(len(ds), shard.index, dtype=np.int32)
    table["shard_row"] = np.arange(len(ds), dtype=np.int32)
    med, lo, hi = median_and_interval(results["ranked"], 0.68, calibration.factor(PIXELS, 0.68))
    spectra = Table({"objid": shard.objid, "mean": ds.deprocess(results["mean"], params),
                     "median": ds.deprocess(med, params), "lo": ds.deprocess(lo, params),
                     "hi": ds.deprocess(hi, params),
                     "best": flux[:, :top_k].astype(np.float32),
                     "best_scores": results["ranked_scores"][:, :top_k].astype(np.float32)})
    for name in ("mean", "median", "lo", "hi", "best"):
        spectra[name] = np.asarray(spectra[name], np.float32)
    return table, spectra, {"results": results, "flux": {"ranked": flux, "mean": spectra["mean"],
                                                          "topk_mean": ds.deprocess(results["topk_mean"], params)},
                            "columns": columns, "codes": codes}


def write_shard(path: Path, shard: Shard, table: Table, spectra: Table, calibration: Calibration) -> None:
    """The shard's tables as one FITS file with checksums, written under a temporary name and then
    renamed: a kill leaves the previous state (no file), never half a shard."""
    header = fits.Header()
    header["SHARD"] = (shard.index, "shard index in the catalogue")
    header["NROWS"] = (len(table), "galaxies in this shard")
    header["IDDIGEST"] = (shard_ids_digest(shard.objid), "sha256 of the int64 objids")
    header["FLUXUNIT"] = (FLUX_UNIT, "where FLUXCAL > 0, else normalised")
    for code, meaning in FLUX_SCALES.items():
        header[f"FLUXCAL{code}"] = meaning
    if calibration.n_galaxies:
        header["CALIBN"] = (calibration.n_galaxies, "validation galaxies of the calibration")
    cat_hdu, spec_hdu = fits.table_to_hdu(table), fits.table_to_hdu(spectra)
    cat_hdu.name, spec_hdu.name = "CATALOGUE", "SPECTRA"
    spec_hdu.header["COMMENT"] = ("flux 1e-17 erg/s/cm2/A where FLUXCAL > 0 (CATALOGUE), else normalised; lo/hi: "
                                  "the 16-84% interval of the samples")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fits.HDUList([fits.PrimaryHDU(header=header), cat_hdu, spec_hdu,
                  fits.ImageHDU(shard.dataset.wave.astype(np.float64), name="WAVELENGTH")]).writeto(tmp, checksum=True)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the whole catalogue
# --------------------------------------------------------------------------------------------
def merge_catalogue(paths: list[Path], out: Path) -> int:
    """Stream the CATALOGUE rows of every shard (same columns) into one FITS table ``out``
    (written under a temporary name, then renamed), never holding more than one shard's rows;
    returns the row count."""
    with fits.open(paths[0]) as first:
        header = first["CATALOGUE"].header.copy()
    columns = [(header[f"TTYPE{i}"], header[f"TFORM{i}"]) for i in range(1, header["TFIELDS"] + 1)]
    total = 0
    for path in paths:
        with fits.open(path) as hdus:
            h = hdus["CATALOGUE"].header
            if [(h[f"TTYPE{i}"], h[f"TFORM{i}"]) for i in range(1, h["TFIELDS"] + 1)] != columns:
                raise UserError(f"shard {path} has other catalogue columns than {paths[0]}")
            total += h["NAXIS2"]
    for key in ("CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    header["NAXIS2"] = total
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    stream = fits.StreamingHDU(tmp, header)
    for path in paths:
        with fits.open(path) as hdus:
            info = hdus.fileinfo(1)
            size = hdus[1].header["NAXIS1"] * hdus[1].header["NAXIS2"]
        with open(path, "rb") as handle:
            handle.seek(info["datLoc"])
            stream.write(np.frombuffer(handle.read(size), dtype=np.uint8))
    stream.close()
    with fits.open(tmp, mode="update") as hdus:  # the name TOPCAT shows, and what the codes mean
        hdus[1].name = "CATALOGUE"
        hdus[1].header["BPTCODES"] = ", ".join(f"{i} {name}" for i, name in enumerate(BPT_CLASSES))
        for code, meaning in FLUX_SCALES.items():
            hdus[1].header[f"FLUXCAL{code}"] = meaning
    os.replace(tmp, out)
    return total


def catalogue_figure(path: Path, out: Path) -> Path | None:
    """What the catalogue holds, at a glance: the samples' redshifts against the catalogue's where
    it has them (else their distribution), and Dn4000 against EW(H-alpha) by BPT class."""
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

    from utils.plotting import BPT_COLOURS, save

    cat = Table.read(path)
    if not len(cat):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4))
    zc, zg = np.asarray(cat["z_catalog"], float), np.asarray(cat["z_gen"], float)
    err = np.abs(np.stack([zg - np.asarray(cat["z_gen_lo"]), np.asarray(cat["z_gen_hi"]) - zg]))
    if np.isfinite(zc).sum() > 2:
        axes[0].errorbar(zc, zg, yerr=np.nan_to_num(err), fmt="o", ms=2, lw=0.4, alpha=0.5)
        lim = [np.nanmin(zc), np.nanmax(zc)]
        axes[0].plot(lim, lim, "k--", lw=0.8)
        axes[0].set(xlabel="catalogue redshift", ylabel="generated redshift (median, 16-84%)")
    else:
        axes[0].hist(zg[np.isfinite(zg)], bins=40)
        axes[0].set(xlabel="generated redshift (median of the samples)", ylabel="galaxies")
    codes = np.asarray(cat["bpt_gen"])
    for code, (name, colour) in enumerate(zip(BPT_CLASSES, BPT_COLOURS)):
        pick = codes == code
        axes[1].plot(np.asarray(cat["ew_halpha_gen"])[pick], np.asarray(cat["dn4000_gen"])[pick], ".", ms=3,
                     color=colour, label=f"{name} ({int(pick.sum())})")
    axes[1].set(xscale="symlog", xlabel=r"EW(H$\alpha$) [$\mathrm{\AA}$], median of the samples",
                ylabel="Dn4000, median of the samples")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{len(cat)} galaxies of {path.parent.name}: properties of their generated spectra")
    return save(fig, out)


def training_weights(survey, data: dict) -> np.ndarray:
    """The redshift fit's pixel weights: the median inverse variance of up to
    :data:`WEIGHT_GALAXIES` training galaxies (utils.astro.science.redshift_weights)."""
    train = subset(configured_dataset(survey, "train", data), WEIGHT_GALAXIES, seed=0)
    return redshift_weights(train.all_flux()[1])


def shared_calibration(folder: Path, pair: TrainedPair, survey, config: dict, plan: SamplingPlan,
                       weights: np.ndarray) -> Calibration:
    """The interval calibration of ``sampling.calibration_objects`` validation galaxies (none for
    0): fitted once by process 0 into the output folder, read back by the others and by a resumed
    run."""
    n = config["sampling"]["calibration_objects"]
    if not n:
        return uncalibrated()
    path = folder / CALIBRATION_FILE
    if idist.get_rank() == 0 and not path.is_file():
        calibration = validation_calibration(pair, survey, config["data"], plan, n, config["run"]["seed"], weights)
        write_json(path, calibration.to_dict())
    if idist.get_world_size() > 1:
        idist.barrier()
    return Calibration.from_dict(json.loads(path.read_text()))


def run(config: dict, pair: TrainedPair, survey, dataset: SpectraDataset) -> Path:
    """Predict for every galaxy of ``dataset`` (a catalog of images only, utils.generation.catalog_set)
    into a catalogue output; returns its folder."""
    s = config["sampling"]
    rank, world = idist.get_rank(), idist.get_world_size()
    objid = np.asarray(dataset.survey.catalog["objid"], dtype=np.int64)[dataset.rows]
    plan = SamplingPlan.from_config(config)
    check_plan(pair, plan)
    folder = shared_folder(config, plan_of(config, pair, objid))
    weights = training_weights(survey, config["data"])
    calibration = shared_calibration(folder, pair, survey, config, plan, weights)
    fitter = RedshiftFitter(dataset.wave, weights=weights)
    size = s["shard_size"]
    shards = [Shard(i, dataset.like(dataset.rows[start:start + size]), objid[start:start + size])
              for i, start in enumerate(range(0, len(dataset), size))]
    mine = [sh for sh in shards if sh.index % world == rank]
    todo = [sh for sh in mine if not shard_is_done(shard_path(folder, sh.index), sh.index, sh.objid)]
    done = sum(len(sh.objid) for sh in mine) - sum(len(sh.objid) for sh in todo)
    logger.info("%d galaxies in %d shards -> %s; this process: %d shards to do, %d galaxies already done",
                len(dataset), len(shards), folder, len(todo), done)
    start = time.perf_counter()
    with tqdm(total=sum(len(sh.objid) for sh in mine), initial=done, desc="predict", unit="gal",
              disable=rank != 0) as bar:
        for shard in todo:
            table, spectra, extras = predict_shard(shard, pair, plan, config["run"]["seed"], s["top_k"], fitter,
                                                   calibration, bar)
            write_shard(shard_path(folder, shard.index), shard, table, spectra, calibration)
            if s["per_galaxy_fits"]:
                (folder / "galaxies").mkdir(exist_ok=True)
                write_per_galaxy(folder / "galaxies", shard.dataset, extras["results"], extras["flux"], False,
                                 extras["columns"], calibration if calibration.n_galaxies else None)
            if shard.index == 0 and s["figures"]:
                galaxy_figures(folder / "figures", shard.dataset, extras["results"], None, s["figures"], s["top_k"])
            dataset.survey.remap()  # memory stays that of one shard, whatever the catalogue's size
    seconds = time.perf_counter() - start
    if world > 1:
        idist.barrier()
    if rank == 0:
        finish(folder, shards, pair, seconds, todo, config)
    return folder


def finish(folder: Path, shards: list[Shard], pair: TrainedPair, seconds: float, done_here: list[Shard],
           config: dict) -> None:
    """Process 0, once every shard is there: the merged catalogue, its figure, metrics.json (with
    the pace of process 0 over ``done_here``, the shards it made in this run)."""
    paths = [shard_path(folder, sh.index) for sh in shards]
    missing = [p for p, sh in zip(paths, shards) if not shard_is_done(p, sh.index, sh.objid)]
    if missing:
        raise UserError(f"{len(missing)} shards of {folder} are missing (first {missing[0]}): a process did not "
                        f"finish; rerun the same command to do them")
    n = merge_catalogue(paths, folder / CATALOGUE_FILE)
    catalogue_figure(folder / CATALOGUE_FILE, folder / "figures" / "catalogue.png")
    with fits.open(folder / CATALOGUE_FILE) as hdus:
        codes = np.bincount(np.asarray(hdus[1].data["fluxcal"]), minlength=len(FLUX_SCALES))
    disk = sum(p.stat().st_size for p in paths) + (folder / CATALOGUE_FILE).stat().st_size
    summary = {"n_galaxies": n, "n_shards": len(shards), "shard_size": config["sampling"]["shard_size"],
               "world_size": idist.get_world_size(), "seconds_this_run": seconds, "shards_this_run": len(done_here),
               "galaxies_per_second_this_run": (sum(len(sh.objid) for sh in done_here) / seconds
                                                if seconds and done_here else None),
               "bytes_per_galaxy": disk / max(n, 1),
               "flux_scale": {FLUX_SCALES[c]: int(codes[c]) for c in FLUX_SCALES},
               "diffusion_checkpoint": str(pair.gen_path), "contrastive_checkpoint": str(pair.con_path)}
    write_json(folder / METRICS_FILE, summary)
    release_run_folder(folder)
    logger.info("catalogue of %d galaxies: %s (%.1f kB per galaxy on disk with its spectra)", n,
                folder / CATALOGUE_FILE, summary["bytes_per_galaxy"] / 1e3)
