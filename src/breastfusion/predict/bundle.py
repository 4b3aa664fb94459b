"""A trained model as a folder that runs on new patients: the bundle.

``breastfusion export RUN_ROW -o BUNDLE`` turns one cross-validated row of an
experiment into::

    bundle.json         format, version, classes, folds, per-fold temperature,
                        operating points and what they achieve (with 95% intervals),
                        preprocessing, training-data summary,
                        sha256 of config.yaml and of every weights file
    config.yaml         the row's RunConfig
    weights/shared.safetensors   tensors identical in every fold (frozen backbones)
    weights/fold_K.safetensors   the rest of fold K's network
    onnx/*.onnx         optional (export --onnx): the networks as ONNX graphs (predict/onnx.py),
                        int8 backbones (--int8, predict/int8.py); listed in bundle.json's "onnx"

The model is the ensemble of the K fold networks (as nnU-Net ensembles its
fold models): each fold's logits are divided by that fold's temperature
(fitted on the fold's TEST split, never on its validation fold), turned into
probabilities and averaged. Operating points are chosen on the pooled
test-split patient probabilities of the folds. What they achieve is then measured on the
validation folds (each fold's network on its own validation patients, temperature-scaled;
patients none of the choices saw) with stratified-bootstrap intervals: sensitivity and
specificity of each call and the share of patients sent to each lane
(`operating_point_evidence`). The ensemble of all folds is usually at least as good as one
fold's network, so these figures are, if anything, conservative.

Loading runs no pickle: safetensors only, every file's checksum verified
against bundle.json (the checksummed files are exactly the bundle's: config, weights, and
the ONNX graphs its "onnx" section names), weights loaded strictly into the network the
config describes. Anything else is refused with a WeightsError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig, load_run_config, save_yaml, to_dict
from ..errors import WeightsError
from ..evaluation.aggregate import PROBA_COLUMNS
from ..evaluation.calibration import calibrated_patients, fold_temperature, softmax
from ..evaluation.decision import OperatingPoints, choose_operating_points, operating_point_evidence
from ..files import sha256_file, write_text
from ..inference.layout import (
    CONFIG_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    TEST_PREDICTIONS_FILE,
    fold_dirs,
    fold_number,
)
from ..inference.networks import trained_net, untrained
from ..inference.runtime import has_conv2d
from ..models.backbones import build_backbone
from ..models.network import BreastFusionNet
from ..models.weights import read_state_dict, save_weights
from ..provenance import stamp
from ..vocab import CLASS_NAMES

FORMAT = 1
BUNDLE_FILE = "bundle.json"
_GRAPH_NAME = re.compile(r"^onnx/[A-Za-z0-9_.-]+\.onnx$")


def export_bundle(row_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  target_malignant_sensitivity: float = 0.95, target_normal_specificity: float = 0.95,
                  command: str = "") -> Path:
    """`command`: the command line that asked for the bundle (recorded in bundle.json)."""
    row_dir, out = Path(row_dir), Path(out_dir)
    cfg = load_run_config(row_dir / CONFIG_FILE)
    folds = fold_dirs(row_dir)
    if not folds:
        raise WeightsError(f"{row_dir}: no completed fold with saved weights ({MODEL_FILE}); "
                           "rerun the experiment with this version of breastfusion")
    temperatures, pooled, validation, states = [], [], [], []
    for fold_dir in folds:
        test_file = fold_dir / TEST_PREDICTIONS_FILE
        if not test_file.is_file():
            raise WeightsError(f"{test_file}: missing (calibration needs each fold's test-split logits); "
                               "rerun the experiment to complete the fold")
        test = pd.read_csv(test_file)
        t = fold_temperature(test)
        temperatures.append(t)
        pooled.append(calibrated_patients(test, t))
        validation.append(calibrated_patients(pd.read_csv(fold_dir / PREDICTIONS_FILE), t))
        try:
            net = trained_net(cfg, read_state_dict(fold_dir / MODEL_FILE), backbones_from_config=True)
        except WeightsError as exc:
            message = str(exc)
            if not message.startswith(str(fold_dir)):
                message = f"{fold_dir / MODEL_FILE}: {message}"
            raise WeightsError(message) from None
        states.append(net.state_dict())
    patients = pd.concat(pooled, ignore_index=True)
    points = choose_operating_points(patients[PROBA_COLUMNS].to_numpy(float), patients["label"].to_numpy(int),
                                     target_malignant_sensitivity, target_normal_specificity)
    evidence = {}
    for cohort, table in (("validation folds", pd.concat(validation, ignore_index=True)),
                          ("test splits (where the thresholds were chosen)", patients)):
        evidence[cohort] = operating_point_evidence(table[PROBA_COLUMNS].to_numpy(float),
                                                    table["label"].to_numpy(int), points)
    shared = {k: v for k, v in states[0].items() if all(torch.equal(v, s[k]) for s in states[1:])}
    (out / "weights").mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": save_yaml(cfg, out / "config.yaml")}
    files["weights/shared.safetensors"] = save_weights(shared, out / "weights" / "shared.safetensors")
    fold_ids = [fold_number(d) for d in folds]
    for k, state in zip(fold_ids, states, strict=True):
        own = {n: v for n, v in state.items() if n not in shared}
        files[f"weights/fold_{k}.safetensors"] = save_weights(own, out / "weights" / f"fold_{k}.safetensors")
    made = stamp(command)
    meta = BundleMeta(
        format=FORMAT, breastfusion_version=made["breastfusion_version"], created=made["created"], provenance=made,
        name=cfg.name,
        classes=list(CLASS_NAMES), folds=fold_ids, temperatures=temperatures, operating_points=points,
        operating_point_evidence=evidence,
        preprocessing={"size": {m.value: bb.image_size for m, bb in cfg.model.backbones().items()},
                       **to_dict(cfg.preprocess)},
        training_data=_training_data(row_dir / "data.json"), source_run=row_dir.name,
        sha256={name: sha256_file(path) for name, path in files.items()})
    write_text(out / BUNDLE_FILE, json.dumps(meta.to_json(), indent=1))
    return out


def _training_data(data_file: Path) -> dict:
    if not data_file.is_file():
        return {}
    try:
        return json.loads(data_file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{data_file}: unreadable ({exc}); rerun the experiment to rewrite it") from None


@dataclass(frozen=True)
class BundleMeta:
    """bundle.json as a typed record: what the bundle is, how it was made and how to check it."""

    format: int
    breastfusion_version: str
    created: str
    name: str
    classes: list[str]
    folds: list[int]  # the fold networks, in order
    temperatures: list[float]  # per fold, fitted on the fold's test split
    operating_points: OperatingPoints  # chosen on the pooled test-split patients
    sha256: dict[str, str]  # every file of the bundle -> its checksum
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # command, version, commit, time
    preprocessing: dict = dataclasses.field(default_factory=dict)
    training_data: dict = dataclasses.field(default_factory=dict)  # counts and manifest hash; no ids
    # cohort -> what the operating points achieve there, with intervals (operating_point_evidence)
    operating_point_evidence: dict = dataclasses.field(default_factory=dict)
    source_run: str = ""
    # optional ONNX graphs (predict/onnx.py): per fold, the graph of each backbone and of the head;
    # "int8": quantised backbone graphs, their calibration and what they change (predict/int8.py)
    onnx: dict = dataclasses.field(default_factory=dict)

    REQUIRED = ("folds", "sha256", "temperatures", "operating_points", "breastfusion_version", "created")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["operating_points"] = self.operating_points.to_dict()
        return data

    @classmethod
    def from_json(cls, data: dict, where: str) -> BundleMeta:
        """Read bundle.json's object; a WeightsError names `where` and what is wrong."""
        if not isinstance(data, dict):
            raise WeightsError(f"{where}: not a bundle description (a JSON object is expected)")
        if data.get("format") != FORMAT:
            raise WeightsError(f"{where}: bundle format {data.get('format')!r}, this version reads {FORMAT}")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise WeightsError(f"{where}: incomplete bundle description (missing {', '.join(missing)})")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["operating_points"] = OperatingPoints.from_dict(data["operating_points"])
            values.setdefault("name", "")
            values.setdefault("classes", list(CLASS_NAMES))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{where}: unreadable bundle description ({exc})") from None


@dataclass
class Bundle:
    root: Path
    config: RunConfig
    meta: BundleMeta
    nets: list[BreastFusionNet]  # one per fold, in eval mode
    # ONNX Runtime sessions per runtime ("onnx", "onnx-int8"), made on first use (predict/onnx.py)
    runtimes: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def temperatures(self) -> list[float]:
        return list(self.meta.temperatures)

    @property
    def points(self) -> OperatingPoints:
        return self.meta.operating_points

    @property
    def version(self) -> str:
        return f"{self.config.name} (breastfusion {self.meta.breastfusion_version}, {self.meta.created})"

    def probabilities(self, logits_per_fold: list[np.ndarray]) -> np.ndarray:
        """Ensemble probabilities: mean over folds of softmax(logits / T_fold)."""
        return np.mean([softmax(z, t) for z, t in zip(logits_per_fold, self.temperatures, strict=True)], axis=0)


def load_bundle(path: str | os.PathLike, networks: bool = True) -> Bundle:
    """The bundle, every file checked; `networks` False: without its PyTorch networks (`nets`
    empty), for prediction with its ONNX graphs only."""
    root = Path(path)
    meta_file = root / BUNDLE_FILE
    if not meta_file.is_file():
        raise WeightsError(f"{root}: not a breastfusion bundle (no {BUNDLE_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{meta_file}: unreadable ({exc})") from None
    meta = BundleMeta.from_json(meta, str(meta_file))
    sums = meta.sha256
    expected = {"config.yaml", "weights/shared.safetensors", *(f"weights/fold_{k}.safetensors" for k in meta.folds)}
    expected |= graph_files(meta.onnx, str(meta_file))
    if set(sums) != expected:
        raise WeightsError(f"{meta_file}: checksums do not list exactly the bundle's files")
    for name, digest in sums.items():
        file = root / name
        if not file.is_file():
            raise WeightsError(f"{file}: missing from the bundle")
        if sha256_file(file) != digest:
            raise WeightsError(f"{file}: checksum does not match bundle.json (modified or corrupt); refusing it")
    cfg = load_run_config(root / "config.yaml")
    keys = {*(m.value for m in cfg.model.modality_set), "head"}
    if meta.onnx and (len(meta.onnx["folds"]) != len(meta.folds) or any(set(e) != keys for e in meta.onnx["folds"])):
        raise WeightsError(f"{meta_file}: its ONNX graphs do not describe the bundle's folds")
    if not networks:
        return Bundle(root, cfg, meta, [])
    shared = read_state_dict(root / "weights" / "shared.safetensors")
    # A backbone whose every tensor is shared by all folds (frozen in training) is built
    # once and used by every fold's network: its features are then computed once.
    none = untrained(cfg.model)
    common = {}
    for m in cfg.model.modality_set:
        prefix = f"{m.value.lower()}_backbone."
        template = build_backbone(none.backbone_for(m))
        if all(prefix + k in shared for k in template.state_dict()):
            common[m] = template
    nets = []
    for k in meta.folds:
        state = {**shared, **read_state_dict(root / "weights" / f"fold_{k}.safetensors")}
        net = trained_net(cfg, state, backbones_from_config=False, backbones=common).eval()
        if cfg.train.channels_last and has_conv2d(net):  # the inference layout, once (not per call)
            net.to(memory_format=torch.channels_last)
        nets.append(net)
    return Bundle(root, cfg, meta, nets)


def graph_files(section: dict, where: str = BUNDLE_FILE) -> set[str]:
    """The files an "onnx" section of bundle.json names (fp32 graphs per fold, int8 graphs);
    WeightsError where it is malformed or names a file outside the bundle's onnx/ folder."""
    if not section:
        return set()
    try:
        names = {name for entry in section["folds"] for name in entry.values()}
        names |= set(section.get("int8", {}).get("graphs", {}).values())
    except (KeyError, TypeError, AttributeError):
        raise WeightsError(f"{where}: unreadable ONNX section") from None
    bad = sorted(str(n) for n in names if not isinstance(n, str) or not _GRAPH_NAME.match(n))
    if bad:
        raise WeightsError(f"{where}: {bad[0]!r} is not an ONNX file of the bundle (onnx/NAME.onnx)")
    return names
