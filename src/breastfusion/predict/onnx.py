"""The bundle's networks as ONNX graphs, and prediction with them on ONNX Runtime (CPU).

``breastfusion export ROW -o BUNDLE --onnx`` adds to the bundle::

    onnx/mg_backbone.onnx          a backbone shared by every fold (frozen in training) ...
    onnx/fold_K.mg_backbone.onnx   ... or fold K's own (fine-tuned or partial-mode)
    onnx/fold_K.head.onnx          fold K's head (everything after the backbones)

and lists them in bundle.json ("onnx"), with their checksums among the bundle's others.

A backbone graph maps preprocessed images (N, 1, S, S) in [0, 1] to the pooled features the
fold's head was trained on (`inference.encode.trained_features`, partial mode's fp16 storage
of the frozen activations included), in fp32. A head graph takes each patient's MG view
features once (``mg_feat`` (P, V, D), ``mg_mask`` (P, V)), each instance's patient row
(``mg_rows`` (N,)) and the US features (``us_feat`` (N, D)), and returns the (N, 3) logits:
the MG branch (view attention) runs once per patient inside the graph, as `predict.run`
does with PyTorch. Preprocessing, temperatures, ensembling and operating points stay those of
the bundle: `OnnxNets.logits` is a second implementation of `run.ensemble_logits`, nothing more.

Grad-CAM needs gradients and stays on the PyTorch path: predicting on ONNX Runtime skips the
heatmaps (and the reports say so). int8 backbones (static quantisation): see int8.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..choices import RUNTIMES, TrainMode
from ..config import TrainConfig
from ..errors import WeightsError
from ..files import atomic_path, sha256_file, write_text
from ..inference.batches import bounded_spans
from ..inference.encode import storage_dtype
from ..inference.instances import Instance, modality_images
from ..inference.runtime import autocast_dtype
from ..models.backbones import Backbone
from ..models.network import FusionHead
from ..preprocess.pipeline import ImageSource
from ..records import ImageRecord
from ..vocab import Modality
from .bundle import BUNDLE_FILE, Bundle, graph_files, load_bundle
from .run import FeatureBank, mg_views

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
OPSET = 17
PROVIDERS = ["CPUExecutionProvider"]
TOLERANCE = 1e-4  # export's check: |ONNX - PyTorch| <= TOLERANCE * max(1, |PyTorch|) on random inputs


# ---------------------------------------------------------------- export


class _Encoder(nn.Module):
    """images -> the features a head of a network trained with `train` received, in fp32."""

    def __init__(self, backbone: Backbone, train: TrainConfig):
        super().__init__()
        self.backbone, self.mode = backbone, train.mode
        self.stored = storage_dtype(train.activation_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode != TrainMode.PARTIAL:
            return self.backbone(images).float()
        stage = self.backbone.frozen_stage
        act = self.backbone.trunk(images, stage).to(self.stored).float()  # as stored, then as read
        return self.backbone.tail(act, stage).float()


def head_input_names(modalities) -> list[str]:
    return [*(("mg_feat", "mg_mask", "mg_rows") if Modality.MG in modalities else ()),
            *(("us_feat",) if Modality.US in modalities else ())]


class _Head(nn.Module):
    """Per-patient MG view features + per-instance rows (+ US features) -> logits; the MG
    branch once per patient (the paper's head) or the plain head on each instance's views."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.names = head_input_names(head.modalities)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        x = dict(zip(self.names, tensors, strict=True))
        given = {}
        if "mg_feat" in x:
            rows = x["mg_rows"]
            if isinstance(self.head, FusionHead):
                emb, weights = self.head.mg(x["mg_feat"], x["mg_mask"])
                given["mg_branch"] = (emb[rows], weights[rows])
            else:
                given["mg_feat"], given["mg_mask"] = x["mg_feat"][rows], x["mg_mask"][rows]
        if "us_feat" in x:
            given["us_feat"] = x["us_feat"]
        return self.head(**given).logits.float()


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], dynamic: dict,
            path: Path) -> None:
    """One graph, written atomically. The TorchScript exporter: a single self-contained file in
    a second or two (the dynamo exporter takes several times longer on these networks)."""
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, example, str(tmp), input_names=names, output_names=["out"],
                          dynamic_axes={**dynamic, "out": {0: "n"}}, opset_version=OPSET, dynamo=False)


def _check(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> float:
    """ONNX Runtime against PyTorch on `example`; WeightsError beyond TOLERANCE. Returns the
    largest absolute difference."""
    with torch.no_grad():
        ref = module(*example).numpy()
    got = session(path.read_bytes()).run(None, {n: t.numpy() for n, t in zip(names, example, strict=True)})[0]
    diff = float(np.abs(got - ref).max())
    if not diff <= TOLERANCE * max(1.0, float(np.abs(ref).max())):
        raise WeightsError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2g}; not exported")
    return diff


def export_onnx(bundle_dir) -> dict:
    """Add the fp32 ONNX graphs of a bundle to its folder and bundle.json (replacing any ONNX
    graphs it had, int8 ones included). Each graph is checked against PyTorch on random inputs
    of another batch size than the one it was traced with. Returns bundle.json's "onnx" section."""
    root = Path(bundle_dir)
    bundle = load_bundle(root)
    cfg, train = bundle.config, bundle.config.train
    if autocast_dtype(torch.device("cpu"), train.precision) is not None:
        log.warning("ONNX graphs compute in fp32; this bundle's PyTorch path computes in %s on a CPU "
                    "(train.precision): their predictions differ by that rounding", train.precision)
    if bundle.meta.onnx:  # unlisted first: if this export fails, the bundle stays valid (without graphs)
        write_onnx_section(root, bundle, {})
        _remove_graphs(root, bundle.meta.onnx)
    modalities, n_views = cfg.model.modality_set, len(cfg.model.slots)
    gen = torch.Generator().manual_seed(0)
    folds, encoders, largest = [], {}, 0.0
    for k, net in zip(bundle.meta.folds, bundle.nets, strict=True):
        net.to(memory_format=torch.contiguous_format).eval()
        entry, dims = {}, {}
        for m in modalities:
            bb = net.backbone(m)
            if id(bb) not in encoders:
                shared = all(other.backbone(m) is bb for other in bundle.nets)
                name = f"{ONNX_DIR}/{'' if shared else f'fold_{k}.'}{m.value.lower()}_backbone.onnx"
                size = cfg.model.backbone_for(m).image_size
                enc = _Encoder(bb, train).eval()
                _export(enc, (torch.rand(2, 1, size, size, generator=gen),), ["images"], {"images": {0: "n"}},
                        root / name)
                largest = max(largest, _check(enc, (torch.rand(5, 1, size, size, generator=gen),), ["images"],
                                              root / name))
                encoders[id(bb)] = name
            entry[m.value], dims[m] = encoders[id(bb)], bb.out_dim
        head = _Head(net.head).eval()
        name = entry["head"] = f"{ONNX_DIR}/fold_{k}.head.onnx"
        dynamic = {"mg_feat": {0: "p"}, "mg_mask": {0: "p"}, "mg_rows": {0: "n"}, "us_feat": {0: "n"}}
        _export(head, _head_example(modalities, n_views, dims, 2, 3, gen), head.names,
                {n: dynamic[n] for n in head.names}, root / name)
        largest = max(largest, _check(head, _head_example(modalities, n_views, dims, 3, 7, gen), head.names,
                                      root / name))
        folds.append(entry)
    import onnxruntime

    section = {"folds": folds, "opset": OPSET, "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
               "onnxruntime": onnxruntime.__version__, "precision": "fp32",
               "checked_against_pytorch": {"largest_difference": largest, "inputs": "random"}}
    write_onnx_section(root, bundle, section)
    log.info("ONNX: %d graphs in %s (largest difference from PyTorch %.2g)", len(graph_files(section)),
             root / ONNX_DIR, largest)
    return section


def _head_example(modalities, n_views: int, dims: dict, patients: int, batch: int, gen: torch.Generator) -> tuple:
    """Head inputs of `patients` patients (the first one's last view missing) in `batch` instances."""
    out = []
    if Modality.MG in modalities:
        mask = torch.ones(patients, n_views, dtype=torch.bool)
        mask[0, -1] = n_views < 2
        rows = torch.tensor([k * patients // batch for k in range(batch)], dtype=torch.int64)
        out += [torch.randn(patients, n_views, dims[Modality.MG], generator=gen).relu(), mask, rows]
    if Modality.US in modalities:
        out.append(torch.randn(batch, dims[Modality.US], generator=gen).relu())
    return tuple(out)


def _remove_graphs(root: Path, section: dict) -> None:
    for name in graph_files(section or {}):
        (root / name).unlink(missing_ok=True)


def write_onnx_section(root: Path, bundle: Bundle, section: dict) -> None:
    """bundle.json with this "onnx" section and the checksums of its files (the old graphs' gone)."""
    old = graph_files(bundle.meta.onnx or {})
    sums = {k: v for k, v in bundle.meta.sha256.items() if k not in old}
    sums.update({name: sha256_file(root / name) for name in sorted(graph_files(section))})
    meta = dataclasses.replace(bundle.meta, sha256=sums, onnx=section)
    write_text(root / BUNDLE_FILE, json.dumps(meta.to_json(), indent=1))


# ---------------------------------------------------------------- runtime


def session(model: bytes):
    """An ONNX Runtime session on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=PROVIDERS)


class OnnxNets:
    """The fold networks as ONNX Runtime sessions: `folds` has, per fold, the graph file of each
    modality's backbone and of its head (relative to `root`). Each distinct graph is one
    session, made on first use from bytes checked against `checksums` (None: not checked)."""

    def __init__(self, root: Path, folds: list[dict[str, str]], modalities, train: TrainConfig,
                 checksums: dict[str, str] | None = None, batch_size: int = 32, sessions: dict | None = None):
        """`sessions`: graph name -> session already made (shared with another OnnxNets)."""
        self.root, self.folds, self.modalities, self.train = Path(root), folds, modalities, train
        self.checksums, self.batch_size = checksums, batch_size
        self._sessions: dict[str, object] = dict(sessions or {})

    @classmethod
    def of(cls, bundle: Bundle, int8: bool = False) -> OnnxNets:
        section = bundle.meta.onnx or {}
        if not section:
            raise WeightsError(f"{bundle.root}: this bundle has no ONNX graphs; add them with "
                               "`breastfusion export RUN/rows/NAME -o BUNDLE --onnx`")
        folds = section["folds"]
        if int8:
            graphs = section.get("int8", {}).get("graphs")
            if not graphs:
                raise WeightsError(f"{bundle.root}: this bundle has no int8 graphs; add them with "
                                   "`breastfusion export RUN/rows/NAME -o BUNDLE --onnx --int8 ...`")
            folds = [{key: graphs.get(name, name) for key, name in entry.items()} for entry in folds]
        return cls(bundle.root, folds, bundle.config.model.modality_set, bundle.config.train, bundle.meta.sha256)

    def session(self, name: str):
        if name not in self._sessions:
            data = (self.root / name).read_bytes()
            if self.checksums is not None and hashlib.sha256(data).hexdigest() != self.checksums.get(name):
                raise WeightsError(f"{self.root / name}: checksum does not match bundle.json (modified or "
                                   "corrupt); refusing it")
            self._sessions[name] = session(data)
        return self._sessions[name]

    def load(self) -> OnnxNets:
        """Every session now (a bad graph fails here, not on the first patient)."""
        for entry in self.folds:
            for name in entry.values():
                self.session(name)
        return self

    def logits(self, items: list[Instance], source: ImageSource, folds: list[int] | None = None) -> list[np.ndarray]:
        """(N, 3) logits per fold (positions in `folds`, default all), MG once per patient and each
        image once per distinct backbone graph, as `run.ensemble_logits`."""
        bank = OnnxFeatureBank(source, self.train, self.batch_size)
        out = []
        for k in range(len(self.folds)) if folds is None else folds:
            entry = self.folds[k]
            head = self.session(entry["head"])
            dims = {i.name: i.shape for i in head.get_inputs()}
            feeds = {}
            for m in self.modalities:
                encoder = self.session(entry[m.value])
                bank.encode(encoder, modality_images(items, m))
                if m is Modality.MG:
                    feats, mask, rows = mg_views(bank, encoder, int(dims["mg_feat"][2]), items, torch.device("cpu"))
                    feeds.update(mg_feat=feats.numpy(), mg_mask=mask.numpy(), mg_rows=rows.numpy())
                else:
                    feeds["us_feat"] = torch.stack([bank.get(encoder, inst.us.path) for inst in items]).numpy()
            out.append(head.run(None, feeds)[0].astype(np.float32))
        return out


class OnnxFeatureBank(FeatureBank):
    """`run.FeatureBank` with ONNX Runtime sessions in place of backbone modules."""

    def __init__(self, source: ImageSource, train: TrainConfig, batch_size: int = 32):
        super().__init__(source, torch.device("cpu"), train, batch_size)

    def encode(self, encoder, records: list[ImageRecord]) -> None:
        todo = list({r.path: r for r in records if (id(encoder), r.path) not in self._store}.values())
        for start, stop in bounded_spans(len(todo), self.batch_size):  # few shapes: bounded session state
            chunk = todo[start:stop]
            feats = encoder.run(None, {"images": self._images(chunk, False).numpy()})[0]
            for rec, feat in zip(chunk, torch.from_numpy(feats), strict=True):
                self._store[(id(encoder), rec.path)] = feat


def onnx_nets(bundle: Bundle, runtime: str) -> OnnxNets:
    """The bundle's sessions for `runtime` ("onnx" or "onnx-int8"), made once per bundle."""
    if runtime not in RUNTIMES[1:]:
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime not in bundle.runtimes:
        bundle.runtimes[runtime] = OnnxNets.of(bundle, int8=runtime == "onnx-int8").load()
    return bundle.runtimes[runtime]


def describe_runtime(bundle: Bundle, runtime: str) -> str:
    """One line for reports and predictions.json."""
    import onnxruntime

    what = "int8 backbones, fp32 heads" if runtime == "onnx-int8" else "fp32"
    return (f"ONNX Runtime {onnxruntime.__version__} on the CPU ({what}); heatmaps skipped: "
            "Grad-CAM runs on the PyTorch runtime only")
