"""Prediction on new patients with a bundle, with no physician input.

INPUT (a DICOM study folder, a folder of images, or a manifest) -> ingest ->
preprocessing (cached) -> backbone features -> every fold's head -> calibrated
ensemble probabilities per instance -> patient probabilities (mean) and triage
class (vote and mean) -> operating-point decision -> files.

MG once: a patient's MG images are the same in each of its k instances (one per
US image), so each distinct image goes through each distinct backbone exactly
once (`FeatureBank`) and the heads receive the stored features. Folds whose
backbone was frozen in training share one backbone module (see bundle.py), so
an MG image is then encoded once for the whole ensemble.

Output folder::

    predictions.csv     one row per patient: probabilities, triage (vote, mean), decision
    instances.csv       one row per instance (US image) with its probabilities and notes (views
                        missing, preprocessing fallbacks such as "whole image kept")
    predictions.json    both, plus the model, the operating points, the refusals, the patients
                        that failed (with the reason) and the preprocessing notes per reason
    heatmaps/CASE/*.png Grad-CAM overlays (and *.npy with --save-arrays)
    reports/CASE.html   one self-contained report per patient
    worklist.csv, worklist.html   patients ranked by malignant probability

`runtime` "onnx" / "onnx-int8" (``predict --runtime``): the bundle's ONNX graphs on ONNX Runtime
compute the logits instead (predict/onnx.py), everything else unchanged; no heatmaps then.

`predict_batch` (the CLI) streams: a chunk of patients at a time, recorded in ``.partial/``
(journal.py) so that memory stays bounded and an interrupted batch resumes; one patient
whose prediction fails is reported in ``failed_patients`` and the batch goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..errors import CohortError, WeightsError
from ..evaluation.aggregate import PROBA_COLUMNS, aggregate
from ..evaluation.decision import decide
from ..explain.gradcam import explain_instance
from ..files import atomic_path, safe_name, write_text
from ..inference.batches import bounded_spans, instance_batch
from ..inference.encode import trained_features, trained_part
from ..inference.images import Screening, image_source, screen, without_failed
from ..inference.instances import Instance, build_instances, modality_images
from ..inference.runtime import memory_format, pick_device, tensor_to
from ..locks import RunLock
from ..models.backbones import Backbone
from ..models.network import FusionHead
from ..preprocess.mammo import NOTES
from ..preprocess.pipeline import ImageSource
from ..provenance import stamp
from ..records import Case, ImageRecord, Manifest
from ..vocab import CLASS_NAMES, Modality
from .bundle import Bundle
from .html import ImagePanel, InstanceRow, PatientResult, overlay_png, write_patient_report, write_worklist
from .journal import Journal

log = logging.getLogger(__name__)

CHUNK_PATIENTS = 32  # patients predicted (and held in memory with their heatmaps) at a time by predict_batch


class FeatureBank:
    """Backbone features of images, computed once per (backbone module, image), in the
    arithmetic the model was trained with (`inference.encode.trained_features`; memory layout
    as `train.channels_last`)."""

    def __init__(self, source: ImageSource, device: torch.device, train: TrainConfig, batch_size: int = 32):
        self.source, self.device, self.batch_size = source, device, batch_size
        self.train = train
        self._store: dict[tuple[int, str], torch.Tensor] = {}

    def encode(self, backbone: Backbone, records: list[ImageRecord]) -> None:
        todo = list({r.path: r for r in records if (id(backbone), r.path) not in self._store}.values())
        if not todo:  # e.g. the folds share a frozen backbone: the first fold encoded everything
            return
        backbone.eval()
        chunks = [todo[a:b] for a, b in bounded_spans(len(todo), self.batch_size)]
        # the next chunk is read from the cache while the backbone works on this one
        with torch.no_grad(), memory_format(backbone, self.train.channels_last) as cl, \
                ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self._images, chunks[0], cl)
            for k, chunk in enumerate(chunks):
                images = pending.result()
                if k + 1 < len(chunks):
                    pending = reader.submit(self._images, chunks[k + 1], cl)
                batch = tensor_to(images, self.device, cl)
                feats = trained_features(backbone, batch, self.train).cpu()
                for rec, feat in zip(chunk, feats, strict=True):
                    self._store[(id(backbone), rec.path)] = feat

    def _images(self, records: list[ImageRecord], channels_last: bool) -> torch.Tensor:
        """(N, 1, S, S) preprocessed images from the cache, in the layout the backbone takes
        (for a CPU backbone, `tensor_to` then has nothing left to do in the main thread)."""
        images = torch.stack([torch.from_numpy(self.source.get(r.path, r.modality, r.side))
                              for r in records]).unsqueeze(1)
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    def get(self, backbone: Backbone, path: str) -> torch.Tensor:
        return self._store[(id(backbone), path)]


def head_inputs(net, bank: FeatureBank, items: list[Instance], device: torch.device) -> dict:
    """The head's inputs for these instances, gathered from the bank (zeros for missing views).

    With the paper's head, the MG branch (view MLP, view attention, embedding) runs once per
    patient, on its MG views, and its result is reused for each of the patient's instances
    ("mg_branch"); the plain head gets per-instance MG features."""
    out: dict[str, torch.Tensor] = {}
    mods = net.head.modalities
    if Modality.MG in mods:
        bb = net.backbone(Modality.MG)
        feats, mask, rows = mg_views(bank, bb, bb.out_dim, items, device)
        if isinstance(net.head, FusionHead):
            emb, weights = net.head.mg(feats, mask)
            out["mg_branch"] = (emb[rows], weights[rows])
        else:
            out["mg_feat"], out["mg_mask"] = feats[rows], mask[rows]
    if Modality.US in mods:
        bb = net.backbone(Modality.US)
        out["us_feat"] = torch.stack([bank.get(bb, inst.us.path) for inst in items]).to(device)
    return out


def mg_views(bank: FeatureBank, backbone, dim: int, items: list[Instance], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each patient's MG view features once, (P, V, dim) with zeros for missing views, their
    mask (P, V), and each instance's patient row (N,); `backbone`: the bank's key."""
    per_case: dict[str, Instance] = {}  # each case's first instance (all carry its MG views)
    for inst in items:
        per_case.setdefault(inst.case_id, inst)
    row_of = {case_id: k for k, case_id in enumerate(per_case)}
    mask = torch.tensor([inst.mg_mask for inst in per_case.values()], dtype=torch.bool, device=device)
    feats = torch.stack([
        torch.stack([bank.get(backbone, r.path) if r is not None else torch.zeros(dim) for r in inst.mg])
        for inst in per_case.values()]).to(device)
    rows = torch.tensor([row_of[inst.case_id] for inst in items], device=device)
    return feats, mask, rows


def ensemble_logits(bundle: Bundle, items: list[Instance], source: ImageSource,
                    device: torch.device, runtime: str = "torch") -> list[np.ndarray]:
    """(N, 3) logits per fold network, MG-once through a shared FeatureBank; `runtime` "onnx"
    or "onnx-int8": the bundle's ONNX graphs on ONNX Runtime (predict/onnx.py) instead."""
    if runtime != "torch":
        from .onnx import onnx_nets

        return onnx_nets(bundle, runtime).logits(items, source)
    train = bundle.config.train
    bank = FeatureBank(source, device, train)
    out = []
    with contextlib.ExitStack() as layouts:  # every net in its layout once, not per backbone call
        for net in bundle.nets:
            if any(p.device != device for p in net.parameters()):
                net.to(device)
            net.eval()
            layouts.enter_context(memory_format(net, train.channels_last))
        for net in bundle.nets:
            for m in net.head.modalities:
                bank.encode(net.backbone(m), modality_images(items, m))
            with torch.no_grad(), trained_part(device, train):
                out.append(net.head(**head_inputs(net, bank, items, device)).logits.float().cpu().numpy())
    return out


@dataclass
class Prediction:
    """What `predict` found: tables, per-patient results (for reports) and what it could not use."""

    instances: pd.DataFrame
    patients: pd.DataFrame
    results: list[PatientResult]
    skipped: Counter = field(default_factory=Counter)
    refused: dict[str, str] = field(default_factory=dict)  # image path -> why preprocessing refused it
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # image path -> preprocessing notes
    failed: dict[str, str] = field(default_factory=dict)  # case id -> why the patient could not be predicted

    @classmethod
    def empty(cls, **what) -> Prediction:
        return cls(pd.DataFrame(columns=INSTANCE_COLUMNS), pd.DataFrame(columns=PATIENT_COLUMNS), [], **what)

    @classmethod
    def merged(cls, parts: list[Prediction]) -> Prediction:
        out = cls.empty()
        for part in parts:
            out.results += part.results
            out.skipped.update(part.skipped)
            out.refused.update(part.refused)
            out.notes.update(part.notes)
            out.failed.update(part.failed)
        frames = [p for p in parts if len(p.patients)]
        if frames:
            out.instances = pd.concat([p.instances for p in frames], ignore_index=True)
            out.patients = pd.concat([p.patients for p in frames], ignore_index=True)
        return out

    def note_counts(self) -> dict[str, int]:
        """Images used per preprocessing note (whole image kept, colour greyed, ...)."""
        return Screening(notes=self.notes).counts()


INSTANCE_COLUMNS = ["instance_id", "case_id", "us_image", *PROBA_COLUMNS, "notes"]
PATIENT_COLUMNS = ["case_id", *PROBA_COLUMNS, "n_instances", "triage_vote", "triage_mean", "decision"]


def predict(manifest: Manifest, bundle: Bundle, cache_dir: str | os.PathLike = ".cache/breastfusion",
            heatmaps: bool = True, device: str = "auto", progress: bool = True, runtime: str = "torch") -> Prediction:
    """Every patient of `manifest`, in memory (heatmaps included): for a few hundred patients;
    `predict_batch` streams any number to a folder. `runtime`: "torch", or "onnx" / "onnx-int8"
    (the bundle's ONNX graphs on ONNX Runtime; no heatmaps)."""
    heatmaps = runtime_ready(bundle, runtime, heatmaps)
    cfg = bundle.config
    cases = list(manifest.cases().values())
    log.info("predicting %d patient(s), %d image(s) with %s (%d fold networks)", len(cases), _images(cases),
             bundle.version, len(bundle.meta.folds))
    pred = predict_cases(cases, bundle, image_source(cfg, cache_dir), pick_device(device), heatmaps, progress,
                         runtime)
    _nothing_predicted(pred, cfg)
    return pred


def runtime_ready(bundle: Bundle, runtime: str, heatmaps: bool) -> bool:
    """Load `runtime`'s graphs now (a bundle without them fails here, not once per patient);
    returns whether heatmaps are made: Grad-CAM runs on the PyTorch runtime only."""
    if runtime == "torch":
        if not bundle.nets:
            raise WeightsError(f"{bundle.root}: loaded without its PyTorch networks (load_bundle(networks=False))")
        return heatmaps
    from .onnx import onnx_nets

    onnx_nets(bundle, runtime)
    if heatmaps:
        log.warning("heatmaps skipped: Grad-CAM runs on the PyTorch runtime only (predicting with %s)", runtime)
    return False


def _images(cases: list[Case]) -> int:
    return len({r.path for c in cases for r in (*c.mg.values(), *c.us)})


def _nothing_predicted(pred: Prediction, cfg) -> None:
    if len(pred.patients):
        return
    if pred.failed:
        case, reason = next(iter(pred.failed.items()))
        raise CohortError(f"no patient could be predicted; {len(pred.failed)} failed, first {case}: {reason}")
    raise CohortError(f"no patient has the images this model needs (one of {', '.join(cfg.model.mg_slots)} "
                      f"for MG, one US image for US): {dict(pred.skipped)}")


def predict_cases(cases: list[Case], bundle: Bundle, source: ImageSource, dev: torch.device,
                  heatmaps: bool = True, progress: bool = True, runtime: str = "torch",
                  context: list[Case] | None = None) -> Prediction:
    """Predict these cases. A patient whose prediction raises is reported in `failed` with the
    reason, and the others are predicted: one bad study never stops a batch. `context`: the
    cases in which a bilateral model finds each breast's other breast (default: `cases`)."""
    cfg = bundle.config
    context = cases if context is None else context
    instances, skipped = build_instances(cases, cfg.model.modality_set, cfg.model.slots, context)
    records = list({r.path: r for i in instances for r in (*i.mg, i.us) if r is not None}.values())
    screening = screen(records, source, progress)
    for reason in screening.refused.values():
        log.warning("image refused by preprocessing: %s", reason)
    instances = without_failed(instances, screening.refused, skipped)
    for reason, count in skipped.items():
        log.warning("not predicted: %d %s", count, reason)
    found = {"skipped": skipped, "refused": screening.refused, "notes": screening.notes}
    if not instances:
        return Prediction.empty(**found)
    try:
        return _predicted(instances, bundle, source, dev, heatmaps, progress, **found, runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - reported per patient below, never silently
        if len(cases) > 1:  # find the patient(s) it came from; the others are predicted
            log.warning("a patient of this batch failed (%s); predicting them one by one", _one_line(exc))
            return Prediction.merged([predict_cases([c], bundle, source, dev, heatmaps, False, runtime, context)
                                      for c in cases])
        log.warning("%s: not predicted: %s", cases[0].case_id, _one_line(exc))
        log.debug("traceback of the failure", exc_info=True)
        return Prediction.empty(**found, failed={cases[0].case_id: _one_line(exc)})


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _predicted(instances: list[Instance], bundle: Bundle, source: ImageSource, dev: torch.device, heatmaps: bool,
               progress: bool, skipped: Counter, refused: dict[str, str],
               notes: dict[str, tuple[str, ...]], runtime: str = "torch") -> Prediction:
    probs = bundle.probabilities(ensemble_logits(bundle, instances, source, dev, runtime))
    table = pd.DataFrame({"instance_id": [i.instance_id for i in instances],
                          "case_id": [i.case_id for i in instances],
                          "us_image": [Path(i.us.path).name if i.us is not None else "" for i in instances],
                          "label": -1})
    table[PROBA_COLUMNS] = probs
    table["notes"] = ["; ".join(_image_notes(i, notes)) for i in instances]
    by_vote, by_mean = aggregate(table, "vote"), aggregate(table, "mean")
    points = bundle.points
    patients = by_mean[["case_id", *PROBA_COLUMNS, "n_instances"]].copy()
    patients["triage_vote"] = [CLASS_NAMES[k] for k in by_vote["pred"]]
    patients["triage_mean"] = [CLASS_NAMES[k] for k in by_mean["pred"]]
    patients["decision"] = [decide(row, points) for row in by_mean[PROBA_COLUMNS].to_numpy(float)]
    log.info("decisions: %s", ", ".join(f"{n} {d}" for d, n in patients["decision"].value_counts().items()))
    results = []
    by_case: dict[str, list[int]] = {}
    for k, inst in enumerate(instances):
        by_case.setdefault(inst.case_id, []).append(k)
    for _, row in tqdm(list(patients.iterrows()), desc="explain", unit="patient",
                       disable=not (progress and heatmaps), leave=False):
        items = [instances[k] for k in by_case[row["case_id"]]]
        target = CLASS_NAMES.index(row["triage_mean"])
        panels = _panels(bundle, items, source, dev, target) if heatmaps else []
        results.append(PatientResult(
            case_id=row["case_id"],
            probabilities={c: float(row[f"p_{c}"]) for c in CLASS_NAMES},
            triage_vote=row["triage_vote"], triage_mean=row["triage_mean"], decision=row["decision"],
            instances=[InstanceRow(instances[k].instance_id, table["us_image"][k],
                                   {c: float(probs[k, j]) for j, c in enumerate(CLASS_NAMES)})
                       for k in by_case[row["case_id"]]],
            panels=panels,
            warnings=_warnings(items, notes),
        ))
    return Prediction(table.drop(columns="label"), patients, results, skipped, refused, notes)


def _image_notes(inst: Instance, notes: dict[str, tuple[str, ...]]) -> list[str]:
    """One instance's flags: empty MG views and what preprocessing noted on its images."""
    out = [f"{slot.name} view missing" for slot, rec in zip(inst.slots, inst.mg, strict=True) if rec is None]
    named = [(slot.name, rec) for slot, rec in zip(inst.slots, inst.mg, strict=True) if rec is not None]
    if inst.us is not None:
        named.append(("US", inst.us))
    out += [f"{name}: {NOTES[n]}" for name, rec in named for n in notes.get(rec.path, ())]
    return out


def _warnings(items: list[Instance], notes: dict[str, tuple[str, ...]]) -> list[str]:
    """A patient's flags over all its instances, each once (the MG views are in every instance)."""
    return list(dict.fromkeys(w for inst in items for w in _image_notes(inst, notes)))


def _panels(bundle: Bundle, items: list[Instance], source: ImageSource, dev, target: int) -> list[ImagePanel]:
    """Grad-CAM per image for class `target` (the patient's triage class by mean probability),
    averaged over folds; an MG view's map is averaged over the patient's instances too (each
    instance pairs the same MG views with another US image)."""
    slots = list(bundle.config.model.slots)
    mg_maps: dict[str, list[np.ndarray]] = {}
    us_maps: dict[str, list[np.ndarray]] = {}
    for net in bundle.nets:
        for inst in items:
            batch = {k: v.to(dev) for k, v in instance_batch(inst, source).items()}
            exp = explain_instance(net, batch, slots, class_index=target)
            for name, heat in exp.mg.items():
                mg_maps.setdefault(name, []).append(heat)
            if exp.us is not None:
                us_maps.setdefault(inst.us.path, []).append(exp.us)
    panels = []
    first = items[0]
    for slot, rec in zip(slots, first.mg, strict=False):
        if rec is not None and slot.name in mg_maps:
            panels.append(ImagePanel(slot.name, source.get(rec.path, rec.modality, rec.side),
                                     _normalise(np.mean(mg_maps[slot.name], axis=0)), CLASS_NAMES[target],
                                     Path(rec.path).name))
    for inst in items:
        if inst.us is not None and inst.us.path in us_maps:
            rec = inst.us
            panels.append(ImagePanel(f"US {Path(rec.path).name}", source.get(rec.path, rec.modality, rec.side),
                                     _normalise(np.mean(us_maps[rec.path], axis=0)), CLASS_NAMES[target],
                                     Path(rec.path).name))
    return panels


def _normalise(heat: np.ndarray) -> np.ndarray:
    top = float(heat.max())
    return (heat / top).astype(np.float32) if top > 0 else heat.astype(np.float32)


def predict_batch(manifest: Manifest, bundle: Bundle, out_dir: str | os.PathLike,
                  cache_dir: str | os.PathLike = ".cache/breastfusion", heatmaps: bool = True, device: str = "auto",
                  progress: bool = True, save_arrays: bool = False,
                  skipped_at_ingest: list[tuple[str, str]] | None = None, command: str = "",
                  chunk_size: int = CHUNK_PATIENTS, runtime: str = "torch", locked: bool = False) -> Prediction:
    """`predict` + `write_prediction` for any number of patients, in bounded memory: patients go
    through `chunk_size` at a time, each chunk's heatmaps and reports are written and its rows
    recorded (journal.py) before the next one starts, so memory does not grow with the batch
    and an interrupted batch, run again, resumes after its last finished chunk. Returns the
    batch's Prediction without heatmap panels. `runtime`: see `predict`.

    The output folder's lock (locks.RunLock) is held throughout, so a second batch into a folder
    that a live process writes to is refused (RunLockedError) before it writes anything;
    `locked`: the caller holds it already (the command line, which writes its ingest there first)."""
    with contextlib.nullcontext() if locked else RunLock(out_dir, command):
        return _predict_batch(manifest, bundle, Path(out_dir), cache_dir, heatmaps, device, progress, save_arrays,
                              skipped_at_ingest, command, chunk_size, runtime)


def _predict_batch(manifest: Manifest, bundle: Bundle, out: Path, cache_dir, heatmaps: bool, device: str,
                   progress: bool, save_arrays: bool, skipped_at_ingest, command: str, chunk_size: int,
                   runtime: str) -> Prediction:
    cfg = bundle.config
    heatmaps = runtime_ready(bundle, runtime, heatmaps)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out, {"bundle": bundle.meta.sha256, "heatmaps": heatmaps, "save_arrays": save_arrays,
                            **({"runtime": runtime} if runtime != "torch" else {})})
    cases = list(manifest.cases().values())
    done = journal.done()
    todo = [c for c in cases if c.case_id not in done]
    log.info("predicting %d patient(s), %d image(s) with %s (%d fold networks)%s", len(cases), _images(cases),
             bundle.version, len(bundle.meta.folds),
             f"; {len(cases) - len(todo)} already done by an interrupted run" if done else "")
    source, dev = image_source(cfg, cache_dir), pick_device(device)
    with tqdm(total=len(cases), initial=len(cases) - len(todo), desc="predict", unit="patient",
              disable=not progress) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            pred = predict_cases(chunk, bundle, source, dev, heatmaps, progress=False, runtime=runtime,
                                 context=cases)
            journal.add([c.case_id for c in chunk], pred, write_patient_files(pred, bundle, out, save_arrays, runtime))
            bar.update(len(chunk))
    fields, reports = journal.load((INSTANCE_COLUMNS, PATIENT_COLUMNS))
    pred = Prediction(**fields)
    _nothing_predicted(pred, cfg)
    _write_tables(pred, bundle, out, reports, skipped_at_ingest, command, runtime)
    journal.remove()
    return pred


def write_prediction(pred: Prediction, bundle: Bundle, out_dir: str | os.PathLike, save_arrays: bool = False,
                     skipped_at_ingest: list[tuple[str, str]] | None = None, command: str = "",
                     runtime: str = "torch") -> Path:
    """Write every output of an in-memory Prediction (see the module docstring). `skipped_at_ingest`:
    (file, reason) of the input files ingest could not use, so that a patient whose every file
    was bad is reported. `command`: the command line, recorded in predictions.json with
    version, commit and time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tables(pred, bundle, out, write_patient_files(pred, bundle, out, save_arrays, runtime), skipped_at_ingest,
                  command, runtime)
    return out


def _model_info(bundle: Bundle, runtime: str = "torch") -> dict[str, str]:
    info = {"model": bundle.config.name, "version": bundle.version, "bundle": bundle.root.name,
            "operating points": _describe_points(bundle)}
    if runtime != "torch":
        from .onnx import describe_runtime

        info["runtime"] = describe_runtime(bundle, runtime)
    return info


def write_patient_files(pred: Prediction, bundle: Bundle, out: Path, save_arrays: bool = False,
                        runtime: str = "torch") -> dict[str, str]:
    """Each patient's heatmaps and HTML report; returns case id -> report path (relative to `out`)."""
    model_info = _model_info(bundle, runtime)
    reports = {}
    for res in pred.results:
        name = safe_name(res.case_id, "case")
        for panel in res.panels:
            if panel.heatmap is None:
                continue
            stem = out / "heatmaps" / name / safe_name(panel.title, "image")
            stem.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(stem.with_suffix(".png")) as tmp:
                Path(tmp).write_bytes(overlay_png(panel.image, panel.heatmap))
            if save_arrays:
                with atomic_path(stem.with_suffix(".npy")) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, panel.heatmap)
        path = write_patient_report(res, model_info, out / "reports" / f"{name}.html")
        reports[res.case_id] = path.relative_to(out).as_posix()
    return reports


def _write_tables(pred: Prediction, bundle: Bundle, out: Path, reports: dict[str, str],
                  skipped_at_ingest: list[tuple[str, str]] | None, command: str, runtime: str = "torch") -> None:
    """predictions.csv, instances.csv, the worklist and predictions.json of the whole batch."""
    with atomic_path(out / "predictions.csv") as tmp:
        pred.patients.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(out / "instances.csv") as tmp:
        pred.instances.to_csv(tmp, index=False, float_format="%.6f")
    model_info = _model_info(bundle, runtime)
    write_worklist(pred.results, model_info, out, reports)
    summary = {
        "provenance": stamp(command),
        "model": model_info,
        "operating_points": bundle.meta.operating_points.to_dict(),
        "patients": json.loads(pred.patients.to_json(orient="records")),
        "instances": json.loads(pred.instances.to_json(orient="records")),
        "not_predicted": dict(pred.skipped),
        "failed_patients": pred.failed,
        "refused_images": {Path(k).name: v for k, v in pred.refused.items()},
        "preprocessing_notes": pred.note_counts(),
        "skipped_at_ingest": [{"file": f, "reason": r} for f, r in (skipped_at_ingest or [])],
    }
    write_text(out / "predictions.json", json.dumps(summary, indent=1))


def _describe_points(bundle: Bundle) -> str:
    pts = bundle.points
    parts = []
    if pts.malignant_threshold is not None:
        parts.append(f"recall if p(malignant) >= {pts.malignant_threshold:.3f} "
                     f"(target sensitivity {pts.target_malignant_sensitivity:.0%})")
    if pts.normal_threshold is not None:
        parts.append(f"routine if p(normal) >= {pts.normal_threshold:.3f} "
                     f"(target specificity {pts.target_normal_specificity:.0%})")
    return "; ".join(parts) or "none (see bundle.json)"


def naive_probabilities(bundle: Bundle, items: list[Instance], source: ImageSource,
                        device: str = "cpu") -> np.ndarray:
    """Every instance through every fold's whole network, images and all: the reference
    that the MG-once path must reproduce (and the slow path it replaces)."""
    dev = pick_device(device)
    per_fold = []
    for net in bundle.nets:
        net.to(dev).eval()
        rows = []
        for inst in items:
            batch = {k: v.to(dev) for k, v in instance_batch(inst, source).items()}
            with torch.no_grad():
                rows.append(net(batch).logits.float().cpu().numpy()[0])
        per_fold.append(np.stack(rows))
    return bundle.probabilities(per_fold)

