"""Ablations: which levers move the generated spectra towards the science targets.

    python bench/ablate.py [--work runs/ablate] [--galaxies 300] [--only NAME,...] [--out FILE]

Each training below is the quick preset with one lever changed, trained at the quick preset's
iteration counts (1,172 contrastive and 1,778 diffusion iterations: what its 3 and 5.5 minutes
reach on an idle 2-core machine), so that a busy machine cannot change the comparison (the
model-size variant instead gets the same 5.5 minutes, on an idle machine); a
training that already finished under ``--work`` is reused. Each variant is then a generate.py
run on the same ``--galaxies`` galaxies of the **validation** split (never the test split: the
standard preset is chosen from this table), and the table shows, per variant, what
``utils.eval.report.targets`` judges: the mean of N's MSE and its paired difference from the kNN
image average of the same run, the samples' redshift sigma_NMAD against the photo-z, the rank
correlations, the BPT accuracy, the intervals' coverage, and the ranking's value (top-ranked,
top-5 mean and a random sample against the mean of all N). Every value carries its standard
error over galaxies.

MSEs are in preprocessed units: the 'log' variant's are on another scale (compare its paired
difference from kNN, which is computed in its own units, not its MSE).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: iteration budgets of the ablation trainings (the quick preset's time budgets on an idle machine)
ITERS = {"contrastive": 1172, "generative": 1778}

#: training name -> (contrastive overrides, or the name of the training whose contrastive run to
#: reuse, diffusion overrides); '{work}' is replaced by --work, '{contrastive}' by the contrastive run
TRAININGS = {
    "quick": ({}, {}),
    "ugriz": ({"data.image": "ugriz", "data.root": "{work}/mock_ugriz"},
              {"data.image": "ugriz", "data.root": "{work}/mock_ugriz"}),
    "log": ({"data.preprocessing": "log"}, {"data.preprocessing": "log"}),
    "cfg": ("quick", {"model.cond_drop": 0.1}),
    "w32": ("quick", {"model.width": 32, "train.max_minutes": 5.5, "train.max_iters": 0}),  # same time, not iterations
    "ugriz_init": ("ugriz", {"data.image": "ugriz", "data.root": "{work}/mock_ugriz",
                             "model.image_init": "{contrastive}"}),
    "standard_levers": ({"data.image": "ugriz", "data.root": "{work}/mock_ugriz", "data.preprocessing": "log"},
                        {"data.image": "ugriz", "data.root": "{work}/mock_ugriz", "data.preprocessing": "log",
                         "model.image_init": "{contrastive}"}),
}

#: variant -> (description, training, generate.py overrides)
VARIANTS = {
    "reference": ("quick preset: DDIM 10 steps", "quick", {}),
    "ddim25": ("DDIM 25 steps", "quick", {"sampling.steps": 25}),
    "ugriz": ("ugriz float images (ApJ 2024) instead of gri", "ugriz", {}),
    "log": ("log preprocessing (ApJ 2024) instead of min-max", "log", {}),
    "cfg1": ("10% null contexts in training, guidance 1", "cfg", {}),
    "cfg2": ("10% null contexts in training, guidance 2", "cfg", {"sampling.guidance": 2.0}),
    "w32": ("UNet width 32 instead of 16 (same 5.5 minutes)", "w32", {}),
    "ugriz_init": ("ugriz, image encoder started from the contrastive one", "ugriz_init", {}),
    "standard_levers": ("ugriz + log + image encoder started from the contrastive one", "standard_levers", {}),
}


def _args(overrides: dict, work: Path, contrastive: Path | None = None) -> list[str]:
    return [f"{k}={str(v).replace('{work}', str(work)).replace('{contrastive}', str(contrastive))}"
            for k, v in overrides.items()]


def _finished_run(folder: Path) -> Path | None:
    runs = sorted(p for p in folder.glob("*") if (p / "metrics.json").exists()) if folder.exists() else []
    return runs[-1] if runs else None


def _python(script: str, args: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=fh,
                               stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{script} failed (exit {code}); see {log}")


def train(name: str, work: Path, root: str) -> tuple[Path, Path, dict]:
    """The finished contrastive and diffusion runs of training ``name`` (trained when missing),
    and the data overrides generate.py needs to match them."""
    con, gen = TRAININGS[name]
    data = {"data.root": root, **{k: v for k, v in gen.items() if k.startswith("data.")}}
    runs = {}
    for kind, overrides in (("contrastive", con), ("generative", gen)):
        owner, overrides = (overrides, TRAININGS[overrides][0]) if isinstance(overrides, str) else (name, overrides)
        folder = work / owner / kind
        if _finished_run(folder) is None:
            args = ["--preset", "quick", f"run.out_dir={folder}", "train.max_minutes=0",
                    f"train.max_iters={ITERS[kind]}", *_args({**data, **overrides}, work, runs.get("contrastive"))]
            print(f"training {owner} {kind} ...", flush=True)
            _python(f"train_{kind}.py", args, work / f"{owner}.{kind}.log")
        runs[kind] = _finished_run(folder)
    return runs["contrastive"], runs["generative"], data


def evaluate(variant: str, work: Path, root: str, galaxies: int) -> dict:
    description, training, overrides = VARIANTS[variant]
    con, gen, data = train(training, work, root)
    out = work / "eval" / variant
    args = ["--preset", "quick", "sampling.split=val", f"sampling.max_objects={galaxies}", f"sampling.out_dir={out}",
            f"sampling.contrastive_run={con}", f"sampling.generative_run={gen}", "sampling.figures=2",
            *_args({**data, **overrides}, work)]
    start = time.perf_counter()
    _python("generate.py", args, work / f"eval.{variant}.log")
    metrics = json.loads((sorted(out.glob("*/metrics.json"))[-1]).read_text())
    train_minutes = {kind: json.loads((run / "metrics.json").read_text()).get("train_minutes")
                     for kind, run in (("contrastive", con), ("generative", gen))}
    return {"description": description, "training": training, "overrides": overrides, "contrastive_run": str(con),
            "generative_run": str(gen), "train_minutes": train_minutes, "eval_seconds": time.perf_counter() - start,
            "ranking": metrics.get("metrics", {}), "science": metrics["science"]}


def _pm(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def table(results: dict) -> str:
    """A markdown table of the variants (value ± standard error over the galaxies)."""
    head = ("| variant | MSE mean of N | minus kNN (paired) | z σ_NMAD (photo-z) | EW(Hα) corr | Dn4000 corr | "
            "BPT acc. (majority) | 68% / 90% pixels | 68% / 90% z | top-1 / top-5 / random / mean MSE | targets met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        p, s = r["science"]["predictors"], r["science"]
        gen, mean_n = p["samples"], p["mean_of_n"]
        rank = r["ranking"]
        met = sum(t["met"] is True for t in s.get("targets", []))
        lines.append(
            f"| {name}: {r['description']} | {_pm(mean_n.get('mse'))} | {_pm(mean_n.get('mse_minus_knn'))} | "
            f"{_pm(gen.get('z_sigma_nmad'))} ({p['photo_z']['z_sigma_nmad'][0]:.4f}) | "
            f"{_pm(gen.get('ew_halpha_corr'), 2)} | "
            f"{_pm(gen.get('dn4000_corr'), 2)} | {_pm(gen.get('bpt_accuracy'), 2)} ({s['bpt_majority_rate']:.2f}) | "
            f"{gen['coverage68_pixels'][0]:.2f} / {gen['coverage90_pixels'][0]:.2f} | "
            f"{gen['coverage68_z'][0]:.2f} / {gen['coverage90_z'][0]:.2f} | "
            f"{rank.get('mse_contrastive', float('nan')):.4f} / {rank.get('mse_contrastive_mean', float('nan')):.4f} / "
            f"{rank.get('mse_random_sample', float('nan')):.4f} / {rank.get('mse_mean', float('nan')):.4f} | "
            f"{met} / {len(s.get('targets', []))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/ablate", help="folder for the trainings and evaluations")
    ap.add_argument("--root", default="data/mock", help="the mock survey (generated there when missing)")
    ap.add_argument("--galaxies", type=int, default=300, help="validation galaxies per variant")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
    ap.add_argument("--out", default="bench/ablations_val.json")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: expected some of {', '.join(VARIANTS)}")
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        print(f"variant {name}: {VARIANTS[name][0]}", flush=True)
        results[name] = evaluate(name, work, str(Path(a.root).resolve()), a.galaxies)
        out.write_text(json.dumps(results, indent=1))  # after each variant: a long run can stop anywhere
    ordered = {k: results[k] for k in VARIANTS if k in results}
    print(table(ordered))


if __name__ == "__main__":
    main()
