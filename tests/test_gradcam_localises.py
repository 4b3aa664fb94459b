"""Grad-CAM points at the generated lesions: frozen features (more often than a shuffled
model) and a fine-tuned backbone at 320 px (inside the lesion for most lesion images).

Frozen EfficientNet-Lite0 ImageNet features at 224 px (7x7 Grad-CAM grid): the trained US
model's map maximum falls inside the lesion for about a fifth to a quarter of lesion images
(abnormal-evidence target), the shuffled model's for none; a centre prior does better than
both (about half). That test pins what frozen features give, so that it fails if the heatmaps
stop depending on what the model learnt or stop being mapped onto the lesion. The second test
is issue 5's criterion, met by fine-tuning at 320 px (docs/results/explain.md).
"""

import numpy as np
import pytest

from breastfusion.datasets.synthetic import SynthConfig, generate_cohort
from breastfusion.experiment import run_experiment
from breastfusion.explain.folds import explain_row, shuffle_weights, synthetic_lesions
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.records import read_manifest
from breastfusion.vocab import Modality


@pytest.mark.slow
def test_gradcam_finds_generated_lesions_more_often_than_a_shuffled_model(tmp_path):
    root = tmp_path / "synth"
    generate_cohort(root, SynthConfig(n_patients=60, image_size=224, us_per_patient=(2, 3), seed=3),
                    progress=False)
    manifest = read_manifest(root / "manifest.csv")
    (row,) = [r for r in demo_rows(cpu_reference(image_size=224, epochs=40, copies=1)) if r.name == "single US"]
    row.cv.folds, row.cv.test_folds = 3, 1
    row.train.cache_dir = str(tmp_path / "cache")
    run_experiment(manifest, [row], tmp_path / "run", progress=False)

    lesions = synthetic_lesions(root / "lesions.csv")
    row_dir = tmp_path / "run" / "rows" / "single_US"
    trained = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal")
    shuffled = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal",
                           perturb=shuffle_weights())
    assert len(trained) == len(shuffled) >= 40  # every lesion image of a benign/malignant patient, once
    hit = np.mean([e.score.hit for e in trained])
    hit_shuffled = np.mean([e.score.hit for e in shuffled])
    lesion_area = np.mean([e.score.lesion_fraction for e in trained])
    energy = np.nanmean([e.score.energy for e in trained])
    energy_shuffled = np.nanmean([e.score.energy for e in shuffled])
    assert hit >= hit_shuffled + 0.1, (hit, hit_shuffled, lesion_area)
    assert energy >= 1.5 * lesion_area and energy >= 2 * energy_shuffled, (energy, energy_shuffled, lesion_area)


@pytest.mark.slow
def test_fine_tuned_gradcam_points_inside_most_generated_lesions(tmp_path):
    """Issue 5's criterion: a model trained on the synthetic cohort puts its Grad-CAM maximum
    inside the generated lesion for most lesion cases, a shuffled-weights model does not.

    The recipe of docs/results/explain.md at 320 px (10 x 10 grid): single US model,
    EfficientNet-Lite0 fine-tuned (stem frozen), one fold of 4 trained (about 3.5 min on 2
    cores), every lesion image of its validation patients explained for the abnormal
    evidence. Measured: 67% of 36 lesion images (shuffled 0%, centre prior 56%), energy
    inside 31% against a lesion area of 3.5%. At 224 px the same recipe gives 46-55%: the
    cells of the 7 x 7 grid are too coarse next to the posterior acoustic feature under the
    mass, where much of the evidence sits."""
    import yaml

    from breastfusion.config import to_dict
    from breastfusion.presets import localisation_row
    from breastfusion.training.cv import prepare, run_fold

    root = tmp_path / "synth"
    generate_cohort(root, SynthConfig(n_patients=160, image_size=320, us_per_patient=(2, 3), seed=3),
                    progress=False)
    manifest = read_manifest(root / "manifest.csv")
    row = localisation_row("US", image_size=320, epochs=12)
    row.train.cache_dir = str(tmp_path / "cache")
    row_dir = tmp_path / "row"
    row_dir.mkdir()
    (row_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(row), sort_keys=False))
    data = prepare(manifest, row, progress=False)
    run_fold(data, data.splits[0], row, row_dir / "folds" / "fold_0", progress=False)

    lesions = synthetic_lesions(root / "lesions.csv")
    trained = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal")
    shuffled = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal",
                           perturb=shuffle_weights())
    assert len(trained) == len(shuffled) >= 30
    hit = np.mean([e.score.hit for e in trained])
    hit_shuffled = np.mean([e.score.hit for e in shuffled])
    energy = np.nanmean([e.score.energy for e in trained])
    lesion_area = np.mean([e.score.lesion_fraction for e in trained])
    assert hit > 0.5, (hit, hit_shuffled, energy, lesion_area)  # most lesion images
    assert hit_shuffled < 0.1, hit_shuffled
    assert energy >= 5 * lesion_area, (energy, lesion_area)
