"""Benchmark: the paper-size denoiser (SPEC 3) the research code's way against this project's way.

    python bench/paper_speed.py [--rounds 3] [--repeats 2] [--precisions fp32,bf16] [--what train,denoise]
                                [--compile] [--profile] [--galaxies 0] [--batch-galaxies 1]
                                [--out bench/paper_speed.json]

Both ways build the same published layout (23.66M-parameter denoiser + ResNet-18 condition
encoder, 3,598 pixels) from the generative configuration's defaults and differ only in how they run it:

training step, batch 16 (Adam, per-step Polyak average of all weights):
  research  einsum attention that materialises the attention matrix, gradient checkpointing inside
            every transformer block, the Polyak average as a Python loop over the parameters;
  ours      ``F.scaled_dot_product_attention``, no recomputation, the Polyak average of
            train_generative.py (Ignite's EMAHandler attached to an Ignite Engine).
one denoising step for the 25 samples of one galaxy:
  research  25 forward passes at batch 1, each re-encoding the image (SPEC 6);
  ours      one forward pass at batch 25 with the image context computed once.

Each way is timed with the system allocator and after ``utils.runtime.keep_freed_memory`` (which
the entry scripts call), every configuration in a fresh process, ``--rounds`` rounds interleaved
so that the machine's drift (10% here) falls on all alike; medians and minima are reported.
With ``--compile`` the project's way is also timed under ``torch.compile`` (compile time
reported apart); ``--precisions`` adds bf16 autocast (useful on GPUs and CPUs with bf16 units).
``--galaxies G`` times the whole generation of G galaxies x 25 samples with the paper's sampler
(batched DDPM, 250 steps) and the contrastive ranking, extrapolated from a few steps;
``--batch-galaxies B`` lets the project's way denoise B galaxies x 25 samples per forward pass
(what fills a GPU; generate.py's ``sampling.batch_galaxies``), times still per galaxy.
``--profile`` prints torch.profiler's operator table for the project's training step.
Results go to ``--out`` as JSON together with the machine's description.
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
from torch.utils.checkpoint import checkpoint

from models.unet import Attention, TransformerBlock
from utils.builders import build_generative_model
from utils.config import load_config
from utils.runtime import default_device, keep_freed_memory

LENGTH, TRAIN_BATCH, N_SAMPLES, TIMESTEPS = 3598, 16, 25, 250


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def einsum_attention(self: Attention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The research code's attention: explicit (B*heads, N, M) similarity matrix through einsum."""
    b, n, d = x.shape
    if self.self_attention:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
    else:
        q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
    h = self.heads
    split = lambda a: a.reshape(b, a.shape[1], h, d // h).permute(0, 2, 1, 3).reshape(b * h, a.shape[1], d // h)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * (d // h) ** -0.5
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
    return self.out(out.reshape(b, h, n, d // h).permute(0, 2, 1, 3).reshape(b, n, d))


class ResearchWay:
    """Patches the shared model classes to run the research code's way while active."""

    def __enter__(self):
        self.attention, self.block = Attention.forward, TransformerBlock.forward
        plain_block = TransformerBlock.forward
        Attention.forward = einsum_attention
        TransformerBlock.forward = lambda blk, x, context=None: checkpoint(plain_block, blk, x, context,
                                                                          use_reentrant=False)
        return self

    def __exit__(self, *exc):
        Attention.forward, TransformerBlock.forward = self.attention, self.block


def paper_model(device: torch.device) -> torch.nn.Module:
    return build_generative_model(load_config("generative", [])["model"], LENGTH, 3).to(device)


def polyak_loop(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.copy_(decay * e + (1 - decay) * p)


def time_training(device: torch.device, way: str, precision: str, repeats: int, compile_: bool = False,
                  profile: bool = False) -> dict:
    """Median seconds per training step (batch 16) after one warm-up step."""
    import copy

    from ignite.engine import Engine, Events

    from utils.builders import build_diffusion
    from utils.training import attach_ema

    torch.manual_seed(0)
    model = paper_model(device)
    diffusion = build_diffusion(load_config("generative", [])["diffusion"])
    opt = torch.optim.Adam(model.parameters(), 1e-4, fused=device.type == "cuda" or None)
    forward = torch.compile(model) if compile_ else model
    x0 = torch.rand(TRAIN_BATCH, 1, LENGTH, device=device) * 2 - 1
    images = torch.randn(TRAIN_BATCH, 3, 64, 64, device=device)
    times: list[float] = []

    def step(engine=None, _batch=None) -> None:
        sync(device)
        start = time.perf_counter()
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_loss(forward, x0, images=images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if way == "research":
            polyak_loop(ema_model, model, 0.99)
            sync(device)
            times.append(time.perf_counter() - start)
        else:
            engine.state.step_start = start

    if way == "research":
        ema_model = copy.deepcopy(model)
        with ResearchWay():
            for _ in range(repeats + 1):
                step()
    else:
        trainer = Engine(step)
        attach_ema(trainer, model, 0.99)  # train_generative.py's Polyak average, paper decay

        @trainer.on(Events.ITERATION_COMPLETED)
        def _stop_clock(engine):  # attached after the EMA handler: the average is inside the time
            sync(device)
            times.append(time.perf_counter() - engine.state.step_start)

        if profile:
            trainer.run([0], max_epochs=1)
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.run([0], max_epochs=1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            times.clear()
        trainer.run([0] * (repeats + 1), max_epochs=1)
    return {"seconds": float(np.median(times[1:])), "first_seconds": times[0], "all": times}


@torch.no_grad()
def time_denoising(device: torch.device, way: str, precision: str, repeats: int, compile_: bool = False,
                   galaxies: int = 1) -> dict:
    """Median seconds for one denoising step of the 25 samples of one galaxy; the project's way
    batches ``galaxies`` galaxies into one forward pass and reports the time per galaxy."""
    torch.manual_seed(0)
    model = paper_model(device).eval()
    image = torch.randn(1, 3, 64, 64, device=device)
    times = []
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if way == "research":
        x = torch.randn(1, 1, LENGTH, device=device)
        t = torch.full((1,), 100, device=device)
        with ResearchWay():
            for _ in range(repeats + 1):
                sync(device)
                start = time.perf_counter()
                for _sample in range(N_SAMPLES):
                    with torch.autocast(**amp):
                        model(x, t, context=model.encode(image))
                sync(device)
                times.append(time.perf_counter() - start)
    else:
        forward = torch.compile(model) if compile_ else model
        with torch.autocast(**amp):
            context = model.encode(image.repeat(galaxies, 1, 1, 1)).repeat_interleave(N_SAMPLES, 0)
        x = torch.randn(galaxies * N_SAMPLES, 1, LENGTH, device=device)
        t = torch.full((galaxies * N_SAMPLES,), 100, device=device)
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(**amp):
                forward(x, t, context)
            sync(device)
            times.append((time.perf_counter() - start) / galaxies)
    return {"seconds": float(np.median(times[1:])), "first_seconds": times[0], "all": times}


def forward_gflop() -> float:
    """GFLOP of one batch-1 forward pass (image encoder included), for model FLOP utilisation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = paper_model(torch.device("cpu")).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, LENGTH), torch.tensor([100]), images=torch.randn(1, 3, 64, 64))
    return counter.get_total_flops() / 1e9


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


WHATS = {"train": ("training step, batch 16", time_training, 3 * TRAIN_BATCH),
         "denoise": ("denoising step, 25 samples", time_denoising, N_SAMPLES)}
#: (way, allocator): the research code as it ran, ours as the entry scripts run, and the two crossings
#: (the allocator is glibc's host heap: on a GPU only the first two are measured)
CONFIGS = [("research", "system"), ("ours", "reuse"), ("ours", "system"), ("research", "reuse")]


def worker(spec: str, repeats: int, profile: bool, galaxies: int = 1) -> None:
    """One measurement in this process: ``what:way:allocator:precision[:compile]``; prints JSON."""
    what, way, allocator, precision, *rest = spec.split(":")
    if allocator == "reuse" and not keep_freed_memory():
        print(json.dumps(None))
        return
    device = default_device()
    fn = WHATS[what][1]
    kwargs = {"profile": profile} if what == "train" and way == "ours" else {}
    if what == "denoise" and way == "ours":
        kwargs["galaxies"] = galaxies
    row = fn(device, way, precision, repeats, bool(rest), **kwargs)
    print("RESULT " + json.dumps(row))


def measure(spec: str, repeats: int, galaxies: int = 1) -> dict | None:
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--worker", spec, "--repeats", str(repeats),
                          "--batch-galaxies", str(galaxies)],
                         capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of fresh processes, configurations interleaved")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--what", default="train,denoise", help="comma-separated: train, denoise")
    parser.add_argument("--compile", action="store_true", help="also time the project's way under torch.compile")
    parser.add_argument("--profile", action="store_true", help="print the operator table of our training step")
    parser.add_argument("--galaxies", type=int, default=0,
                        help="extrapolate the time to generate this many galaxies x 25 samples x 250 DDPM steps")
    parser.add_argument("--batch-galaxies", type=int, default=1,
                        help="galaxies per denoising forward pass of the project's way "
                             "(x 25 samples; times per galaxy)")
    parser.add_argument("--out", default="bench/paper_speed.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats, args.profile, args.batch_galaxies)
        return
    if args.profile:
        worker("train:ours:reuse:fp32", 1, True)
        return
    gflop = forward_gflop()
    results = {"device": machine(), "torch": torch.__version__, "forward_gflop_batch1": gflop, "rows": [],
               "batch_galaxies": args.batch_galaxies}
    print(f"{results['device']}, torch {torch.__version__}; forward pass {gflop:.2f} GFLOP at batch 1; "
          f"{args.rounds} rounds x {args.repeats} timed repetitions, each configuration in a fresh process")
    configs = CONFIGS[:2] if torch.cuda.is_available() else CONFIGS
    specs = [f"{what}:{way}:{alloc}:{precision}" for precision in args.precisions.split(",")
             for what in args.what.split(",") for way, alloc in configs]
    specs += [f"{what}:ours:reuse:{p}:compile" for p in args.precisions.split(",") for what in args.what.split(",")
              if args.compile]
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for _ in range(args.rounds):
        for spec in specs:
            row = measure(spec, args.repeats, args.batch_galaxies)
            if row is not None:
                times[spec] += row["all"][1:]
                if spec.endswith("compile"):
                    results.setdefault("compile_first_call_seconds", {})[spec] = row["first_seconds"]
    print(f"{'what':<30}{'way':<14}{'memory':<8}{'precision':<10}{'median s':>9}{'min s':>8}{'TFLOP/s':>9}")
    for spec, values in times.items():
        if not values:
            continue
        what, way, alloc, precision, *compiled = spec.split(":")
        label, _, per_forward = WHATS[what]
        way_label = way + ("+compile" if compiled else "")
        row = {"what": label, "way": way_label, "allocator": alloc, "precision": precision,
               "median_seconds": float(np.median(values)), "min_seconds": float(min(values)), "all": values}
        row["tflops"] = per_forward * gflop / 1e3 / row["median_seconds"]
        results["rows"].append(row)
        print(f"{label:<30}{way_label:<14}{alloc:<8}{precision:<10}{row['median_seconds']:9.3f}"
              f"{row['min_seconds']:8.3f}{row['tflops']:9.3f}")
    for what in args.what.split(","):
        label = WHATS[what][0]
        rows = {(r["way"], r["allocator"]): r for r in results["rows"]
                if r["what"] == label and r["precision"] == "fp32"}
        ref = rows.get(("research", "system"))
        for key in (("ours", "system"), ("ours", "reuse")):
            if ref and key in rows:
                med = ref["median_seconds"] / rows[key]["median_seconds"]
                low = ref["min_seconds"] / rows[key]["min_seconds"]
                results[f"speedup {label}, ours with {key[1]} allocator"] = {"median": med, "min": low}
                print(f"{label}: ours ({key[1]} allocator) against the research way: {med:.2f}x (medians), "
                      f"{low:.2f}x (minima)")
    if args.galaxies and any(r["what"].startswith("denoising") and r["way"] != "research" for r in results["rows"]):
        best = min(r["median_seconds"] for r in results["rows"] if r["what"].startswith("denoising")
                   and r["way"] != "research")
        hours = args.galaxies * TIMESTEPS * best / 3600
        results["generation_hours"] = {"galaxies": args.galaxies, "samples": N_SAMPLES, "steps": TIMESTEPS,
                                       "hours": hours}
        print(f"{args.galaxies} galaxies x {N_SAMPLES} samples x {TIMESTEPS} DDPM steps: {hours:.1f} h "
              f"(from the fastest denoising step; the ranking adds one contrastive pass per galaxy)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
