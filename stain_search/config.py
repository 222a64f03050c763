"""Typed training configuration, loaded and validated once at the boundary.

A training config is a YAML mapping of sections (``model``, ``loss``, ``optim``,
``data``, ``train``, ``eval``); every key is checked against the dataclasses
below, so a typo is an error that names the file and key and suggests the
nearest valid key, never a silently ignored setting. Search spaces
(``stain_search.spaces``) address the same fields with dotted keys such as
``loss.lambda_cycle``: :func:`apply_overrides` is the one place they land.

Defaults reproduce the CycleGAN reference (Zhu et al., 2017;
junyanz/pytorch-CycleGAN-and-pix2pix) where a reference exists, scaled down
only where that reference is silent.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin


from stain_search.errors import ConfigError
from stain_search.yaml_file import read_yaml


@dataclass
class ModelConfig:
    # U-Net generators G: X→Y (H&E → stain) and F: Y→X. A Literal, so a typo
    # fails here, before Ray; tests/test_registries.py keeps each closed set
    # equal to its registry (models.GENERATORS here).
    generator: Literal["unet"] = "unet"
    ngf: int = 64  # width of the first U-Net level (CycleGAN reference: 64)
    depth: int = 5  # down-sampling levels; the crop must be divisible by 2**depth
    norm: Literal["instance", "batch", "none"] = "instance"  # reference: instance
    dropout: bool = False  # reference CycleGAN trains without dropout
    attention: Literal["none", "gates", "self", "both"] = "none"
    # gates: attention gates on skip connections (Oktay et al., 2018);
    # self: SAGAN self-attention at the bottleneck (Zhang et al., 2019).
    attention_channels_ratio: float = 0.5  # gate intermediate width / skip width
    # reflect: no dark borders, so tiles of a slide join without seams;
    # zeros: the reference CycleGAN's exact layout.
    padding: Literal["reflect", "zeros"] = "reflect"
    # Decoder upsampling (models.generators.UPSAMPLERS). transpose: the
    # reference's ConvTranspose 4x4 stride 2; resize: bilinear x2 then a 3x3
    # conv, which cannot leave the stride-2 checkerboard of transposed convs
    # (Odena et al., 2016). Default transpose: the reference's layout;
    # bench/checkerboard.py measures the two.
    upsample: Literal["transpose", "resize"] = "transpose"
    # VGG-style discriminators D_X, D_Y: stacks of 3x3 convs, patch output.
    discriminator: Literal["vgg"] = "vgg"
    ndf: int = 64
    d_blocks: int = 3  # stride-2 blocks; receptive field grows with each
    spectral_norm: bool = False  # Miyato et al., 2018; stabilises D


@dataclass
class LossConfig:
    gan_mode: Literal["lsgan", "vanilla", "hinge"] = "lsgan"  # reference: lsgan
    lambda_cycle: float = 10.0  # λ, the CycleGAN paper's value
    # Identity weight as a fraction of λ, as in the reference (0.5 → 0.5·λ).
    lambda_identity: float = 0.5
    r1_gamma: float = 0.0  # R1 penalty (γ/2)·E‖∇D(x_real)‖²; 0 turns it off
    r1_interval: int = 1  # lazy R1: apply every k D steps, scaled by k (StyleGAN2)


@dataclass
class OptimConfig:
    # The keys of optim.OPTIMIZERS; TTUR = a different lr_d from lr_g.
    name: Literal["adam", "optimistic_adam", "extra_adam", "consensus"] = "adam"
    lr_g: float = 2e-4  # reference: 2e-4 for G and D
    lr_d: float | None = None  # None → same as lr_g (no TTUR)
    beta1: float = 0.5  # reference: 0.5, the usual GAN momentum
    beta2: float = 0.999
    weight_decay: float = 0.0
    # torch's fused Adam kernel (one kernel for all parameters; adam only):
    # measured by bench/train_step.py.
    fused: bool = False
    # γ of consensus optimisation (optim.name: consensus; Mescheder et al.,
    # 2017, "The Numerics of GANs"): each player's gradient gets γ·∇½‖v‖², v
    # the joint gradient field of G and D. 10: the paper's value for its
    # CIFAR-10 and CelebA GANs. Ignored by the other optimisers.
    consensus_gamma: float = 10.0


@dataclass
class DataConfig:
    # A folder in one of the supported layouts, or builtin:<name>.
    path: str = "builtin:phantom-trichrome"
    layout: Literal["auto", "cyclegan", "bci", "mist", "pair"] = "auto"
    crop: int = 64  # training crop; reference uses 256 after a 286 resize
    load_size: int | None = None  # resize shorter side first (None: native)
    batch_size: int = 1  # reference: 1
    # DataLoader worker processes; auto: this worker's CPUs minus one (one
    # stays for the training step). 0: with the decoded-image cache a crop
    # costs well under a millisecond, so the main process keeps up with a
    # CPU step without competing for its cores (bench/data_loader.py).
    num_workers: int | Literal["auto"] = 0
    # Decoded-image cache per loader process (MB), so each source image is
    # decoded once per worker instead of once per item. auto: the whole
    # training set if it fits in a quarter of the available RAM (split among
    # the workers), else that quarter; 0 turns it off (decode per item).
    cache_mb: int | Literal["auto"] = "auto"
    flip: bool = True
    rot90: bool = True  # tissue has no up: 90° rotations are free augmentation
    max_images: int | None = None  # cap per domain, for quick runs
    # Evaluation crops tiled from every test image, tissue only, evenly spread
    # (data.eval_crops module). None: 64 on CPU, 512 on a GPU — issue 11's sizes:
    # 4-30x the old 3-16 centre crops, a few CPU-seconds per evaluation at the demo
    # sizes; bench/eval_stability.py measures ranking stability at 16/64/256.
    # Replaces `eval_images` (one centre crop per image).
    eval_crops: int | None = None
    eval_crop: int | None = None  # evaluation crop size (None: crop)
    # Physical pixel size of the training images (µm/px), when neither tile nor
    # slide metadata says (a `data prepare` manifest records it per tile).
    # `export` stores it in model.json, so `translate` reads slides at the
    # resolution G was trained at (0.25 ≈ 40x, 0.5 ≈ 20x scans). None: unknown.
    mpp: float | None = None
    # HED colour augmentation (Tellez et al., 2018, "Whole-slide mitosis
    # detection in H&E breast histology using PHH3 as a reference"): each
    # training H&E crop's haematoxylin, eosin and DAB channels scaled by
    # U(1-σ, 1+σ) and shifted by U(-σ, σ), σ = this value, so G tolerates other
    # labs' staining. 0: off (the reference CycleGAN has none); Tellez et al.
    # found 0.05 (their "HED-light") a safe strength. Searchable in a space.
    hed_jitter: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    # Of the epochs, the last `decay_epochs` decay the LR linearly to zero
    # (reference: 100 constant + 100 decaying).
    decay_epochs: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the larger domain
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA
    pool_size: int = 50  # image history buffer for D (Shrivastava et al.; reference)
    eval_every: int = 1  # epochs between evaluations (the last epoch always)
    checkpoint_every: int = 1
    # Full checkpoints `stain-search train` keeps: the k best by
    # `keep_metric` plus the newest (a resume needs it); None keeps all. 2:
    # a best and a runner-up, so one noisy evaluation cannot leave only a
    # fluke; at the reference's widths each costs ~1.3 GB.
    keep_checkpoints: int | None = 2
    # Metric that ranks checkpoints for `keep_checkpoints`; frechet: fid with
    # the Inception weights, else fd_random (the bundled spaces' objective).
    keep_metric: str = "frechet"
    # Also write G's weights (safetensors, no optimiser state) at every
    # evaluated epoch, for picking an epoch later after retention pruned
    # its full checkpoint.
    generator_snapshots: bool = False
    sample_images: int = 4  # rows of the sample grid
    # Speed switches, off by default, each measured by bench/train_step.py:
    # NHWC memory format (tensor-core convolutions on GPUs) and torch.compile
    # of the networks (D stays eager under R1: its double backward does not
    # compile). Neither changes the checkpoint format.
    channels_last: bool = False
    compile: bool = False


@dataclass
class EvalConfig:
    # Local file with the standard pt_inception-2015-12-05 weights. Without
    # one (and none in torch-fidelity's cache), FID cannot be computed; the
    # Fréchet distance is then taken on fixed random features and logged as
    # `fd_random`, never as `fid`.
    fid_weights: str | None = None
    feature_extractor: Literal["auto", "inception", "random"] = "auto"
    batch_size: int = 8
    ki67_f1: bool = True  # positive-nucleus F1 where the dataset has DAB
    # Target stain for the stain-specific metrics (the keys of
    # metrics.stain.DATASET_STAINS). auto: what the data layer knows (the
    # phantom's own record, the BCI/MIST layouts, a pair layout's IHC/ folder).
    stain: Literal["auto", "ki67", "her2", "ihc", "dab", "trichrome", "pas"] = "auto"
    # KID's random subsets: torch-fidelity's 100; their size, None: half the
    # evaluation crops (at most 1000), so subsets differ and `…_std` means something.
    kid_subsets: int = 100
    kid_subset_size: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, e.g. {"loss.lambda_cycle": 10.0, ...}."""
        return flat_config(self.to_dict())

    def validate(self) -> "Config":
        """Cross-field checks that single types cannot express."""
        m, d = self.model, self.data
        for key, value in [("model.ngf", m.ngf), ("model.depth", m.depth), ("model.ndf", m.ndf),
                           ("model.d_blocks", m.d_blocks), ("data.crop", d.crop),
                           ("data.batch_size", d.batch_size), ("train.epochs", self.train.epochs),
                           ("loss.r1_interval", self.loss.r1_interval),
                           ("train.eval_every", self.train.eval_every),
                           ("eval.kid_subsets", self.eval.kid_subsets)]:
            if value < 1:
                raise ConfigError(f"`{key}` must be at least 1, got {value}")
        for key, value in [("loss.lambda_cycle", self.loss.lambda_cycle),
                           ("loss.lambda_identity", self.loss.lambda_identity),
                           ("loss.r1_gamma", self.loss.r1_gamma),
                           ("optim.consensus_gamma", self.optim.consensus_gamma),
                           ("train.decay_epochs", self.train.decay_epochs)]:
            if value < 0:
                raise ConfigError(f"`{key}` must not be negative, got {value}")
        for key, value in [("optim.lr_g", self.optim.lr_g), ("optim.lr_d", self.optim.lr_d)]:
            if value is not None and not value > 0:
                raise ConfigError(f"`{key}` must be positive, got {value}")
        if self.train.decay_epochs > self.train.epochs:
            raise ConfigError(f"`train.decay_epochs` ({self.train.decay_epochs}) cannot exceed "
                              f"`train.epochs` ({self.train.epochs})")
        for key, size in [("data.crop", d.crop), ("data.eval_crop", d.eval_crop)]:
            if size is not None and size % (2 ** m.depth):
                raise ConfigError(
                    f"`{key}` = {size} is not divisible by 2**model.depth = {2 ** m.depth}: "
                    f"the U-Net halves the image {m.depth} times. Use a crop that is a "
                    f"multiple of {2 ** m.depth} or a smaller `model.depth`.")
        if m.attention in ("self", "both") and d.crop // 2 ** m.depth < 2:
            raise ConfigError(
                f"`model.attention` = {m.attention!r} needs a bottleneck of at least 2x2, but "
                f"data.crop {d.crop} / 2**model.depth {2 ** m.depth} leaves 1x1: use a larger "
                f"crop or a smaller depth (e.g. crop 64, depth 4)")
        if d.crop < 2 ** (m.d_blocks + 1):
            raise ConfigError(f"`data.crop` = {d.crop} is too small for model.d_blocks = "
                              f"{m.d_blocks} (needs at least {2 ** (m.d_blocks + 1)} px)")
        if self.optim.fused and self.optim.name != "adam":
            raise ConfigError(f"`optim.fused` needs `optim.name: adam` (torch's fused kernel); "
                              f"{self.optim.name!r} has none: set `optim.fused: false`")
        if not m.attention_channels_ratio > 0:
            raise ConfigError(f"`model.attention_channels_ratio` must be positive, got "
                              f"{m.attention_channels_ratio}")
        for key, value in [("data.num_workers", d.num_workers), ("data.cache_mb", d.cache_mb)]:
            if value != "auto" and value < 0:
                raise ConfigError(f"`{key}` must be 0 or more (or auto), got {value}")
        if d.mpp is not None and not d.mpp > 0:
            raise ConfigError(f"`data.mpp` must be a positive µm/px (e.g. 0.25 for a 40x scan) "
                              f"or null, got {d.mpp}")
        if not 0 <= d.hed_jitter < 1:
            raise ConfigError(f"`data.hed_jitter` must be in [0, 1) (0.05: Tellez et al.'s "
                              f"light setting), got {d.hed_jitter}")
        if self.train.keep_checkpoints is not None and self.train.keep_checkpoints < 1:
            raise ConfigError(f"`train.keep_checkpoints` must be at least 1 (or null to keep "
                              f"every checkpoint), got {self.train.keep_checkpoints}")
        for key, value in [("data.eval_crops", d.eval_crops),
                           ("eval.kid_subset_size", self.eval.kid_subset_size)]:
            if value is not None and value < 2:
                raise ConfigError(f"`{key}` must be at least 2 (a distance between two sets "
                                  f"needs two samples of each), or null for the default; got {value}")
        return self


SECTIONS: dict[str, type] = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
            "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def field_types(section: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``loss.lambda_cycle``."""
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in field_types(cls)]


def suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" — did you mean `{close[0]}`?" if close else ""


def coerce(value: Any, annotation: Any, *, key: str, where: str) -> Any:
    """Check (and gently coerce int→float) one value against its annotation."""
    origin = get_origin(annotation)
    if origin is Literal:
        options = get_args(annotation)
        if value not in options:
            raise ConfigError(f"{where}`{key}`: {value!r} is not one of "
                              f"{', '.join(map(repr, options))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], key=key, where=where)
        for option in inner:  # e.g. int | Literal["auto"]: the first that fits
            try:
                return coerce(value, option, key=key, where=where)
            except ConfigError:
                pass
        names = [" or ".join(map(repr, get_args(o))) if get_origin(o) is Literal
                 else getattr(o, "__name__", str(o)) for o in inner]
        raise ConfigError(f"{where}`{key}`: expected {' or '.join(names)}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list:
        if isinstance(value, list):
            return value
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where}`{key}`: expected {type_name}, got {value!r} "
                      f"({type(value).__name__})")


# Keys that existed once → what replaced them: an old config fails with the fix.
REMOVED_KEYS: dict[str, str] = {
    "data.eval_images": "evaluation now tiles crops from every test image: use "
                        "`data.eval_crops` (a crop count; null: 64 on CPU, 512 on GPU)",
}


def apply_overrides(config: Config, overrides: Mapping[str, Any], *, where: str = "") -> Config:
    """Return a copy of ``config`` with dotted keys replaced, each one checked."""
    where = f"{where}: " if where else ""
    sections = {name: dataclasses.replace(getattr(config, name)) for name in SECTIONS}
    for key, value in overrides.items():
        if key in REMOVED_KEYS:
            raise ConfigError(f"{where}`{key}` was removed: {REMOVED_KEYS[key]}")
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{where}`{key}`: unknown key{suggest(key, all_keys())}")
        types_ = field_types(SECTIONS[section])
        if name not in types_:
            raise ConfigError(f"{where}`{key}`: unknown key{suggest(key, all_keys())}")
        setattr(sections[section], name, coerce(value, types_[name], key=key, where=where))
    return Config(**sections)


def from_dict(raw: Mapping[str, Any] | None, *, where: str = "") -> Config:
    """Build a validated Config from a nested mapping (sections of keys)."""
    raw = raw or {}
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}expected a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{prefix}`{section}`: unknown section"
                              f"{suggest(str(section), list(SECTIONS))} "
                              f"(sections: {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{prefix}`{section}`: expected a mapping of keys, "
                              f"got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    config = apply_overrides(Config(), flat, where=where)
    try:
        return config.validate()
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


NAME_MAX = 100


def check_name(name: str, *, what: str = "search name") -> str:
    """The one rule for a search's name, wherever it comes from (the space's
    ``name:``, ``--name``, a verb's NAME): it becomes a folder under the
    storage, so it is one path segment of letters, digits, '-' and '_'."""
    name = str(name)
    plain = name.replace("-", "").replace("_", "")
    if not name or len(name) > NAME_MAX or not (plain.isalnum() and plain.isascii()) \
            or name.startswith("-"):
        raise ConfigError(f"{what} {name!r}: use 1-{NAME_MAX} letters, digits, '-' and '_' "
                          f"(no '/', '..' or spaces, not starting with '-')")
    return name


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                overrides_from: str | None = None) -> Config:
    """Load a training config YAML (or the defaults) and apply dotted overrides;
    an override's error names ``overrides_from`` (e.g. ``--set``), not the file."""
    config = from_dict(read_yaml(path), where=str(path)) if path else Config()
    if overrides:
        where = overrides_from or str(path or "overrides")
        config = apply_overrides(config, overrides, where=where).validate()
    return config


def flat_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A config as nested sections (``Config.to_dict()``, a checkpoint's
    ``meta.json``) → dotted keys: {"loss": {"lambda_cycle": 10}} → {"loss.lambda_cycle": 10}.
    Entries that are not sections are left out."""
    return {f"{section}.{k}": v for section, body in (config or {}).items()
            if isinstance(body, dict) for k, v in body.items()}
