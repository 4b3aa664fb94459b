"""Instances: the unit the network sees.

Paper: one instance = one US image + the same MG images of that breast; a
case with k US images yields k instances. A MG-only model sees one instance
per case; a US-only model one per US image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..records import Case, ImageRecord
from ..vocab import Label, MGSlot, Modality


@dataclass(frozen=True)
class Instance:
    instance_id: str
    case_id: str
    group: str
    label: Label | None
    mg: tuple[ImageRecord | None, ...] = ()  # one entry per MG slot, None where missing
    us: ImageRecord | None = None

    @property
    def mg_mask(self) -> tuple[bool, ...]:
        return tuple(r is not None for r in self.mg)


def modality_images(items: Iterable[Instance], modality: Modality) -> list[ImageRecord]:
    """The images of `modality` these instances show, each once, in the order first seen (a
    patient's MG views are shared by its instances: what a backbone has to encode)."""
    found: dict[str, ImageRecord] = {}
    for inst in items:
        for rec in inst.mg if modality is Modality.MG else (inst.us,):
            if rec is not None:
                found.setdefault(rec.path, rec)
    return list(found.values())


def build_instances(cases: Iterable[Case], modalities: Sequence[Modality],
                    slots: Sequence[MGSlot]) -> tuple[list[Instance], Counter]:
    """Instances for a model of these modalities; also counts of cases left out, by reason."""
    instances: list[Instance] = []
    skipped: Counter = Counter()
    use_mg, use_us = Modality.MG in modalities, Modality.US in modalities
    for case in cases:
        mg = tuple(case.mg.get(slot) for slot in slots) if use_mg else ()
        if use_mg and not any(mg):
            skipped["no MG image in the model's views"] += 1
            continue
        if use_us and not case.us:
            skipped["no US image"] += 1
            continue
        if use_us:
            for rec in case.us:
                iid = f"{case.case_id}#{_stem(rec.path)}"
                instances.append(Instance(iid, case.case_id, case.group, case.label, mg, rec))
        else:
            instances.append(Instance(f"{case.case_id}#MG", case.case_id, case.group, case.label, mg))
    return instances, skipped


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]
