"""int8 backbones: static quantisation of a bundle's ONNX backbone graphs, and what it costs.

``breastfusion export ROW -o BUNDLE --onnx --int8 --calibration-manifest M.csv`` quantises each
fp32 backbone graph (onnx.py) with ONNX Runtime's `quantize_static` (QDQ format, int8 weights
per channel, uint8 activations, MinMax ranges) into ``onnx/NAME.int8.onnx``; the heads stay
fp32 (they are small). Predict with them: ``--runtime onnx-int8``.

Calibration images are TRAINING images of the bundle's own folds, never images it is
evaluated on: the bundle records its training data only as counts, so they come from the
row's run folder (which cases each fold validated and tested on, `layout.recorded_splits`)
and the manifest it was trained on (checked against the row's manifest hash). A graph used
by folds F (one fold's fine-tuned backbone, or a frozen one every fold shares) is calibrated
on at most `images` images of cases in the train split of a fold of F.

`int8_auc_change` measures what int8 changes where the bundle's operating points are
measured (bundle.py): each fold's network on its own validation patients, temperature-scaled,
pooled; fp32 graphs against int8 ones calibrated on that fold's train split alone. For a
backbone every fold shares, these are per-fold graphs calibrated like the shipped one (on
training images) but on fewer cases: the measure is of the procedure, as cross-validation's is.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..errors import CohortError, WeightsError
from ..evaluation.aggregate import LOGIT_COLUMNS, PROBA_COLUMNS
from ..evaluation.calibration import calibrated_patients
from ..evaluation.decision import decide
from ..evaluation.metrics import macro_auc, per_class_auc
from ..files import atomic_path
from ..inference.images import image_source, screen, without_failed
from ..inference.instances import build_instances, modality_images
from ..inference.layout import recorded_splits
from ..preprocess.pipeline import ImageSource
from ..records import ImageRecord, Manifest
from ..vocab import Modality
from .bundle import Bundle, load_bundle
from .onnx import OnnxNets, write_onnx_section

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64  # per backbone graph
CALIBRATION_BATCH = 16


class CalibrationImages(CalibrationDataReader):
    """Preprocessed images (B, 1, S, S), in batches, for `quantize_static`."""

    def __init__(self, records: list[ImageRecord], source: ImageSource, batch: int = CALIBRATION_BATCH):
        self.records, self.source, self.batch, self.position = records, source, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = self.records[self.position:self.position + self.batch]
        if not chunk:
            return None
        self.position += len(chunk)
        images = np.stack([self.source.get(r.path, r.modality, r.side) for r in chunk]).astype(np.float32)
        return {"images": images[:, None]}

    def rewind(self) -> None:
        self.position = 0


class Calibration:
    """int8 graphs of a bundle's fp32 backbone graphs, each calibrated on training images of
    given folds (made in `work`, once per graph and set of folds)."""

    def __init__(self, bundle: Bundle, row_dir, manifest: Manifest, work: Path, images: int = CALIBRATION_IMAGES,
                 cache_dir=None):
        self.bundle, self.manifest, self.work, self.images = bundle, manifest, Path(work), images
        self.splits = recorded_splits(row_dir)
        _same_training(bundle, Path(row_dir), manifest, self.splits)
        self.source = image_source(bundle.config, cache_dir)
        self.cases = manifest.cases()
        self.used: dict[tuple[str, tuple[int, ...]], int] = {}  # images each made graph was calibrated on
        self._made: dict[tuple[str, tuple[int, ...]], Path] = {}
        self._prepared: dict[str, Path] = {}

    def records(self, modality: Modality, folds: list[int]) -> list[ImageRecord]:
        """At most `images` distinct images of this modality (those the model sees) of cases in the
        train split of one of `folds`, chosen at random (fixed seed) among those preprocessing accepts."""
        train = set().union(*(self.splits[k]["train"] for k in folds))
        cfg = self.bundle.config.model
        instances, _ = build_instances([self.cases[c] for c in sorted(train) if c in self.cases],
                                       cfg.modality_set, cfg.slots)
        records = sorted(modality_images(instances, modality), key=lambda r: r.path)
        refused = screen(records, self.source, progress=False).refused
        records = [r for r in records if r.path not in refused]
        if not records:
            raise CohortError(f"no {modality.value} training image of folds {folds} in the manifest to calibrate "
                              "int8 graphs on")
        keep = np.random.default_rng(0).choice(len(records), min(self.images, len(records)), replace=False)
        return [records[i] for i in sorted(keep)]

    def int8(self, graph: str, modality: Modality, folds: list[int]) -> Path:
        """`graph` (a bundle file) quantised, calibrated on training images of `folds`."""
        key = (graph, tuple(sorted(folds)))
        if key not in self._made:
            records = self.records(modality, list(key[1]))
            out = self.work / f"{Path(graph).stem}.{'-'.join(map(str, key[1]))}.int8.onnx"
            quantise(self._prepare(graph), out, CalibrationImages(records, self.source))
            self._made[key], self.used[key] = out, len(records)
        return self._made[key]

    def _prepare(self, graph: str) -> Path:
        """ONNX Runtime's pre-processing for quantisation (shape inference, graph optimisation)."""
        if graph not in self._prepared:
            out = self.work / f"{Path(graph).stem}.prepared.onnx"
            with _quiet():
                quant_pre_process(str(self.bundle.root / graph), str(out), skip_symbolic_shape=True,
                                  skip_onnx_shape=True)  # quantize_static infers shapes itself
            self._prepared[graph] = out
        return self._prepared[graph]


def quantise(graph: Path, out: Path, reader: CalibrationImages) -> Path:
    """Static int8 quantisation of one backbone graph (QDQ, per-channel int8 weights, uint8
    activations, MinMax ranges over the reader's images)."""
    with atomic_path(out) as tmp, _quiet():
        quantize_static(str(graph), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs its advice through `logging.info(...)` on the root logger,
    which also installs a stderr handler on a root that has none (`logging.basicConfig`): every
    later line of ours would be printed twice. Keep both out."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def _same_training(bundle: Bundle, row_dir: Path, manifest: Manifest, splits: dict) -> None:
    """The row folder and manifest are those the bundle was made from (else calibration images
    could be images it is evaluated on)."""
    if bundle.meta.source_run and bundle.meta.source_run != row_dir.name:
        raise WeightsError(f"{bundle.root}: made from row {bundle.meta.source_run!r}, not {row_dir.name!r}")
    if sorted(splits) != list(bundle.meta.folds):
        raise WeightsError(f"{row_dir}: completed folds {sorted(splits)} differ from the bundle's {bundle.meta.folds}")
    recorded = bundle.meta.training_data.get("manifest_hash")
    if recorded != manifest.content_hash():
        raise CohortError(f"the calibration manifest is not the one {row_dir.name} was trained on (manifest hash "
                          f"{manifest.content_hash()}, the bundle records {recorded}); pass that manifest")


def export_int8(bundle_dir, row_dir, manifest: Manifest, images: int = CALIBRATION_IMAGES, measure: bool = True,
                measure_folds: list[int] | None = None, cache_dir=None) -> dict:
    """Add int8 graphs of a bundle's fp32 ONNX backbone graphs to it (and to bundle.json, with
    their calibration and, with `measure`, `int8_auc_change` on `measure_folds`, default all). Returns
    the "int8" section. `cache_dir`: the preprocessing cache (default the row config's)."""
    bundle = load_bundle(bundle_dir, networks=False)
    section = dict(bundle.meta.onnx or {})
    if not section:
        raise WeightsError(f"{bundle.root}: no ONNX graphs to quantise; export with --onnx first")
    if section.pop("int8", None):  # unlisted first: if this fails, the bundle stays valid (fp32 graphs only)
        write_onnx_section(bundle.root, bundle, section)
    modalities = bundle.config.model.modality_set
    with tempfile.TemporaryDirectory(prefix="breastfusion-int8-") as work:
        cal = Calibration(bundle, row_dir, manifest, Path(work), images, cache_dir)
        graphs, calibration = {}, {}
        for m in modalities:
            users: dict[str, list[int]] = {}
            for k, entry in zip(bundle.meta.folds, section["folds"], strict=True):
                users.setdefault(entry[m.value], []).append(k)
            for graph, folds in users.items():
                name = graph.removesuffix(".onnx") + ".int8.onnx"
                made = cal.int8(graph, m, folds)
                with atomic_path(bundle.root / name) as tmp:
                    shutil.copyfile(made, tmp)
                graphs[graph] = name
                calibration[name] = {"images": cal.used[(graph, tuple(sorted(folds)))],
                                     "from": f"train splits of folds {folds}"}
                log.info("int8 %s: %.1f MB -> %.1f MB, calibrated on %d training images", name,
                         (bundle.root / graph).stat().st_size / 1e6, (bundle.root / name).stat().st_size / 1e6,
                         calibration[name]["images"])
        int8 = {"graphs": graphs, "calibration": calibration,
                "method": "onnxruntime quantize_static: QDQ, int8 weights per channel, uint8 activations, MinMax"}
        if measure:
            int8["auc_change"] = int8_auc_change(bundle, row_dir, manifest, images, measure_folds, cache_dir, cal)
    write_onnx_section(bundle.root, bundle, {**section, "int8": int8})
    return int8


def int8_auc_change(bundle: Bundle, row_dir, manifest: Manifest, images: int = CALIBRATION_IMAGES,
                    folds: list[int] | None = None, cache_dir=None, calibration: Calibration | None = None) -> dict:
    """AUC (one-vs-rest per class, macro) of fp32 and int8 graphs on the validation folds: each
    fold's network (of `folds`, default all) on its own validation patients, temperature-scaled,
    pooled; the int8 backbones calibrated on that fold's train split only. Also the largest
    change of a patient's probability and the patients whose triage class or decision changes."""
    if not bundle.meta.onnx:
        raise WeightsError(f"{bundle.root}: no ONNX graphs; export with --onnx first")
    with contextlib.ExitStack() as stack:
        if calibration is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="breastfusion-int8-")))
            calibration = Calibration(bundle, row_dir, manifest, work, images, cache_dir)
        fp32 = OnnxNets.of(bundle)
        cfg = bundle.config.model
        tables: dict[str, list[pd.DataFrame]] = {"fp32": [], "int8": []}
        for i, k in enumerate(bundle.meta.folds):
            if folds is not None and k not in folds:
                continue
            val = [calibration.cases[c] for c in sorted(calibration.splits[k]["val"]) if c in calibration.cases]
            items, _ = build_instances(val, cfg.modality_set, cfg.slots)
            images = [r for m in cfg.modality_set for r in modality_images(items, m)]
            refused = screen(images, calibration.source, progress=False).refused  # as in training and predict
            items = [it for it in without_failed(items, refused, Counter()) if it.label is not None]
            if not items:
                continue
            entry = fp32.folds[i]
            own = {m.value: str(calibration.int8(entry[m.value], m, [k])) for m in cfg.modality_set}
            int8 = OnnxNets(bundle.root, [{**entry, **own}], cfg.modality_set, bundle.config.train,
                            sessions={entry["head"]: fp32.session(entry["head"])})  # the same fp32 head
            for kind, logits in (("fp32", fp32.logits(items, calibration.source, [i])[0]),
                                 ("int8", int8.logits(items, calibration.source)[0])):
                table = pd.DataFrame({"case_id": [it.case_id for it in items],
                                      "label": [int(it.label.index) for it in items]})
                table[LOGIT_COLUMNS] = logits
                tables[kind].append(calibrated_patients(table, bundle.temperatures[i]))
    if not tables["fp32"]:
        raise CohortError("no validation patient of the bundle's folds in the manifest")
    a, b = (pd.concat(tables[kind], ignore_index=True) for kind in ("fp32", "int8"))
    labels, pa, pb = a["label"].to_numpy(int), a[PROBA_COLUMNS].to_numpy(float), b[PROBA_COLUMNS].to_numpy(float)
    auc = {kind: {**per_class_auc(labels, p), "macro": macro_auc(labels, p)}
           for kind, p in (("fp32", pa), ("int8", pb))}
    points = bundle.points
    return {
        "cohort": "validation folds (each fold's network on its own validation patients)",
        "patients": len(a), "folds": [k for k in bundle.meta.folds if folds is None or k in folds],
        "auc_fp32": auc["fp32"], "auc_int8": auc["int8"],
        "auc_change": {c: auc["int8"][c] - auc["fp32"][c] for c in auc["fp32"]},
        "largest_probability_change": float(np.abs(pa - pb).max()),
        "triage_changed": int((pa.argmax(1) != pb.argmax(1)).sum()),
        "decision_changed": int(sum(decide(x, points) != decide(y, points) for x, y in zip(pa, pb, strict=True))),
    }
