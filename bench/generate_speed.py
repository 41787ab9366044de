"""Benchmark: the research code's way of generating spectra against this project's fast path.

    python bench/generate_speed.py [--galaxies 48] [--loop-galaxies 1] [--fast ddim:10,dpmpp2m:10] [--preset quick]

(a) research-code way: 250-step ancestral sampling, one sample per call in a Python loop, the
    image encoder recomputed at every step, fp32 (utils.generation.sequential_ddpm);
(b) fast path: context computed once per galaxy, all N samples of a batch of galaxies in one
    batch, the sampler and step count of the configuration (``--preset``, ``key=value``; or each
    of ``--fast``), bf16 on CUDA.
Same trained models (newest finished quick runs unless named), same galaxies, same N.

The loop of (a) is timed on ``--loop-galaxies`` galaxies (it is slow); its contrastive MSE is
measured on all ``--galaxies`` with the batched implementation of the same 250-step ancestral
sampler (given the same random draws it returns the same spectra:
tests/test_generate.py::test_sequential_ddpm_matches_batched_ddpm). Each fast path's contrastive
MSE is compared with it galaxy by galaxy (change and standard error of the change). Also reports
the share of training time the last generative run spent in validation. The paper-size
denoiser's step times are bench/paper_speed.py's.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from models.samplers import SAMPLERS
from utils.builders import clip_value
from utils.checkpoints import default_runs
from utils.config import load_config
from utils.data.survey import configured_dataset, load_survey, subset
from utils.eval.metrics import summarise_samples
from utils.generation import sample_for_images, score, sequential_ddpm
from utils.runtime import default_device
from utils.trained import build_models, find_models, load_trained


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_fast(spec: str, defaults: dict) -> list[dict]:
    """``sampler:steps,...`` -> settings; an empty spec gives the configuration's sampling settings."""
    if not spec:
        return [{"sampler": defaults["sampler"], "steps": defaults["steps"]}]
    out = []
    for item in spec.split(","):
        parts = item.split(":")
        if parts[0] not in SAMPLERS or len(parts) > 2:
            raise SystemExit(f"--fast: '{item}' is not sampler[:steps] with sampler {', '.join(SAMPLERS)}")
        out.append({"sampler": parts[0], "steps": int(parts[1]) if len(parts) > 1 else defaults["steps"]})
    return out


def paired_change(fast: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Relative change of the mean of ``fast`` against ``ref`` and its standard error, from the
    per-galaxy differences (the galaxies are shared, so their difficulty cancels)."""
    diff = fast - ref
    return float(diff.mean() / ref.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)) / ref.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generative", default=None, help="run folder or checkpoint (default: newest finished)")
    parser.add_argument("--contrastive", default=None, help="run folder or checkpoint (default: newest finished)")
    parser.add_argument("--galaxies", type=int, default=48, help="test galaxies for the quality comparison")
    parser.add_argument("--loop-galaxies", type=int, default=1, help="galaxies timed through the research loop")
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--fast", default="", help="fast-path settings 'sampler:steps,...' (default: the "
                        "configuration's sampling.sampler and sampling.steps)")
    parser.add_argument("--out", default="bench/results.json")
    args, rest = parser.parse_known_args()

    device = default_device()
    gen_cfg, _, _, _ = load_trained(args.generative, default_runs("generative"), "diffusion model", "generative")
    config = load_config("generative", rest + [f"data.{k}={v}" for k, v in gen_cfg["data"].items()
                                               if k in ("root", "image", "preprocessing", "downsample", "source")] +
                         ([f"sampling.generative_run={args.generative}"] if args.generative else []) +
                         ([f"sampling.contrastive_run={args.contrastive}"] if args.contrastive else []))
    settings = parse_fast(args.fast, config["sampling"])
    clip = clip_value(config["data"]["preprocessing"])
    pair = find_models(config)
    survey = load_survey(config["data"])
    d = config["data"]
    data = subset(configured_dataset(survey, "test", d), args.galaxies)
    pair = build_models(pair, data.n_pixels, data.n_channels, device)
    gen_cfg, gen_path = pair.gen_cfg, pair.gen_path
    model, contrastive, diffusion = pair.denoiser, pair.contrastive, pair.diffusion
    batch = next(data.iter_batches(len(data)))
    images, truth = batch["image"].to(device), batch["spectrum"][:, 0].numpy()
    top_k, batch_galaxies = config["sampling"]["top_k"], config["sampling"]["batch_galaxies"]
    fast_precision = "bf16" if device.type == "cuda" else "fp32"  # CPUs without bf16 units run it slower
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "galaxies": len(data), "n_samples": args.n,
               "spectrum_length": data.n_pixels, "prediction": diffusion.prediction,
               "diffusion_checkpoint": str(gen_path)}

    def quality(samples: torch.Tensor) -> dict:
        scores = score(contrastive, images, samples.to(device)).float().cpu().numpy()
        ev = summarise_samples(samples.cpu().numpy(), scores, truth, top_k)
        return {"per_galaxy": ev["mse_contrastive"], "mse_contrastive": float(ev["mse_contrastive"].mean()),
                "mse_mean": float(ev["mse_mean"].mean())}

    def batched(sampler: str, steps: int | None, precision: str) -> tuple[torch.Tensor, float]:
        g = torch.Generator().manual_seed(0)
        sample_for_images(model, diffusion, images[:2], 2, sampler, steps, precision=precision, clip=clip,
                          generator=g)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = torch.cat([sample_for_images(model, diffusion, images[i:i + batch_galaxies], args.n, sampler, steps,
                                           precision=precision, clip=clip, generator=g)
                         for i in range(0, len(images), batch_galaxies)])
        sync(device)
        return out, len(images) * args.n / (time.perf_counter() - start)

    # (a) the research code's way: timed on --loop-galaxies; its quality from the batched
    # implementation of the same 250-step ancestral sampler on all galaxies
    g = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for i in range(args.loop_galaxies):
        sequential_ddpm(model, diffusion, images[i], args.n, g)
    sync(device)
    loop_rate = args.loop_galaxies * args.n / (time.perf_counter() - start)
    print(f"research loop: {loop_rate:.3f} spectra/s", flush=True)
    reference, batched_rate = batched("ddpm", None, "fp32")
    ref = quality(reference)
    rows = [{"path": "research loop, encoder every step", "sampler": "ddpm", "steps": diffusion.num_timesteps,
             "precision": "fp32", "spectra_per_second": loop_rate, **ref},
            {"path": "batched, context once", "sampler": "ddpm", "steps": diffusion.num_timesteps,
             "precision": "fp32", "spectra_per_second": batched_rate, **ref}]
    print(f"batched DDPM: {batched_rate:.3f} spectra/s, contrastive MSE {ref['mse_contrastive']:.5f}", flush=True)

    # (b) fast paths
    for setting in settings:
        samples, rate = batched(setting["sampler"], setting["steps"], fast_precision)
        q = quality(samples)
        rows.append({"path": "fast path", **setting, "precision": fast_precision, "spectra_per_second": rate, **q})
        print(f"{setting}: {rate:.3f} spectra/s, contrastive MSE {q['mse_contrastive']:.5f}", flush=True)
    for row in rows:
        row["speedup"] = row["spectra_per_second"] / loop_rate
        row["mse_change"], row["mse_change_se"] = paired_change(row["per_galaxy"], ref["per_galaxy"])
        row["meets_target"] = bool(row["speedup"] >= 10 and row["mse_change"] <= 0.05)
        del row["per_galaxy"]
    results["rows"] = rows

    run_dir = gen_path.parent.parent
    if (run_dir / "metrics.json").exists():
        results["val_time_fraction"] = json.loads((run_dir / "metrics.json").read_text()).get("val_time_fraction")

    print(f"device: {results['device']} ({results['threads']} threads); {len(data)} test galaxies x {args.n} samples, "
          f"{data.n_pixels} pixels; {diffusion.prediction}-prediction model {gen_path}")
    print("| path | sampler | steps | precision | spectra/s | speed-up | contrastive MSE | change (+- s.e.) "
          "| mean MSE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['sampler']} | {r['steps']} | {r['precision']} | "
              f"{r['spectra_per_second']:.2f} | {r['speedup']:.1f}x | {r['mse_contrastive']:.5f} | "
              f"{100 * r['mse_change']:+.1f}% +- {100 * r['mse_change_se']:.1f}% | {r['mse_mean']:.5f} |")
    print("target (>= 10x the research loop, contrastive MSE at most 5% worse): " +
          ("met by " + ", ".join(f"{r['sampler']} {r['steps']}" for r in rows if r["meets_target"])
           if any(r["meets_target"] for r in rows) else "not met"))
    if results.get("val_time_fraction") is not None:
        print(f"validation share of training time in {run_dir.name}: {100 * results['val_time_fraction']:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
