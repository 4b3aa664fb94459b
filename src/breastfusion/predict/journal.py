"""What a long prediction batch has finished, kept on disk so that an interrupted batch resumes
without redoing a finished patient.

`predict_batch` predicts patients a chunk at a time; after a chunk's heatmaps and reports are
written, the chunk's rows (patients, instances, the worklist's per-patient results, what was
skipped, refused, noted or failed) go into one file, ``OUT/.partial/chunk-<hash>.json``,
written atomically: a chunk is either recorded whole or not at all (then it is predicted
again). ``fingerprint.json`` holds what the rows depend on (the bundle's checksums, heatmaps
on or off); a journal made with another bundle or other settings is discarded. When the batch
is complete its final files are written from the journal and the journal is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..files import write_text
from .html import InstanceRow, PatientResult

log = logging.getLogger(__name__)

FOLDER = ".partial"


class Journal:
    def __init__(self, out_dir: Path, fingerprint: dict):
        self.dir = Path(out_dir) / FOLDER
        self.fingerprint = fingerprint
        known = self.dir / "fingerprint.json"
        if self.dir.is_dir():
            try:
                same = json.loads(known.read_text(encoding="utf-8")) == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                log.warning("%s: left by a batch with another model or settings; starting afresh", self.dir)
                shutil.rmtree(self.dir)
        if not self.dir.is_dir():
            write_text(known, json.dumps(fingerprint, indent=1))

    def chunks(self) -> list[dict]:
        out = []
        for file in sorted(self.dir.glob("chunk-*.json")):
            try:
                out.append(json.loads(file.read_text(encoding="utf-8")))
            except (OSError, ValueError):  # cannot happen with atomic writes; redo the chunk if it does
                log.warning("%s: unreadable, its patients are predicted again", file)
        return out

    def done(self) -> set[str]:
        """Case ids finished (predicted, or failed with a reason) by earlier chunks."""
        return {case for chunk in self.chunks() for case in chunk["cases"]}

    def add(self, cases: list[str], pred, reports: dict[str, str]) -> None:
        """Record one finished chunk: `pred` a `run.Prediction` of these `cases` (panels are not kept)."""
        name = hashlib.sha256("\n".join(cases).encode()).hexdigest()[:16]
        chunk = {
            "cases": cases,
            "patients": json.loads(pred.patients.to_json(orient="records")),
            "instances": json.loads(pred.instances.to_json(orient="records")),
            "results": [{**asdict(r), "panels": []} for r in pred.results],
            "reports": reports,
            "skipped": dict(pred.skipped),
            "refused": pred.refused,
            "notes": {k: list(v) for k, v in pred.notes.items()},
            "failed": pred.failed,
        }
        write_text(self.dir / f"chunk-{name}.json", json.dumps(chunk))

    def load(self, columns: tuple[list[str], list[str]]) -> tuple[dict, dict[str, str]]:
        """Everything recorded: (the fields of a Prediction, case id -> report path)."""
        instance_columns, patient_columns = columns
        chunks = self.chunks()
        results = [PatientResult(**{**r, "instances": [InstanceRow(**i) for i in r["instances"]]})
                   for c in chunks for r in c["results"]]
        fields = {
            "instances": pd.DataFrame([row for c in chunks for row in c["instances"]], columns=instance_columns),
            "patients": pd.DataFrame([row for c in chunks for row in c["patients"]], columns=patient_columns),
            "results": results,
            "skipped": sum((Counter(c["skipped"]) for c in chunks), Counter()),
            "refused": {k: v for c in chunks for k, v in c["refused"].items()},
            "notes": {k: tuple(v) for c in chunks for k, v in c["notes"].items()},
            "failed": {k: v for c in chunks for k, v in c["failed"].items()},
        }
        return fields, {k: v for c in chunks for k, v in c["reports"].items()}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
