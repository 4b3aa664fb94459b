"""kill -9 in the middle of a cross-validation, then resume: the metrics are those of a run
that was never interrupted (CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, to_dict

from conftest import tiny_model_config, write_tiny_cohort


def _experiment(cfg, manifest, out):
    return [sys.executable, "-m", "breastfusion", "experiment", str(cfg), "--manifest", str(manifest),
            "-o", str(out), "--quiet"]


def _uninterrupted(rows, manifest, out):
    """The reference run, in this process on one thread as the subprocesses (it imports nothing anew)."""
    import torch

    from breastfusion.experiment import run_experiment
    from breastfusion.records import read_manifest

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_experiment(read_manifest(manifest), rows, out, progress=False)
    finally:
        torch.set_num_threads(threads)


def _levels(metrics):
    return [json.dumps({k: row[k] for k in ("instance", "patient", "patient_mean")}) for row in metrics["rows"]]


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "data", n_cases=20)
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    rows = [RunConfig(name=name, model=type(model)(**{**model.__dict__, "modalities": mods}),
                      train=TrainConfig(mode="cached", epochs=6, batch_size=8, feature_copies=1,
                                        cache_dir=str(tmp_path / "cache")),
                      cv=CVConfig(folds=3, test_folds=1))
            for name, mods in (("US", ["US"]), ("MM", ["MG", "US"]))]
    cfg = tmp_path / "rows.yaml"
    cfg.write_text(yaml.safe_dump({"rows": [to_dict(r) for r in rows]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_experiment(cfg, manifest, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "rows" / "MM" / "folds" / "fold_0" / "predictions.csv"  # mid-way through row 2 of 2
    deadline = time.time() + 240
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "metrics.json").is_file()

    subprocess.run(_experiment(cfg, manifest, killed), env=env, check=True, capture_output=True)
    clean = _uninterrupted(rows, manifest, tmp_path / "clean")
    resumed = json.loads((killed / "metrics.json").read_text())
    assert _levels(resumed) == _levels(clean)
    assert not list(killed.rglob("*.tmp"))  # a temp file left by the kill was never taken for a result


def test_corrupt_cached_features_and_shared_branches_are_recomputed_not_used(tmp_path):
    """NaN/inf or truncated feature files and a corrupt shared-branch file are recomputed;
    the metrics equal those of a run from a clean cache."""
    import numpy as np

    from breastfusion.experiment import run_experiment
    from breastfusion.records import read_manifest

    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=15))
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))

    def rows(cache):
        return [RunConfig(name=name, model=type(model)(**{**model.__dict__, "modalities": mods}),
                          train=TrainConfig(mode="cached", epochs=3, batch_size=8, feature_copies=1,
                                            cache_dir=str(cache)), cv=CVConfig(folds=3, test_folds=1))
                for name, mods in (("US", ["US"]), ("MM", ["MG", "US"]))]

    clean = run_experiment(manifest, rows(tmp_path / "cache"), tmp_path / "first", progress=False)
    files = sorted((tmp_path / "cache" / "features").rglob("*.npy"))
    np.save(files[0], np.full((2, 512), np.nan, dtype=np.float32))
    np.save(files[1], np.full((2, 512), np.inf, dtype=np.float32))
    files[2].write_bytes(files[2].read_bytes()[:40])  # truncated
    branch = next((tmp_path / "first" / "branches").glob("*.safetensors"))
    branch.write_bytes(b"not a safetensors file")
    for fold in (tmp_path / "first" / "rows" / "MM" / "folds").iterdir():
        (fold / "predictions.csv").unlink()  # make the MM row train again, reading the memo
    again = run_experiment(manifest, rows(tmp_path / "cache"), tmp_path / "first", progress=False)
    assert _levels(again) == _levels(clean)
    for f in files[:3]:
        assert np.isfinite(np.load(f)).all()


def test_kill_9_inside_a_fold_resumes_from_the_epoch_checkpoint_with_identical_metrics(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "data", n_cases=15)
    model = tiny_model_config(modalities=["US"],
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    row = RunConfig(name="US", model=model, cv=CVConfig(folds=3, test_folds=1),
                    train=TrainConfig(mode="cached", epochs=60, batch_size=4, feature_copies=1,
                                      cache_dir=str(tmp_path / "cache"), checkpoint_seconds=0))
    cfg = tmp_path / "row.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(row)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_experiment(cfg, manifest, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fold0 = killed / "rows" / "US" / "folds" / "fold_0"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if (fold0 / "checkpoint.pt").is_file() and os.path.getsize(fold0 / "checkpoint.pt") > 0:
            time.sleep(0.3)  # a few more epochs, so the kill lands anywhere in the loop
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (fold0 / "predictions.csv").is_file() and (fold0 / "checkpoint.pt").is_file()

    subprocess.run(_experiment(cfg, manifest, killed), env=env, check=True, capture_output=True)
    clean = _uninterrupted([row], manifest, tmp_path / "clean")
    fit = json.loads((fold0 / "fit.json").read_text())
    assert fit["resumed_after_epoch"] is not None and 0 <= fit["resumed_after_epoch"] < 59
    assert len(fit["history"]) == 60 and not list(fold0.glob("checkpoint*.pt"))
    resumed = json.loads((killed / "metrics.json").read_text())
    assert _levels(resumed) == _levels(clean)
