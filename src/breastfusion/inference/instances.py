"""Instances: the unit the network sees.

Paper: one instance = one US image + the same MG images of that breast; a
case with k US images yields k instances. A MG-only model sees one instance
per case; a US-only model one per US image. A bilateral MG branch's slots
(`MGSlot.contralateral`) are filled from the same patient's other breast.
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
    mg: tuple[ImageRecord | None, ...] = ()  # one entry per MG slot (the model's `slots`), None where missing
    us: ImageRecord | None = None
    slots: tuple[MGSlot, ...] = ()  # the slot of each entry of `mg`

    def __post_init__(self) -> None:
        if len(self.slots) != len(self.mg):
            raise ValueError(f"instance {self.instance_id}: {len(self.mg)} MG entries for {len(self.slots)} slots")

    @property
    def mg_mask(self) -> tuple[bool, ...]:
        return tuple(r is not None for r in self.mg)

    @property
    def own_mg(self) -> list[tuple[MGSlot, ImageRecord]]:
        """The present MG images of the breast itself (not of the other breast), with their slots."""
        return _own_images(self.slots, self.mg)


def _own_images(slots: Sequence[MGSlot], mg: Sequence[ImageRecord | None]) -> list[tuple[MGSlot, ImageRecord]]:
    return [(s, r) for s, r in zip(slots, mg, strict=True) if r is not None and not s.contralateral]


def modality_images(items: Iterable[Instance], modality: Modality) -> list[ImageRecord]:
    """The images of `modality` these instances show, each once, in the order first seen (a
    patient's MG views are shared by its instances: what a backbone has to encode)."""
    found: dict[str, ImageRecord] = {}
    for inst in items:
        for rec in inst.mg if modality is Modality.MG else (inst.us,):
            if rec is not None:
                found.setdefault(rec.path, rec)
    return list(found.values())


def build_instances(cases: Iterable[Case], modalities: Sequence[Modality], slots: Sequence[MGSlot],
                    context: Iterable[Case] | None = None) -> tuple[list[Instance], Counter]:
    """Instances for a model of these modalities; also counts of cases left out, by reason.
    A contralateral slot is filled from the case of the same patient's other breast, looked up
    in `context` (default: `cases`; a caller that predicts a few cases of a larger manifest at a
    time passes the whole manifest); a case needs one MG image of its own."""
    cases = list(cases)
    breasts = {(c.patient_id, c.side): c for c in (cases if context is None else context)}
    instances: list[Instance] = []
    skipped: Counter = Counter()
    use_mg, use_us = Modality.MG in modalities, Modality.US in modalities
    slots = tuple(slots) if use_mg else ()
    for case in cases:
        mg = tuple(_slot_image(case, breasts, slot) for slot in slots)
        if use_mg and not _own_images(slots, mg):
            skipped["no MG image in the model's views"] += 1
            continue
        if use_us and not case.us:
            skipped["no US image"] += 1
            continue
        if use_us:
            for rec in case.us:
                iid = f"{case.case_id}#{_stem(rec.path)}"
                instances.append(Instance(iid, case.case_id, case.group, case.label, mg, rec, slots))
        else:
            instances.append(Instance(f"{case.case_id}#MG", case.case_id, case.group, case.label, mg,
                                      slots=slots))
    return instances, skipped


def _slot_image(case: Case, breasts: dict, slot: MGSlot) -> ImageRecord | None:
    if not slot.contralateral:
        return case.mg.get(slot)
    other = breasts.get((case.patient_id, case.side.opposite))
    return other.mg.get(slot.own) if other is not None else None


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]
