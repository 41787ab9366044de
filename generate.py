"""Generate, rank, evaluate and export spectra (SPEC section 4).

    python generate.py [--preset quick] [section.key=value ...]
    python generate.py sampling.catalog=DATASET          # a catalogue of images only
    torchrun --nproc_per_node=4 generate.py sampling.catalog=DATASET run.backend=nccl

Loads the diffusion model (EMA weights) and the contrastive network, by default from the newest
finished runs in runs/generative and runs/contrastive, and draws ``sampling.n_samples`` spectra per
galaxy, ranked by the contrastive similarity to the galaxy's image. On galaxies whose true spectra
are known (a split, or a catalog with spectra) it measures the samples' errors and physics against
honest baselines (utils.split_run); on a catalog of images only it writes a property catalogue,
streamed in shards, resumable, spread over the processes of a torchrun launch (utils.catalog_run).
Outputs go to ``sampling.out_dir/<time>/``.
"""
from __future__ import annotations

from typing import Sequence

from utils.config import load_config
from utils.errors import cli
from utils.generate_run import launch
from utils.runtime import keep_freed_memory


def main(argv: Sequence[str]) -> None:
    config = load_config("generative", argv)
    keep_freed_memory()
    launch(config)


if __name__ == "__main__":
    cli(main)
