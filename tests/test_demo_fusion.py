"""The demo's claim on a smaller synthetic cohort: fusing MG and US beats each modality alone.

The generator is declarative (each modality's strengths as in the paper) and
is not fitted to any model; this test fails if fusion, ArcFace, training or
evaluation stop working together.
"""

import pytest

from breastfusion.datasets.synthetic import SynthConfig, generate_cohort
from breastfusion.experiment import run_experiment
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.records import read_manifest


@pytest.mark.slow
def test_mm_concat_beats_both_single_modalities(tmp_path):
    generate_cohort(tmp_path / "cohort", SynthConfig(n_patients=150, image_size=96, seed=11))
    manifest = read_manifest(tmp_path / "cohort" / "manifest.csv")
    base = cpu_reference(image_size=96, epochs=40, copies=1)
    base.train.cache_dir = str(tmp_path / "cache")
    base.cv.folds = 5
    base.cv.test_folds = 1
    metrics = run_experiment(manifest, demo_rows(base), tmp_path / "run", progress=False)
    macro = {r["name"]: r["patient"]["macro_auc"]["mean"] for r in metrics["rows"]}
    assert macro["concat MM"] > macro["single US"], macro
    assert macro["concat MM"] > macro["single MG"], macro
