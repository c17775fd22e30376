"""The options of an erasure (`TrainConfig`: paper defaults, each field's help, the methods it applies
to and what it needs) and their layering for `erase/train.py`: flags over the concept file's `train:`
recipe over the defaults, with every option the run would not use refused."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from erase.adversarial import AdversarialSettings
from erase.command import add_dataclass_arguments, check_positive, check_prompts, check_writable, one_line_errors
from erase.concepts import Concept, custom_concept, load_concept, merge_concepts
from erase.saliency import check_ratio, read_mask_shapes
from erase.sharding import check_shardable

__all__ = ["METHODS", "TRAINED", "TrainConfig", "parse_train_args", "refuse_unused"]

METHODS = ("salun", "rl", "esd-x", "esd-u", "uce")
TRAINED = ("salun", "rl", "esd-x", "esd-u")  # the methods with a training loop (uce edits in closed form)


@dataclass
class TrainConfig:
    """Options of `erase/train.py`; paper defaults (SalUn, nudity). A concept file's `train:`
    section overrides them for its model, and command-line flags override both."""

    concept: list[str] = field(default_factory=list, metadata={
        "help": "concept name from prompts/*.yaml; repeat it to erase several concepts in one run"})
    forget_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: prompt(s) c to forget"})
    anchor_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: anchor prompt(s) c'"})
    retain_prompt: list[str] = field(default_factory=list, metadata={"help": "custom concept: prompts to keep"})
    pretrained_model_name_or_path: str = field(default="CompVis/stable-diffusion-v1-4", metadata={"help": "hub id, folder, or `digits`"})
    method: str = field(default="salun", metadata={"help": "salun, rl, esd-x, esd-u or uce (closed form, no training)"})
    mask_ratio: float | None = field(default=None, metadata={"methods": ("salun",),
        "help": "salun: fraction of UNet weights that may move, in (0, 1] (default 0.5; other methods take none)"})
    mask: str | None = field(default=None, metadata={"methods": ("salun",), "help": "salun: reuse a saved saliency mask instead of computing one"})
    adversarial: bool = field(default=False, metadata={"methods": TRAINED,
        "help": "train against concept inversion (erase/adversarial.py): every --adversarial-every steps, "
                "--adversarial-steps Adam steps on --adversarial-vectors token vectors against the current UNet; the "
                "forget objective applies to the clean and the adversarial prompts"})
    adversarial_vectors: int = field(default=4, metadata={"methods": TRAINED, "needs": "adversarial",
        "help": "adversarial: token vectors of the inner attack"})
    adversarial_steps: int = field(default=30, metadata={"methods": TRAINED, "needs": "adversarial",
        "help": "adversarial: inner Adam steps per round"})
    adversarial_every: int = field(default=10, metadata={"methods": TRAINED, "needs": "adversarial",
        "help": "adversarial: optimizer steps between rounds"})
    adversarial_lr: float = field(default=0.01, metadata={"methods": TRAINED, "needs": "adversarial",
        "help": "adversarial: inner Adam learning rate"})
    adversarial_pool: int | None = field(default=None, metadata={"methods": TRAINED, "needs": "adversarial",
        "help": "adversarial: the outer step trains against the vectors of the last N inner rounds, one drawn per forget row "
                "(0: every round so far, the default when the UNet alone trains; 1: the last round's, the only choice with trained "
                "text encoders)"})
    adversarial_trains: str = field(default="unet", metadata={"methods": ("salun", "rl"), "needs": "adversarial",
        "help": "adversarial salun or rl: what the outer step trains: the UNet under its mask (unet), the text encoder(s) "
                "(text-encoder, AdvUnlearn's choice), or both", "choices": ("unet", "text-encoder", "both")})
    adversarial_mask: str = field(default="clean", metadata={"methods": ("salun",), "needs": "adversarial",
        "help": "adversarial salun: the mask's loss on the clean prompts (clean) or on clean + adversarial (both)",
        "choices": ("clean", "both")})
    beta: float = field(default=0.1, metadata={"methods": ("salun", "rl"), "help": "weight of the retain loss (SalUn Eq. 9)"})
    eta: float = field(default=1.0, metadata={"methods": ("esd-x", "esd-u"), "help": "negative guidance of ESD"})
    uce_lambda: float = field(default=0.1, metadata={"methods": ("uce",), "help": "uce: weight that keeps each projection near its original"})
    erase_scale: float = field(default=1.0, metadata={"methods": ("uce",), "help": "uce: weight of the forget -> anchor edits"})
    preserve_scale: float = field(default=0.1, metadata={"methods": ("uce",), "help": "uce: weight of each preserved (retain) prompt"})
    learning_rate: float = field(default=1e-5, metadata={"methods": TRAINED, "help": "Adam learning rate"})
    optimizer_state: str = field(default="dense", metadata={"methods": TRAINED,
        "help": "Adam's moments for every weight of a trained tensor (dense), or for the weights the mask lets move "
                "only (masked: about half the state at ratio 0.5, the same update on the CPU to the last bit)",
        "choices": ("dense", "masked")})
    master_weights: str = field(default="fp32", metadata={"methods": TRAINED,
        "help": "the trained model's weights in fp32 (fp32: the usual mixed-precision masters), or in the training "
                "precision with fp32 masters for the mask's entries only (masked: packed beside their Adam moments, "
                "2 bytes a weight plus 12 a salient one; implies --optimizer-state masked; use with --mixed-precision bf16)",
        "choices": ("fp32", "masked")})
    fsdp: bool = field(default=False, metadata={"methods": TRAINED,
        "help": "shard the UNet's weights, gradients, optimizer state and mask over the launched processes (FSDP2; "
                "Accelerate's --use_fsdp --fsdp_version 2 selects it too); launch 2 or more processes"})
    train_batch_size: int = field(default=8, metadata={"methods": TRAINED, "help": "forget and retain images per step and process"})
    max_train_steps: int = field(default=100, metadata={"methods": TRAINED, "help": "optimizer steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={"methods": TRAINED, "help": "micro-batches per optimizer step"})
    num_images: int = field(default=800, metadata={"methods": TRAINED, "help": "images in the forget set and in the retain set"})
    generation_steps: int = field(default=50, metadata={"methods": TRAINED, "help": "sampler steps when generating the sets"})
    guidance_scale: float = field(default=7.5, metadata={"methods": TRAINED,
        "help": "w of the generated sets (diffusers' eps_u + w (eps_c - eps_u)), and g of the mask loss "
                "(1 + g) eps_c - g eps_u, which is w = g + 1, as in SalUn's mask code"})
    resolution: int | None = field(default=None, metadata={"methods": TRAINED, "help": "image size of the generated sets (model default)"})
    generation_batch_size: int = field(default=16, metadata={"methods": TRAINED, "help": "images per batch when generating the sets"})
    saliency_batch_size: int = field(default=8, metadata={"methods": ("salun",), "help": "forget images per gradient batch for the mask"})
    mixed_precision: str = field(default="no", metadata={"methods": TRAINED, "help": "no, fp16 or bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={"methods": TRAINED,
        "help": "recompute activations in the backward pass (less memory)"})
    checkpointing_steps: int = field(default=50, metadata={"methods": TRAINED, "help": "save a resumable checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"methods": TRAINED,
        "help": "log the mean losses every N steps (reading them waits for the device)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"methods": TRAINED, "help": "`latest` or a checkpoint-N folder"})
    output_dir: str = field(default="erased-model", metadata={"help": "the erased pipeline's folder"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    cache_dir: str = field(default=os.path.join(os.path.expanduser("~"), ".cache", "erase"), metadata={"methods": TRAINED,
        "help": "generated image sets"})
    report_to: str | None = field(default=None, metadata={"methods": TRAINED, "help": "tracker (default: tensorboard when installed)"})
    seed: int = field(default=0, metadata={"methods": TRAINED, "help": "training randomness (the generated sets use fixed seeds)"})
    ddp_timeout: int | None = field(default=None, metadata={
        "help": "seconds a process waits in a collective before the run is aborted (default: the backend's, "
                "NCCL 10 minutes); raise it where one step is long (a huge model's first step, a slow file system)"})

    def __post_init__(self) -> None:
        if isinstance(self.concept, str):  # one name, as the Python API took it before --concept repeated
            self.concept = [self.concept]
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method != "salun" and (self.mask is not None or self.mask_ratio is not None):
            trains = {"rl": "trains every UNet weight", "uce": "edits the cross-attention keys and values in closed form"}
            raise ValueError(f"--mask and --mask-ratio apply to salun only ({self.method} "
                             f"{trains.get(self.method, 'trains its fixed subset of the UNet')})")
        if self.method == "salun":
            self.mask_ratio = check_ratio(0.5 if self.mask_ratio is None else self.mask_ratio)
        if not self.concept and not self.forget_prompt:
            raise ValueError("give --concept NAME or --forget-prompt TEXT")
        if self.max_train_steps < 1:
            raise ValueError(f"max-train-steps must be >= 1, got {self.max_train_steps} (0 would publish the unchanged model)")
        if self.train_batch_size < 1 or self.num_images < 1:
            raise ValueError("train_batch_size and num_images must be >= 1")
        if min(self.generation_batch_size, self.saliency_batch_size, self.logging_steps) < 1:
            raise ValueError("generation_batch_size, saliency_batch_size and logging_steps must be >= 1")
        check_positive(learning_rate=self.learning_rate, generation_steps=self.generation_steps,
                       gradient_accumulation_steps=self.gradient_accumulation_steps, resolution=self.resolution)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if min(self.beta, self.eta, self.guidance_scale, self.checkpointing_steps, self.erase_scale, self.preserve_scale) < 0:
            raise ValueError("beta, eta, guidance_scale, checkpointing_steps, erase_scale and preserve_scale must be >= 0")
        check_positive(uce_lambda=self.uce_lambda, ddp_timeout=self.ddp_timeout)
        if self.adversarial:
            if self.method == "uce":
                raise ValueError("--adversarial trains against an attack: uce has no training loop (use salun, rl, esd-x or esd-u)")
            self.adversarial_settings().check()
        if self.fsdp:
            check_shardable(self)
        if self.optimizer_state not in ("dense", "masked"):
            raise ValueError(f"optimizer-state must be dense or masked, got {self.optimizer_state!r}")
        if self.adversarial_trains not in ("unet", "text-encoder", "both"):
            raise ValueError(f"adversarial-trains must be unet, text-encoder or both, got {self.adversarial_trains!r}")
        if self.adversarial_trains != "unet" and not (self.adversarial and self.method in ("salun", "rl")):
            raise ValueError("--adversarial-trains text-encoder|both applies to --adversarial salun and rl "
                             "(ESD's teacher reads the original encoder's conditioning)")
        if self.adversarial_trains != "unet" and self.adversarial_pool not in (None, 1):
            raise ValueError("--adversarial-trains text-encoder|both encodes the last round's captions afresh each step: "
                             "it takes --adversarial-pool 1")
        if self.master_weights not in ("fp32", "masked"):
            raise ValueError(f"master-weights must be fp32 or masked, got {self.master_weights!r}")
        if self.master_weights == "masked":
            if self.mixed_precision == "fp16":
                raise ValueError("--master-weights masked keeps fp16 weights unscaled: use --mixed-precision bf16 (or no)")
            self.optimizer_state = "masked"
        if self.adversarial_trains != "unet" and self.optimizer_state == "masked":
            raise ValueError("--optimizer-state masked keeps moments for the UNet's mask: it does not train text encoders")
        if self.adversarial_mask not in ("clean", "both"):
            raise ValueError(f"adversarial-mask must be clean or both, got {self.adversarial_mask!r}")
        check_prompts("forget_prompt", self.forget_prompt)
        check_prompts("anchor_prompt", self.anchor_prompt)
        check_prompts("retain_prompt", self.retain_prompt)
        if self.mask is not None:
            read_mask_shapes(self.mask)  # a saliency mask file (its names and shapes meet the model later)
        check_writable(self.output_dir, "output", folder=True)
        check_writable(self.cache_dir, "cache", folder=True)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")

    def adversarial_settings(self) -> AdversarialSettings:
        pool = self.adversarial_pool if self.adversarial_pool is not None else 0 if self.adversarial_trains == "unet" else 1
        return AdversarialSettings(vectors=self.adversarial_vectors, steps=self.adversarial_steps, every=self.adversarial_every,
                                   lr=self.adversarial_lr, batch_size=min(self.train_batch_size, 4), pool=pool)

    def resolve_concepts(self) -> list[Concept]:
        """Each concept erased in this run (one, unless --concept is repeated)."""
        if self.concept:
            return [load_concept(name) for name in self.concept]
        return [custom_concept(self.forget_prompt, self.anchor_prompt, self.retain_prompt)]

    def resolve_concept(self) -> Concept:
        """The run's concepts as one: every forget/anchor pair, the retain prompts none of them forgets."""
        return merge_concepts(self.resolve_concepts())


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def refuse_unused(cfg: TrainConfig, given: Mapping[str, object]) -> None:
    """One error for the first option given on the command line that this run would not use: another
    method's (the field's `methods` metadata), or an --adversarial-* option without --adversarial
    (`needs`). A flag turned off (`--no-X`) asks for nothing, and passes."""
    for f in dataclasses.fields(TrainConfig):
        if f.name not in given or given[f.name] is False:
            continue
        flag, methods = "--" + f.name.replace("_", "-"), f.metadata.get("methods")
        if methods and cfg.method not in methods:
            if cfg.method == "uce" and tuple(methods) == TRAINED:
                raise ValueError(f"{flag} applies to the methods that train ({_listing(TRAINED)}); uce edits in closed form: "
                                 "leave it out")
            raise ValueError(f"{flag} applies to {_listing(methods)}, not {cfg.method}: leave it out")
        if f.metadata.get("needs") == "adversarial" and not cfg.adversarial:
            raise ValueError(f"{flag} applies with --adversarial only: add --adversarial or leave it out")


def parse_train_args(argv: list[str] | None, prog: str, description: str, load=load_concept) -> TrainConfig:
    """erase/train.py's options: a concept file's `train:` recipe sits between the paper defaults and the
    flags (its `adversarial:` part overrides the rest under --adversarial); a typo in a recipe is refused,
    not dropped, and so is a flag the run would not use. `load`: how a concept name is read."""
    parser = one_line_errors(argparse.ArgumentParser(prog=prog, description=description))
    add_dataclass_arguments(parser, TrainConfig, aliases={"pretrained_model_name_or_path": ["--model"]}, suppress=True)
    given = vars(parser.parse_args(argv))
    recipe = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if given.get("concept"):
        concepts = [load(name) for name in given["concept"]]
        for concept in concepts:
            keys = [*concept.train, *(concept.train.get("adversarial") or {})]
            unknown = [k for k in keys if k not in known]
            if unknown:
                raise ValueError(f"concept {concept.name!r}: unknown option {unknown[0]!r} in its train: recipe "
                                 "(the recipe takes erase/train.py's options, spelt with underscores)")
        recipe = dict(merge_concepts(concepts).train)
        adversarial = recipe.pop("adversarial", None) or {}
        if given.get("adversarial"):
            recipe.update(adversarial)
    cfg = TrainConfig(**{**recipe, **given})
    refuse_unused(cfg, given)  # the recipe's options are the model's, written for every method: only flags are refused
    return cfg
