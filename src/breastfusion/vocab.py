"""The one vocabulary of breastfusion: classes, modalities, sides, views, image kinds.

Every other module speaks these names; nothing spells them as loose strings.
The order of `Label` is the order of the model's three logits (paper: normal 0,
benign 1, malignant 2).
"""

from __future__ import annotations

from enum import StrEnum


class _Named(StrEnum):
    """A string enum whose value is what files and configs hold."""

    @classmethod
    def parse(cls, text: str):
        """Parse a value case-insensitively; raise ValueError naming the choices."""
        key = str(text).strip()
        for member in cls:
            if key.lower() in (member.value.lower(), member.name.lower()):
                return member
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown {cls.__name__.lower()} {text!r} (expected one of: {choices})")


class Label(_Named):
    NORMAL = "normal"
    BENIGN = "benign"
    MALIGNANT = "malignant"

    @property
    def index(self) -> int:
        return LABELS.index(self)


LABELS: tuple[Label, ...] = (Label.NORMAL, Label.BENIGN, Label.MALIGNANT)
CLASS_NAMES: tuple[str, ...] = tuple(label.value for label in LABELS)
N_CLASSES = len(LABELS)


class Modality(_Named):
    MG = "MG"  # mammography
    US = "US"  # breast ultrasound


class Side(_Named):
    LEFT = "L"
    RIGHT = "R"

    @property
    def opposite(self) -> Side:
        return Side.RIGHT if self is Side.LEFT else Side.LEFT


class View(_Named):
    CC = "CC"
    MLO = "MLO"
    OTHER = "OTHER"  # kept in manifests, flagged, not used by the MG branch
    NONE = ""  # ultrasound images have no mammographic view


class Kind(_Named):
    """Mammogram image kind: standard 2D or synthesized 2D from tomosynthesis."""

    STANDARD = "2D"
    SYNTHESIZED = "synthesized"  # Hologic C-View, Siemens Insight 2D, GE V-Preview
    NONE = ""  # ultrasound


class MGSlot(tuple):
    """One of the MG branch's input positions: a (view, kind) pair of the breast itself, or,
    `contralateral`, the same view and kind of the woman's other breast (a bilateral MG branch,
    `model.bilateral`; models/bilateral.py)."""

    CONTRALATERAL = "contralateral"

    def __new__(cls, view: View, kind: Kind, contralateral: bool = False):
        return super().__new__(cls, (View(view), Kind(kind), bool(contralateral)))

    def __getnewargs__(self) -> tuple[View, Kind, bool]:  # pickling (instances sent to fold workers)
        return tuple(self)

    @property
    def view(self) -> View:
        return self[0]

    @property
    def kind(self) -> Kind:
        return self[1]

    @property
    def contralateral(self) -> bool:
        return self[2]

    @property
    def own(self) -> MGSlot:
        """The same view and kind of the breast itself."""
        return MGSlot(self.view, self.kind)

    @property
    def of_other_breast(self) -> MGSlot:
        return MGSlot(self.view, self.kind, contralateral=True)

    @property
    def name(self) -> str:
        own = f"{self.view.value}-{self.kind.value}"
        return f"{own}-{self.CONTRALATERAL}" if self.contralateral else own

    @classmethod
    def parse(cls, text: str) -> MGSlot:
        text = str(text).strip()
        other = text.lower().endswith("-" + cls.CONTRALATERAL)
        if other:
            text = text[: -len(cls.CONTRALATERAL) - 1]
        view, _, kind = text.partition("-")
        return cls(View.parse(view), Kind.parse(kind), other)


# The paper's four MG images per breast, in the MG branch's input order.
MG_SLOTS: tuple[MGSlot, ...] = (
    MGSlot(View.CC, Kind.STANDARD),
    MGSlot(View.MLO, Kind.STANDARD),
    MGSlot(View.CC, Kind.SYNTHESIZED),
    MGSlot(View.MLO, Kind.SYNTHESIZED),
)
