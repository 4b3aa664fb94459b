"""`breastfusion cache list / prune`: what the caches hold and removing entries."""

import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner

from breastfusion.caches import chosen, entries, prune, table
from breastfusion.cli import main
from breastfusion.config import BackboneConfig
from breastfusion.errors import BreastFusionError
from breastfusion.preprocess.pipeline import PreprocessCache, Preprocessor
from breastfusion.records import read_manifest
from breastfusion.training.augment import Augment
from breastfusion.training.features import FeatureStore

from conftest import write_tiny_cohort

DAY = 86400


def fake_entry(root, kind, name, key, sizes, age_days):
    folder = root / kind / name
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps(key))
    for i, n in enumerate(sizes):
        (folder / f"{i}.npy").write_bytes(b"x" * n)
    stamp = time.time() - age_days * DAY
    for f in folder.iterdir():
        os.utime(f, (stamp, stamp))
    return folder


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    fake_entry(root, "features", "aaaa1111", {"backbone": "efficientnet_lite2", "image": {"size": 512},
                                              "copies": 3, "seed": 0, "stage": "all", "dtype": "float16"},
               [3000, 3000], age_days=10)
    fake_entry(root, "features", "aaaa2222", {"backbone": "efficientnet_lite0", "image": {"size": 128},
                                              "copies": 2, "seed": 1}, [100], age_days=1)
    fake_entry(root, "preprocessed", "bbbb3333", {"size": 512, "chest_wall": "left", "colour": "reject"},
               [500, 500, 500], age_days=0)
    return root


def test_list_sizes_ages_and_parameters(cache):
    found = entries(cache)
    assert [e.name for e in found] == ["aaaa1111", "bbbb3333", "aaaa2222"]  # largest first
    big = found[0]
    assert big.files == 3 and big.bytes == 6000 + len((cache / "features/aaaa1111/key.json").read_text())
    assert 9.9 < big.age_days() < 10.1
    assert big.summary == "efficientnet_lite2, 512 px, activations to all (float16), 3 copies, seed 0"
    assert found[2].summary == "efficientnet_lite0, 128 px, pooled features, 2 copies, seed 1"
    assert found[1].summary == "512 px, chest wall left, colour reject"
    text = table(found)
    assert "aaaa1111" in text and "3 entries" in text
    assert entries(cache / "nothing-here") == []
    assert table([]) == "the cache is empty"


def test_choose_by_name_start_or_age(cache):
    found = entries(cache)
    assert [e.name for e in chosen(found, ["aaaa1"])] == ["aaaa1111"]
    assert sorted(e.name for e in chosen(found, older_than_days=0.5)) == ["aaaa1111", "aaaa2222"]
    assert chosen(found, older_than_days=30) == []
    with pytest.raises(BreastFusionError, match="matches 2 entries"):
        chosen(found, ["aaaa"])
    with pytest.raises(BreastFusionError, match="matches 0 entries"):
        chosen(found, ["zz"])
    with pytest.raises(BreastFusionError, match="days >= 0"):
        chosen(found, older_than_days=-1)


def test_prune_removes_only_the_chosen(cache):
    found = entries(cache)
    freed = prune(chosen(found, older_than_days=5))
    assert freed == found[0].bytes
    assert not (cache / "features/aaaa1111").exists()
    assert {e.name for e in entries(cache)} == {"aaaa2222", "bbbb3333"}


def test_cli_dry_run_removes_nothing_and_prune_does(cache):
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0 and "aaaa2222" in listed.output
    quiet = runner.invoke(main, ["cache", "-q", "list", "--cache-dir", str(cache)])  # the group's flag
    assert quiet.exit_code == 0 and quiet.output == listed.output
    dry = runner.invoke(main, ["cache", "prune", "--cache-dir", str(cache), "--older-than", "5", "--dry-run"])
    assert dry.exit_code == 0 and "would free" in dry.output
    assert (cache / "features/aaaa1111").exists()
    done = runner.invoke(main, ["cache", "prune", "--cache-dir", str(cache), "aaaa2"])
    assert done.exit_code == 0 and "removed 1 entries" in done.output
    assert not (cache / "features/aaaa2222").exists() and (cache / "features/aaaa1111").exists()
    bare = runner.invoke(main, ["cache", "prune", "--cache-dir", str(cache)])
    assert bare.exit_code != 0 and "--older-than" in bare.output


def test_a_run_that_only_reads_an_entry_marks_it_used(tmp_path):
    """Reading preprocessed images and features back refreshes their entries' key.json, so
    that --older-than never takes an entry that is still in use."""
    manifest = read_manifest(write_tiny_cohort(tmp_path, n_cases=2, size=40))
    records = manifest.records[:3]
    root = tmp_path / "cache"
    source = PreprocessCache(root, Preprocessor(size=32))
    bb = BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32)
    FeatureStore(root, bb, source, Augment(), copies=1).features(records, progress=False)
    old = time.time() - 20 * DAY
    for e in entries(root):
        for f in e.path.iterdir():
            os.utime(f, (old, old))
    assert len(chosen(entries(root), older_than_days=10)) == 2
    reader = PreprocessCache(root, Preprocessor(size=32))
    for r in records:
        assert isinstance(reader.get(r.path, r.modality, r.side), np.ndarray)
    FeatureStore(root, bb, reader, Augment(), copies=1).features(records, progress=False)
    assert reader.computed == 0
    assert chosen(entries(root), older_than_days=10) == []
