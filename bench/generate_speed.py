"""Benchmark: the research code's way of generating spectra against this project's fast path.

    python bench/generate_speed.py [--galaxies 40] [--loop-galaxies 1] [--skip-paper-step]

(a) research-code way: 250-step ancestral sampling, one sample per call in a Python loop, the
    image encoder recomputed at every step, fp32;
(b) fast path: context computed once per galaxy, all N samples of a batch of galaxies in one
    batch, the default sampler and step count of params_generative.yml, bf16 on CUDA.
Same trained models (newest finished quick runs unless named), same galaxies, same N.

The loop of (a) is timed on ``--loop-galaxies`` galaxies (it is slow); its contrastive MSE is
measured on all ``--galaxies`` with the batched implementation of the same 250-step ancestral
sampler, which draws from the identical distribution. Also times one training step of the
paper-size denoiser (SPEC 7: batch 16, 3598 pixels) in fp32 and bf16, and reports the share of
training time the last generative run spent in validation.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import PARAMS, build_models, find_models, load_trained, score  # noqa: E402
from models.unet import ConditionalUNet1D  # noqa: E402
from train_generative import sample_for_images  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.dataset import SpectraDataset  # noqa: E402
from utils.evaluation import evaluate  # noqa: E402
from utils.training import load_survey, subset  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def research_loop(model, diffusion, image: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """One galaxy, one sample at a time, every step re-encoding the image (fp32)."""
    out = []
    for _ in range(n):
        x = torch.randn((1, 1, model.length), generator=generator).to(image.device)
        for i in range(diffusion.num_timesteps - 1, -1, -1):
            t = torch.full((1,), i, device=image.device, dtype=torch.long)
            output = model(x, t, context=model.encode(image[None]))  # encoder at every step
            x0 = diffusion.split_output(x, t, output)[0].clamp(-1, 1)
            mean, _, log_var = diffusion.q_posterior(x0, x, t)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)
        out.append(x[0, 0])
    return torch.stack(out)


def paper_step(device: torch.device, precision: str, repeats: int) -> float:
    """Seconds per training step of the paper-size denoiser (batch 16, 3598 pixels)."""
    model = ConditionalUNet1D(3598).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(16, 1, 3598, device=device)
    images = torch.randn(16, 3, 64, 64, device=device)
    times = []
    for _ in range(repeats + 1):
        t = torch.randint(0, 250, (16,), device=device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x, t, images=images).float() - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generative", default=None)
    parser.add_argument("--contrastive", default=None)
    parser.add_argument("--galaxies", type=int, default=40)
    parser.add_argument("--loop-galaxies", type=int, default=1)
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--sampler", default=None, help="fast-path sampler (default: params_generative.yml)")
    parser.add_argument("--steps", type=int, default=None, help="fast-path steps (default: params_generative.yml)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta of the fast path")
    parser.add_argument("--skip-paper-step", action="store_true")
    parser.add_argument("--paper-repeats", type=int, default=3)
    parser.add_argument("--paper-precisions", default=None,
                        help="comma-separated; default fp32,bf16 on CUDA and fp32 on a CPU, where bf16 without "
                             "hardware support did not finish one paper-size step in 6 minutes")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen_cfg, _, _ = load_trained(args.generative, Path("runs/generative"), "diffusion model", "ema_model")
    config = load_config(PARAMS, [f"data.{k}={v}" for k, v in gen_cfg["data"].items()
                                  if k in ("root", "image", "preprocessing", "downsample", "source")] +
                         ([f"sampling.generative_run={args.generative}"] if args.generative else []) +
                         ([f"sampling.contrastive_run={args.contrastive}"] if args.contrastive else []))
    pair = find_models(config)
    survey = load_survey(config)
    d = config["data"]
    data = subset(SpectraDataset(survey, "test", d["image"], d["preprocessing"], d["downsample"]), args.galaxies)
    pair = build_models(pair, data.n_pixels, data.n_channels, device)
    gen_cfg, gen_path = pair.gen_cfg, pair.gen_path
    model, contrastive, diffusion = pair.denoiser, pair.contrastive, pair.diffusion
    batch = next(data.iter_batches(len(data)))
    images, truth = batch["image"].to(device), batch["spectrum"][:, 0].numpy()
    s = config["sampling"]
    s.update({k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("eta", args.eta)) if v is not None})
    fast_precision = "bf16" if device.type == "cuda" else "fp32"  # CPUs without bf16 units run it slower
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "galaxies": len(data), "n_samples": args.n,
               "spectrum_length": data.n_pixels, "diffusion_checkpoint": str(gen_path)}

    def contrastive_mse(samples: torch.Tensor) -> tuple[float, float]:
        scores = score(contrastive, images, samples.to(device)).float().cpu().numpy()
        ev = evaluate(samples.cpu().numpy(), scores, truth, s["top_k"])
        return float(ev["mse_contrastive"].mean()), float(ev["mse_mean"].mean())

    # (a) the research code's way
    g = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for i in range(args.loop_galaxies):
        research_loop(model, diffusion, images[i], args.n, g)
    sync(device)
    loop_rate = args.loop_galaxies * args.n / (time.perf_counter() - start)
    cfg32 = {**gen_cfg, "run": {**gen_cfg["run"], "precision": "fp32"}}
    ref = torch.cat([sample_for_images(model, diffusion, images[i:i + 8], args.n, "ddpm", None, cfg32, g)
                     for i in range(0, len(images), 8)])
    results["research"] = {"spectra_per_second": loop_rate, "sampler": "ddpm", "steps": diffusion.num_timesteps,
                           "precision": "fp32"}
    results["research"]["mse_contrastive"], results["research"]["mse_mean"] = contrastive_mse(ref)
    print(f"research path: {loop_rate:.3f} spectra/s", flush=True)

    # (b) the fast path
    cfg_fast = {**gen_cfg, "run": {**gen_cfg["run"], "precision": fast_precision}}
    g = torch.Generator().manual_seed(0)
    sample_for_images(model, diffusion, images[:2], 2, s["sampler"], s["steps"], cfg_fast, g)  # warm-up
    sync(device)
    start = time.perf_counter()
    fast = torch.cat([sample_for_images(model, diffusion, images[i:i + s["batch_galaxies"]], args.n, s["sampler"],
                                        s["steps"], cfg_fast, g, eta=s["eta"])
                      for i in range(0, len(images), s["batch_galaxies"])])
    sync(device)
    fast_rate = len(images) * args.n / (time.perf_counter() - start)
    results["fast"] = {"spectra_per_second": fast_rate, "sampler": s["sampler"], "steps": s["steps"],
                       "precision": fast_precision}
    results["fast"]["mse_contrastive"], results["fast"]["mse_mean"] = contrastive_mse(fast)
    results["speedup"] = fast_rate / loop_rate
    results["mse_change"] = results["fast"]["mse_contrastive"] / results["research"]["mse_contrastive"] - 1
    print(f"fast path: {fast_rate:.3f} spectra/s", flush=True)

    if not args.skip_paper_step:
        results["paper_step_seconds"] = {}
        precisions = args.paper_precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")
        for precision in precisions.split(","):
            results["paper_step_seconds"][precision] = paper_step(device, precision, args.paper_repeats)
            print(f"paper-size step {precision}: {results['paper_step_seconds'][precision]:.3f} s", flush=True)
    run_dir = gen_path.parent.parent
    if (run_dir / "metrics.json").exists():
        results["val_time_fraction"] = json.loads((run_dir / "metrics.json").read_text()).get("val_time_fraction")

    print(f"device: {results['device']} ({results['threads']} threads); {len(data)} galaxies x {args.n} samples, "
          f"{data.n_pixels} pixels")
    print("| path | sampler | steps | precision | spectra/s | contrastive MSE | mean MSE |")
    print("|---|---|---|---|---|---|---|")
    for name in ("research", "fast"):
        r = results[name]
        print(f"| {name} | {r['sampler']} | {r['steps']} | {r['precision']} | {r['spectra_per_second']:.2f} | "
              f"{r['mse_contrastive']:.5f} | {r['mse_mean']:.5f} |")
    print(f"speed-up {results['speedup']:.1f}x; contrastive MSE change {100 * results['mse_change']:+.1f}%")
    if "paper_step_seconds" in results:
        print("paper-size denoiser training step (batch 16, 3598 px): " +
              ", ".join(f"{k} {v:.3f} s" for k, v in results["paper_step_seconds"].items()))
    if results.get("val_time_fraction") is not None:
        print(f"validation share of training time in {run_dir.name}: {100 * results['val_time_fraction']:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
