"""Virtual cohort: MG breasts of one dataset paired with US images of the same class from another.

No public dataset has mammography and ultrasound of the same patient. A *virtual
patient* is one real MG breast (CDD-CESM, or mini-MIAS as an option) given a few
BUSI ultrasound images of the same class. Read ``docs/virtual-cohort.md`` before
quoting any number obtained on it: MG and US evidence are independent given the
label here, unlike in real patients.

Pairing rule (seeded; per class c, B = MG breasts of class c, U = US images of c)
  1. Quotas. Breasts are put in a seeded random order. If |U| >= |B|, every breast
     gets floor(|U|/|B|) images and the first |U| mod |B| breasts one more, so
     every US image is used and the counts differ by at most one. If |U| < |B|,
     |U| breasts get one image each and the other |B| - |U| breasts get none:
     they are dropped (default) or kept as MG-only cases (``keep_mg_only=True``,
     for models that accept a missing modality).
  2. Filling (which image goes to which breast): US images are taken a BUSI
     near-duplicate group at a time, largest group first (ties in seeded order),
     and each group's images of class c go to the breast that (a) already shares
     a fold group with this near-duplicate group (the same breast, the woman's
     other breast, or anything already linked to it), else (b) has the most room
     left, else (c) whose current fold group is smallest, else (d) comes first in
     the seeded order. This keeps the merged fold groups small (on CDD-CESM x
     BUSI the largest group has about 20 of 372 breasts, against 50-100 for a
     plain shuffle) without changing any breast's quota.
  Each US image is used by exactly one virtual patient.

Virtual patient id = the MG patient id (the two breasts of one CDD-CESM woman
stay two cases of one patient); the US records take the breast's patient id,
side and label; their path stays the BUSI file.

Subgroup attributes (``records.SUBGROUP_COLUMNS``) stay those of each image's own
dataset: the MG images keep their CDD-CESM (or mini-MIAS) source, age bin, density
and machine, the US images their BUSI source. ``records.case_attributes`` then gives
a virtual breast's age bin from its MG side and its source as "BUSI+CDD-CESM".

Groups: union-find over the sources of each kept breast (its MG group, e.g. the
CDD-CESM woman, and the near-duplicate groups of its US images). Breasts that
share any source get one group id, so that no source ever straddles two folds.
The group id is the smallest MG group id in the component (``CDD-P102``...).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..files import write_text
from ..records import ImageRecord, write_manifest
from ..vocab import Label, Modality


@dataclass
class VirtualCohort:
    records: list[ImageRecord]
    report: dict = field(default_factory=dict)

    def write(self, manifest_path: str | os.PathLike) -> Path:
        """Write the manifest CSV and, beside it, ``<name>.report.json``."""
        path = write_manifest(self.records, manifest_path)
        write_text(path.with_name(path.stem + ".report.json"), json.dumps(self.report, indent=2, sort_keys=True) + "\n")
        return path


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def split_counts(n_items: int, n_bins: int) -> list[int]:
    """How many items each of n_bins gets: as even as possible, >= 1 each while items remain."""
    if n_bins <= 0:
        return []
    if n_items < n_bins:
        return [1] * n_items + [0] * (n_bins - n_items)
    base, extra = divmod(n_items, n_bins)
    return [base + 1] * extra + [base] * (n_bins - extra)


def _assign(breast_label: dict[str, Label], breasts: dict[str, list[ImageRecord]],
            us_by_class: dict[Label, list[ImageRecord]], rng: np.random.Generator
            ) -> tuple[dict[str, list[ImageRecord]], dict[Label, list[str]]]:
    """The pairing rule of the module doc: quotas per breast, then a greedy, group-aware fill.

    Returns breast -> its US images, and per class the breasts in their seeded order.
    """
    order: dict[Label, list[str]] = {}
    capacity: dict[str, int] = {}
    rank: dict[str, int] = {}
    for label in Label:
        cids = sorted(c for c, lab in breast_label.items() if lab is label)
        cids = [cids[i] for i in rng.permutation(len(cids))]
        order[label] = cids
        n_us = len(us_by_class.get(label, []))
        quotas = split_counts(n_us, len(cids)) if n_us >= len(cids) else [1] * len(cids)
        for i, (cid, quota) in enumerate(zip(cids, quotas, strict=True)):
            capacity[cid], rank[cid] = quota, i

    # near-duplicate groups split by class; processed largest group first (ties: seeded order)
    portions: dict[tuple[str, Label], list[ImageRecord]] = defaultdict(list)
    group_size: dict[str, int] = defaultdict(int)
    for label, images in us_by_class.items():
        for rec in sorted(images, key=lambda r: r.path):
            portions[(rec.group_id, label)].append(rec)
            group_size[rec.group_id] += 1
    names = sorted(group_size)
    group_rank = {names[i]: r for r, i in enumerate(rng.permutation(len(names)))}
    keys = sorted(portions, key=lambda k: (-group_size[k[0]], group_rank[k[0]], k[1].index))

    uf = _UnionFind()
    comp_breasts: dict[str, int] = defaultdict(int)  # working component -> breasts assigned so far
    assigned: dict[str, list[ImageRecord]] = defaultdict(list)
    for group, label in keys:
        images = [portions[(group, label)][i] for i in rng.permutation(len(portions[(group, label)]))]
        us_key = "us:" + group
        while images:
            candidates = [c for c in order.get(label, []) if capacity[c] > 0]
            if not candidates:
                break  # more US images than breasts can take (only when the class has no breast)
            target = uf.find(us_key)

            def preference(cid: str, target=target) -> tuple:
                root = uf.find("mg:" + breasts[cid][0].group_id)
                return (root != target, -capacity[cid], comp_breasts[root], rank[cid])

            cid = min(candidates, key=preference)
            take = min(capacity[cid], len(images))
            capacity[cid] -= take
            assigned[cid].extend(images[:take])
            images = images[take:]
            mg_root = uf.find("mg:" + breasts[cid][0].group_id)
            us_root = uf.find(us_key)
            moved = comp_breasts.pop(mg_root, 0) + (comp_breasts.pop(us_root, 0) if us_root != mg_root else 0)
            uf.union(mg_root, us_root)
            comp_breasts[uf.find(us_key)] = moved + (1 if len(assigned[cid]) == take else 0)
    return dict(assigned), order


def build_virtual_cohort(mg_records: Sequence[ImageRecord], us_records: Sequence[ImageRecord], seed: int = 0,
                         keep_mg_only: bool = False) -> VirtualCohort:
    """Pair each labelled MG breast with same-class US images (see the module doc for the rule).

    ``report``: per class the MG breasts, US images, breasts kept / dropped / kept
    MG-only, US images used / unused and US images per breast (min, max); unlabeled
    inputs ignored; the number of groups and the largest group (in breasts).
    """
    rng = np.random.default_rng(seed)
    breasts: dict[str, list[ImageRecord]] = defaultdict(list)
    for rec in mg_records:
        if rec.modality is Modality.MG:
            breasts[rec.case_id].append(rec)
    breast_label: dict[str, Label] = {}
    unlabeled_mg: list[str] = []
    for cid, recs in breasts.items():
        labels = {r.label for r in recs}
        if None in labels or len(labels) != 1:
            unlabeled_mg.append(cid)  # no label, or two: cannot be paired by class
        else:
            breast_label[cid] = next(iter(labels))
    us_by_class: dict[Label, list[ImageRecord]] = defaultdict(list)
    unlabeled_us = 0
    for rec in us_records:
        if rec.modality is not Modality.US:
            continue
        if rec.label is None:
            unlabeled_us += 1
        else:
            us_by_class[rec.label].append(rec)

    assigned, order = _assign(breast_label, breasts, us_by_class, rng)
    classes: dict[str, dict] = {}
    for label in Label:
        cids = order[label]
        counts = [len(assigned.get(cid, [])) for cid in cids]
        pool = us_by_class.get(label, [])
        start = sum(counts)
        per = [k for k in counts if k > 0]
        n_without = sum(1 for k in counts if k == 0)
        classes[label.value] = {
            "mg_breasts": len(cids),
            "us_images": len(pool),
            "kept": len(per) + (n_without if keep_mg_only else 0),
            "kept_mg_only": n_without if keep_mg_only else 0,
            "dropped_no_us": 0 if keep_mg_only else n_without,
            "us_used": start,
            "us_unused": len(pool) - start,
            "us_per_breast_min": min(per) if per else 0,
            "us_per_breast_max": max(per) if per else 0,
        }

    kept = [cid for cid in breast_label if assigned.get(cid) or keep_mg_only]
    uf = _UnionFind()
    for cid in kept:
        mg_key = "mg:" + breasts[cid][0].group_id
        uf.find(mg_key)
        for rec in breasts[cid][1:]:
            uf.union(mg_key, "mg:" + rec.group_id)
        for us in assigned.get(cid, []):
            uf.union(mg_key, "us:" + us.group_id)
    component_name: dict[str, str] = {}
    for cid in kept:
        for rec in breasts[cid]:
            root = uf.find("mg:" + rec.group_id)
            name = component_name.get(root)
            if name is None or rec.group_id < name:
                component_name[root] = rec.group_id

    records: list[ImageRecord] = []
    group_sizes: dict[str, int] = defaultdict(int)
    for cid in kept:
        mg = breasts[cid]
        group = component_name[uf.find("mg:" + mg[0].group_id)]
        group_sizes[group] += 1
        records.extend(replace(rec, group=group) for rec in mg)
        head = mg[0]
        records.extend(  # replace() keeps each image's own subgroup attributes (module doc)
            replace(us, patient_id=head.patient_id, side=head.side, label=breast_label[cid], group=group)
            for us in assigned.get(cid, [])
        )
    report = {
        "seed": seed,
        "keep_mg_only": keep_mg_only,
        "classes": classes,
        "breasts_kept": len(kept),
        "breasts_dropped": sum(c["dropped_no_us"] for c in classes.values()),
        "mg_breasts_unlabeled_ignored": len(unlabeled_mg),
        "us_images_unlabeled_ignored": unlabeled_us,
        "groups": len(group_sizes),
        "largest_group_breasts": max(group_sizes.values(), default=0),
    }
    return VirtualCohort(records, report)
