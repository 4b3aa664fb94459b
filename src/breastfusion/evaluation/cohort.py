"""The cohort table (the paper's Table 2) of a manifest: who is in it, per class, PHI-safe.

`cohort_table(manifest)` returns a JSON-able dict; `cohort_markdown(table)` prints it. Columns:
normal, benign, malignant (an "unlabeled" column only when some breast has no label), total.
Sections:
  * cohort: patients, breasts (cases), MG images, US images;
  * MG views and image kinds: breasts having an image in each MG slot (CC 2D, MLO 2D, CC
    synthesized, MLO synthesized; `vocab.MG_SLOTS`, as `Manifest.cases()` fills them);
  * US images per breast: mean and range over the column's breasts (0 for a breast without US);
  * one section per subgroup column (`records.SUBGROUP_COLUMNS`) that some image fills: breasts
    per value, a breast's value being `records.case_attributes` (values of its images joined
    with "+"), "unknown" when none of its images gives one.

Privacy: every count cell of 1 to 4 (patients, breasts, and images, which bound them) is the
string "<5", in the dict and in the markdown alike; 0 stays 0. Patient ids, paths and exact
ages never appear (manifests hold ages as 10-year bins only). A patient whose breasts fall in
two classes counts once in each of them and once in the total.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..records import SUBGROUP_COLUMNS, ImageRecord, Manifest, case_attributes
from ..vocab import CLASS_NAMES, MG_SLOTS, Modality

SMALL = "<5"  # what a count of 1-4 prints as
UNLABELED = "unlabeled"
TOTAL = "total"
UNKNOWN = "unknown"
SECTION_TITLES = {
    "source": "dataset source (breasts)",
    "age_bin": "age at study, 10-year bins (breasts)",
    "manufacturer": "manufacturer (breasts)",
    "model_name": "device model (breasts)",
    "density": "breast density (breasts)",
}


def suppress(n: int) -> int | str:
    """A count as shown: 0 and 5 or more as they are, 1-4 as "<5"."""
    return SMALL if 0 < n < 5 else int(n)


def cohort_table(manifest: Manifest) -> dict:
    """Table 2 of a manifest as a JSON-able dict: {"columns": [...], "sections": [{"title",
    "rows": [{"row": name, column: value, ...}]}], "notes": [...]} (see the module doc)."""
    cases: dict[str, list[ImageRecord]] = defaultdict(list)
    for rec in manifest.records:
        cases[rec.case_id].append(rec)
    by_case = manifest.cases()
    labels = {cid: next((r.label for r in recs if r.label is not None), None) for cid, recs in cases.items()}
    column_of = {cid: label.value if label is not None else UNLABELED for cid, label in labels.items()}
    columns = [*CLASS_NAMES, *([UNLABELED] if UNLABELED in column_of.values() else []), TOTAL]

    def members(column: str) -> list[str]:
        return [cid for cid, c in column_of.items() if column in (c, TOTAL)]

    def count_row(name: str, count) -> dict:
        return {"row": name, **{c: suppress(count(members(c))) for c in columns}}

    cohort = [
        count_row("patients", lambda cids: len({cases[c][0].patient_id for c in cids})),
        count_row("breasts (cases)", len),
        count_row("MG images", lambda cids: sum(r.modality is Modality.MG for c in cids for r in cases[c])),
        count_row("US images", lambda cids: sum(r.modality is Modality.US for c in cids for r in cases[c])),
    ]
    slots = [count_row(f"{slot.view.value} {slot.kind.value}",
                       lambda cids, slot=slot: sum(slot in by_case[c].mg for c in cids)) for slot in MG_SLOTS]
    us_counts = {c: len(by_case[c].us) for c in cases}
    us = [
        {"row": "mean", **{c: _mean([us_counts[cid] for cid in members(c)]) for c in columns}},
        {"row": "range", **{c: _range([us_counts[cid] for cid in members(c)]) for c in columns}},
    ]
    sections = [
        {"title": "cohort", "rows": cohort},
        {"title": "MG views and image kinds (breasts with the image)", "rows": slots},
        {"title": "US images per breast", "rows": us},
    ]
    for column in SUBGROUP_COLUMNS:
        if not any(getattr(rec, column) for rec in manifest.records):
            continue
        value_of = {cid: case_attributes(recs, column) or UNKNOWN for cid, recs in cases.items()}
        values = sorted(set(value_of.values()), key=_value_order)
        rows = [count_row(value, lambda cids, value=value, value_of=value_of: sum(value_of[c] == value for c in cids))
                for value in values]
        sections.append({"title": SECTION_TITLES.get(column, column), "column": column, "rows": rows})
    notes = [
        "Counts of 1 to 4 are shown as <5.",
        "A patient whose breasts fall in two classes counts in each of them and once in the total.",
        "A breast whose images give several values (e.g. MG and US from two sources) is counted "
        "under the values joined with '+'.",
    ]
    return {"columns": columns, "sections": sections, "notes": notes}


def cohort_markdown(table: dict) -> str:
    """The table of `cohort_table` as one markdown table, a bold line per section, then its notes."""
    columns = table["columns"]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for section in table["sections"]:
        lines.append(f"| **{section['title']}** |" + " |" * len(columns))
        for row in section["rows"]:
            lines.append(f"| {row['row']} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join([*lines, "", *table.get("notes", [])]) + "\n"


def _mean(values: list[int]) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "-"


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if values else "-"


def _value_order(value: str) -> tuple:
    """Natural order ("9" before "10": age bins in age order), "unknown" last."""
    return (value == UNKNOWN, [(0, int(t), "") if t.isdigit() else (1, 0, t.lower())
                               for t in re.split(r"(\d+)", value) if t])
