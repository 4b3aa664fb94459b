"""What every benchmark shares: timing, peak memory, cohorts, and where figures go.

A benchmark writes its figures twice: the full record as JSON under
``bench/results/<name>.json`` (not committed: run output) and one Markdown
section in ``docs/performance.md`` between ``<!-- bench:<name> -->`` markers,
replaced on each run, that names the command, machine and commit.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from breastfusion import allocator
from breastfusion.evaluation.aggregate import PROBA_COLUMNS, aggregate
from breastfusion.evaluation.metrics import macro_auc
from breastfusion.inference import layout
from breastfusion.provenance import git_commit, machine, now, versions

allocator.reuse_freed_memory()  # as the command line does (breastfusion/allocator.py)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
WORK = Path(os.environ.get("BENCH_WORK", ROOT / ".cache" / "bench"))  # cohorts, caches, bundles


class Clock:
    """Wall time of a block: ``with Clock() as c: ...; c.seconds``."""

    def __enter__(self) -> Clock:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children) in MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def threads() -> int:
    import torch

    return torch.get_num_threads()


def synthetic_cohort(n_patients: int, image_size: int = 128, us_per_patient: tuple[int, int] = (1, 4),
                     seed: int = 0):
    """A synthetic cohort under WORK, generated once per parameter set; returns its Manifest."""
    from breastfusion.datasets.synthetic import SynthConfig, generate_cohort
    from breastfusion.records import read_manifest

    lo, hi = us_per_patient
    root = WORK / f"synth_{n_patients}p_{image_size}px_us{lo}-{hi}_s{seed}"
    if not (root / "manifest.csv").is_file():
        generate_cohort(root, SynthConfig(n_patients=n_patients, image_size=image_size,
                                          us_per_patient=us_per_patient, seed=seed), progress=False)
    return read_manifest(root / "manifest.csv")


def command() -> str:
    """The command line as run from the repository root."""
    script = Path(sys.argv[0]).resolve()
    script_text = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join(shlex.quote(a) for a in ["python", script_text, *sys.argv[1:]])


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


def short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def record(name: str, figures: dict, markdown: str, doc: Path = PERFORMANCE_MD) -> Path:
    """Save the figures as JSON and put `markdown` (this run's lines) into `doc`
    (docs/performance.md unless named), between this benchmark's markers."""
    meta = {"command": command(), "commit": git_commit(), "machine": machine(), "torch_threads": threads(),
            "when": now(), "versions": versions(),
            "malloc_reuse": allocator.applied()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"bench": name, **meta, "figures": figures}, indent=1))
    section = (f"<!-- bench:{name} -->\n{markdown.rstrip()}\n\n"
               f"`{meta['command']}` at commit `{short(meta['commit'])}`, {meta['when']}, "
               f"{meta['machine']}, {meta['torch_threads']} torch threads"
               f"{', malloc thresholds raised' if meta['malloc_reuse'] else ''}.\n<!-- /bench:{name} -->")
    text = doc.read_text() if doc.is_file() else "# Performance\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    print(markdown)
    print(f"figures: {out.relative_to(ROOT)}; section '{name}' of {doc.relative_to(ROOT)}")
    return out


@contextmanager
def quiet_logs():
    import logging

    level = logging.root.level
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        logging.root.setLevel(level)


def fold_means(per_fold: list[dict]) -> dict[str, float]:
    """Each figure's mean over the folds that have it (a "fold" key is the fold's number, not a
    figure); keys in the order they first appear."""
    keys = list(dict.fromkeys(k for f in per_fold for k in f if k != "fold"))
    return {k: float(sum(f[k] for f in per_fold if k in f) / sum(k in f for f in per_fold)) for k in keys}


def append_jsonl(name: str, entry: dict) -> Path:
    """Append one run's record to bench/results/<name>.jsonl (run output, not committed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.jsonl"
    with open(out, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return out


def score_splits(folds: list[int], fold_scores) -> dict:
    """Score each fold's test split (the selection figure) and validation fold (reported only)
    of saved predictions: `fold_scores(fold, prediction file name)` -> {name: macro AUC}. Returns
    {split: {"mean_macro_auc": {name: %}, "per_fold": [...]}} and prints each split's means."""
    out = {}
    for split, file in (("test", layout.TEST_PREDICTIONS_FILE), ("validation", layout.PREDICTIONS_FILE)):
        per_fold = [fold_scores(f, file) for f in folds]
        means = {name: 100 * v for name, v in fold_means(per_fold).items()}
        out[split] = {"mean_macro_auc": means, "per_fold": per_fold}
        print(split, "  ".join(f"{k}: {v:.1f}" for k, v in means.items()))
    return out


def patient_macro_auc(predictions) -> float:
    """Macro one-vs-rest AUC of a prediction table's cases (breasts), each the mean of its
    instances' probabilities, as the experiments' patient level."""
    patients = aggregate(predictions, "mean")
    return macro_auc(patients["label"].to_numpy(int), patients[PROBA_COLUMNS].to_numpy(float))
