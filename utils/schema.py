"""Every configuration key of the three scripts, written once: its default, its type (the default's),
its allowed values or range, and its meaning.

The two trainers have schemas of their own (:data:`SCHEMAS`); generate.py reads the generative one,
whose ``sampling`` section is its own. Sections both trainers have (``data``, ``run``, and the
shared keys of ``model``, ``train`` and ``val``) are the same :class:`Key` objects, with the
defaults a trainer changes given beside its schema. Checks (utils.config), ``--help`` and the
configuration reference (docs/configuration.md, written by ``python -m utils.config --reference``)
all read this module, so a key cannot lose its check or its documentation by being renamed.

Allowed values that belong to a module are named as ``"module:NAME"`` and read from that module on
first use, so that reading a configuration does not import torch.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

#: the trainers, whose names are also the kinds of their runs and checkpoints
KINDS = ("contrastive", "generative")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``default`` fixes the type (None: a path or null); ``choices`` is a tuple or ``"module:NAME"``
    (a module's tuple, or a dict's keys); ``low`` / ``high`` bound numbers (and each item of a list),
    ``open_low`` / ``open_high`` make a bound strict; ``help`` is the one-line meaning shown by
    ``--help`` and the reference.
    """

    default: Any
    help: str
    choices: tuple | str | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def allowed(self) -> tuple | None:
        """The closed set of values, or None."""
        if self.choices is None or isinstance(self.choices, tuple):
            return self.choices
        return module_values(self.choices)

    def range_text(self) -> str:
        """The numeric range in words ('>= 1', '> 0', 'in [0, 1)'), '' for none."""
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"

    def in_range(self, value: float) -> bool:
        """Whether ``value`` is finite and within the bounds."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))


@cache
def module_values(ref: str) -> tuple:
    """The values a ``"module:NAME"`` reference names (a tuple, or a dict's keys)."""
    module, name = ref.split(":")
    values = getattr(importlib.import_module(module), name)
    return tuple(values)


def at_least(n: float, help: str, default: Any) -> Key:
    return Key(default, help, low=n)


def positive(help: str, default: Any) -> Key:
    return Key(default, help, low=0, open_low=True)


def fraction(help: str, default: Any, open_high: bool = True) -> Key:
    """A share in [0, 1) (or [0, 1] with ``open_high`` False)."""
    return Key(default, help, low=0, high=1, open_high=open_high)


# --------------------------------------------------------------------------------------------
# sections both trainers share
# --------------------------------------------------------------------------------------------
DATA = {
    "root": Key("data/mock", "dataset folder (format: docs/dataset-format.md)"),
    "source": Key("mock", "mock: generate the mock survey at data.root when it is missing; folder: data.root must "
                          "exist", choices=("mock", "folder")),
    "mock_objects": at_least(1, "galaxies in a generated mock survey", 10000),
    "mock_seed": at_least(0, "seed of a generated mock survey", 0),
    "mock_grid": Key("neurips", "wavelength grid of a generated mock survey: the SDSS pixels (neurips) or 4000-8500 A "
                                "in 1 A steps (apj)", choices="utils.data.prepare:GRIDS"),
    "image": Key("gri", "images the networks see: gri 8-bit colour (NeurIPS 2022) or ugriz nanomaggies (ApJ 2024)",
                 choices="utils.data.dataset:IMAGE_FILES"),
    "preprocessing": Key("scale", "spectrum normalisation: scale, min-max to [-1, 1] (NeurIPS 2022); log, "
                                  "ln(flux / mean 6900-6950 A) (ApJ 2024)",
                         choices="utils.astro.spectra:PREPROCESSINGS"),
    "downsample": at_least(1, "combine blocks of this many stored pixels (inverse-variance weighted); 1 keeps the "
                              "grid", 1),
    "num_workers": at_least(0, "DataLoader worker processes (0: load in the training process)", 4),
}

RUN = {
    "out_dir": Key("runs", "folder under which each run gets a time-stamped folder"),
    "seed": at_least(0, "seed of weights, batches, augmentation and sampling", 0),
    "resume": Key(None, "a run folder or checkpoint file to continue (generate.py: an output folder)"),
    "precision": Key("fp32", "arithmetic: fp32, or bf16 autocast", choices=("fp32", "bf16")),
    "backend": Key("none", "process group: none (one process), gloo (CPU) or nccl (GPU); torchrun sets the world "
                           "size", choices=("none", "gloo", "nccl")),
    "checkpoint_every": at_least(1, "iterations between 'latest' checkpoints", 1000),
    "compile": Key(False, "torch.compile the training forward pass (pays on a GPU, not on a 2-core CPU)"),
}

TRAIN = {
    "batch_size": at_least(1, "galaxies per optimisation step, over all processes", 64),
    "lr": positive("Adam learning rate", 1.0e-4),
    "lr_schedule": Key("epoch", "learning-rate schedule: x train.lr_decay at every epoch's end (epoch, the NeurIPS "
                                "paper's), or down linearly to 1e-6 over the whole training (linear, the ApJ's)",
                       choices=("epoch", "linear")),
    "lr_decay": Key(0.997, "learning rate multiplied by this at the end of every epoch", low=0, high=1, open_low=True),
    "max_epochs": at_least(1, "epochs to train (when train.max_iters is 0)", 100),
    "max_iters": at_least(0, "stop after this many iterations (0: no limit)", 0),
    "max_minutes": at_least(0, "stop after this much training wall time, validation excluded, across resumes "
                               "(0: no limit)", 0.0),
}

VAL = {
    "every": at_least(1, "validate (and draw a figure) every this many iterations", 1000),
    "n_objects": at_least(1, "validation galaxies (a fixed random subset of the split)", 5000),
}

#: the cascade (SPEC 5): which spectra a network models, and how their low-resolution version is made
STAGE = {
    "stage": Key("single", "what the network models: the full spectrum (single), its low-resolution version (low), "
                           "or the full spectrum given that version (super)", choices="utils.data.dataset:STAGES"),
    "low_factor": at_least(2, "the low-resolution version keeps one pixel in this many (the ApJ's 8)", 8),
    "low_reduction": Key("decimate", "how: every low_factor-th pixel (decimate, the ApJ's) or each block's "
                                     "inverse-variance weighted mean flux (mean)",
                            choices="utils.astro.spectra:LOW_REDUCTIONS"),
}

IMAGE_ENCODER = {
    "image_depth": Key(50, "ResNet depth of the network's image encoder (contrastive: the image tower; generative: "
                           "the condition encoder the UNet attends to)", choices="models.encoders:RESNET_LAYOUTS"),
    "image_width": at_least(1, "channels of that image encoder's stem (64: the standard ResNet)", 64),
}

# --------------------------------------------------------------------------------------------
# the contrastive network (SPEC section 2)
# --------------------------------------------------------------------------------------------
CONTRASTIVE = {
    "data": DATA,
    "model": {
        **IMAGE_ENCODER,
        "image_weights": Key(None, "a local .pt state_dict for the image encoder (nothing is downloaded)"),
        "spectrum_width": at_least(1, "base channels of the 1D ResNet spectrum encoder (levels x1, 2, 4, 8, 16)", 64),
        "latent_dim": at_least(1, "size of the shared embedding", 128),
        **STAGE,
    },
    "train": {
        **TRAIN,
        "weight_decay": at_least(0, "Adam weight decay", 1.0e-3),
        "temperature": positive("NT-Xent temperature", 0.05),
    },
    "val": VAL,
    "run": RUN,
}

# --------------------------------------------------------------------------------------------
# the diffusion model (SPEC section 3) and generate.py (SPEC section 4)
# --------------------------------------------------------------------------------------------
GENERATIVE = {
    "data": DATA,
    "model": {
        "width": at_least(1, "base channels of the 1D UNet", 64),
        "mults": at_least(1, "UNet level widths as multiples of model.width; the last is the 'concat' bottleneck's "
                             "middle", [1, 2, 4, 8, 16]),
        "attn_levels": at_least(1, "levels (1 = top) followed by a transformer block (the paper: the deepest)", [4]),
        "conditioning": Key("x-attention", "how the image enters: cross-attention to its feature map, a concatenated "
                                           "channel, or none", choices="models.unet:CONDITIONINGS"),
        **IMAGE_ENCODER,
        "context_pos": Key(False, "learned positions for the 4 image context tokens (the paper's tokens have none)"),
        "grad_checkpoint": Key(False, "recompute UNet blocks in the backward pass to save memory"),
        "cond_drop": fraction("share of training items with a null image context, for classifier-free guidance", 0.0),
        "image_init": Key(None, "start the image encoder from a trained contrastive network: 'contrastive' (the "
                                "newest finished run of the same model.stage) or a run folder or checkpoint"),
        **STAGE,
    },
    "diffusion": {
        "timesteps": at_least(1, "diffusion steps T", 250),
        "schedule": Key("cosine", "noise schedule: cosine (s = 0.008) or linear", choices="models.diffusion:SCHEDULES"),
        "prediction": Key("eps", "what the network predicts: the noise (eps, the paper's) or the velocity (v)",
                          choices="models.diffusion:PREDICTIONS"),
    },
    "train": {
        **TRAIN,
        "ema_decay": Key(0.99, "per-step Polyak average of the weights, used for validation and sampling", low=0,
                         high=1, open_high=True),
        "cond_noise": fraction("super stage: noise its low-resolution input to a random level up to this share of "
                               "the T steps, told to the network (Ho et al. 2021); 0: clean inputs, the ApJ's", 0.0,
                               open_high=False),
    },
    "val": {
        **VAL,
        "n_samples": at_least(1, "samples per validation galaxy; the MSE of their mean is the score", 25),
        "steps": at_least(1, "DDIM steps of the validation samples", 25),
        "low_run": Key(None, "super stage: the low-stage run whose samples condition the validation's (default: the "
                             "newest finished one)"),
    },
    "run": RUN,
    "sampling": {
        "split": Key("test", "galaxies to generate for: train, val or test", choices="utils.data.dataset:SPLITS"),
        "catalog": Key(None, "a dataset folder to generate for instead of a split: images only (a property "
                             "catalogue) or with spectra (evaluated)"),
        "max_objects": at_least(1, "galaxies evaluated (a fixed random subset of the split; SPEC: 5,000); a "
                                   "catalogue of images only is predicted whole", 5000),
        "n_samples": at_least(1, "spectra drawn per galaxy", 25),
        "sampler": Key("ddpm", "ddpm: ancestral over all T steps (the paper's); ddim or dpmpp2m over sampling.steps",
                       choices="models.samplers:SAMPLERS"),
        "steps": at_least(1, "steps of the ddim and dpmpp2m samplers", 50),
        "guidance": at_least(0, "classifier-free guidance scale (1: none; needs model.cond_drop > 0)", 1.0),
        "top_k": at_least(1, "best-ranked samples averaged ('top-k mean') and written per galaxy", 5),
        "batch_galaxies": at_least(1, "galaxies per sampling batch (times sampling.n_samples spectra)", 16),
        "shard_size": at_least(1, "galaxies per shard of a catalogue prediction: memory and the unit of resumption",
                               256),
        "contrastive_run": Key(None, "contrastive run folder or checkpoint (default: the newest finished run)"),
        "generative_run": Key(None, "diffusion run folder or checkpoint (default: the newest finished run)"),
        "out_dir": Key("outputs", "folder under which each output gets a time-stamped folder"),
        "figures": at_least(0, "per-galaxy figures to draw", 8),
        "per_galaxy_fits": Key(False, "also write one spec-lite FITS file per galaxy"),
        "science": Key(True, "measure redshift, Dn4000, lines and BPT class of samples, truth and baselines"),
        "calibration_objects": at_least(0, "validation galaxies on which the samples' intervals are calibrated "
                                           "(0: their own intervals)", 0),
        "low_run": Key(None, "cascade: the low-stage diffusion run (default: the newest finished one)"),
        "low_contrastive_run": Key(None, "cascade: the low-stage ranker (default: the newest finished one)"),
        "low_samples": at_least(1, "cascade: low-resolution samples drawn per galaxy", 3),
        "low_keep": at_least(1, "cascade: best-ranked low-resolution samples kept; sampling.n_samples super samples "
                                "are shared among them, the better ranked first", 2),
        "cond_noise": fraction("cascade: the noise level of the super stage's low-resolution input, a share of the T "
                               "steps (0 for a model trained with train.cond_noise 0)", 0.0, open_high=False),
    },
}

#: each trainer's schema, and the defaults it sets on keys shared with the other
SCHEMAS = {"contrastive": CONTRASTIVE, "generative": GENERATIVE}
DEFAULTS = {
    "contrastive": {"run.out_dir": "runs/contrastive"},
    "generative": {"run.out_dir": "runs/generative", "model.image_depth": 18, "train.batch_size": 4,
                   "train.lr_decay": 0.998, "train.max_epochs": 500, "val.every": 5000, "val.n_objects": 256},
}


#: why each section's keys exist: the reference prints it above the section's table, and a test
#: checks that it names every key of the section (a key nobody can say a need for is removed)
WHY = {
    "data": "Where the survey is (`root`, `source`) and how a missing mock is made (`mock_objects`, `mock_seed`, "
            "`mock_grid`: the NeurIPS and the ApJ grids); which of the two papers' inputs the networks see "
            "(`image`, `preprocessing`); `downsample` bins the spectra so that a 2-core machine trains in minutes; "
            "`num_workers` sizes the loader to the machine.",
    "model": "The networks' sizes, so that one code runs the published models on a GPU and the small presets on 2 "
             "cores: the image encoder (`image_depth`, `image_width`, `image_weights` for a local pretrained "
             "encoder), the contrastive spectrum encoder and embedding (`spectrum_width`, `latent_dim`), the UNet "
             "(`width`, `mults`, `attn_levels`, `grad_checkpoint` for the paper-size model on a small card). "
             "`conditioning` is the paper's ablation (cross-attention, concatenation, none); `context_pos` and "
             "`image_init` are the levers the 2-core presets measured better; `cond_drop` enables classifier-free "
             "guidance. The cascade's stages are `stage`, `low_factor` and `low_reduction` (the ApJ's decimation "
             "or a block mean).",
    "train": "The optimisation each paper specifies (`batch_size`, `lr`, `lr_schedule`, `lr_decay`, "
             "`weight_decay`, `temperature`, `ema_decay`) and the budget a user sets (`max_epochs`, `max_iters`, "
             "`max_minutes`); `cond_noise` is the cascade's conditioning augmentation, measured against training "
             "without it.",
    "val": "How often and on how much the runs are validated (`every`, `n_objects`, `n_samples`, `steps`): "
           "validation costs training time, so a small machine wants less of it; `low_run` names the low stage "
           "whose samples a super stage is validated on.",
    "run": "Where runs go (`out_dir`), reproducibility (`seed`), continuing a killed run (`resume`, "
           "`checkpoint_every`) and the hardware: `precision` (bf16 on a GPU), `backend` (several GPUs or "
           "processes), `compile` (pays on a GPU).",
    "diffusion": "The diffusion process: `timesteps` and `schedule` as the papers set them, `prediction` the "
                 "v-parameterisation the 2-core presets need.",
    "sampling": "What is generated and for which galaxies (`split`, `catalog`, `max_objects`, `n_samples`); the "
                "sampler and its cost (`sampler`, `steps`, `guidance`, `batch_galaxies`); the ranking's output "
                "(`top_k`); which trained runs to use (`contrastive_run`, `generative_run`); what is written "
                "(`out_dir`, `figures`, `per_galaxy_fits`, `science`, `calibration_objects` for calibrated "
                "intervals, `shard_size` for the memory and resumption of a catalogue of millions); the cascade's "
                "runs and budget (`low_run`, `low_contrastive_run`, `low_samples`, `low_keep`, `cond_noise`).",
}

def check_kind(kind: str) -> str:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown configuration kind {kind!r}: expected one of {', '.join(KINDS)}")
    return kind


@cache
def keys(kind: str) -> dict[str, Key]:
    """Every key of ``kind``'s schema by dotted path, with that trainer's defaults."""
    out = {f"{section}.{name}": key for section, entries in SCHEMAS[check_kind(kind)].items()
           for name, key in entries.items()}
    for path, default in DEFAULTS[kind].items():
        out[path] = replace(out[path], default=default)
    return out


def defaults(kind: str) -> dict:
    """The nested default configuration of ``kind`` (fresh copies of list values)."""
    tree: dict = {}
    for path, key in keys(kind).items():
        section, name = path.split(".")
        tree.setdefault(section, {})[name] = list(key.default) if isinstance(key.default, list) else key.default
    return tree
