"""Distributed training (DDP, gloo on CPU): the same batches, loss, selection and weights as one process."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from breastfusion.config import TrainConfig
from breastfusion.inference.instances import Instance
from breastfusion.models.network import HeadOnly, build_head
from breastfusion.records import ImageRecord
from breastfusion.training.data import FeatureInstances
from breastfusion.training.distributed import Distributed, distributed_eval_loader, distributed_loader
from breastfusion.training.loop import fit, predict_logits
from breastfusion.vocab import LABELS, MG_SLOTS, Modality, Side

from conftest import tiny_model_config

WORLD = 2
DIM = 12
SEED = 3
BATCH = 7  # 36 training instances: five batches of 7, then one of 1 (a rank gets padding)


class _Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": torch.tensor(i)}


def _batches(loader):
    return [(b["index"].tolist(), b["sample_weight"].tolist() if "sample_weight" in b else None) for b in loader]


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_exactly_the_single_process_batches(drop_last):
    n, batch_size = 23, 5  # 4 full batches and one of 3
    for world in (1, 2, 3, 4, 7):
        single = DataLoader(_Indices(n), batch_size=batch_size, shuffle=True, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(SEED))
        ranks = [distributed_loader(DataLoader(_Indices(n), batch_size=batch_size, shuffle=True, drop_last=drop_last,
                                               generator=torch.Generator().manual_seed(SEED)),
                                    Distributed(rank=r, world=world)) for r in range(world)]
        for _epoch in range(3):  # each epoch a new permutation, drawn alike
            expected = [indices for indices, _ in _batches(single)]
            got = [_batches(loader) for loader in ranks]
            assert all(len(g) == len(expected) == len(loader) for g, loader in zip(got, ranks, strict=True))
            for k, batch in enumerate(expected):
                parts = [got[r][k] for r in range(world)]
                assert all(len(indices) >= 1 for indices, _ in parts)  # every rank takes part in every step
                real = [i for indices, weights in parts for i, w in zip(indices, weights, strict=True) if w == 1.0]
                assert real == batch, (world, k)  # contiguous slices, in rank order
                sizes = [sum(weights) for _, weights in parts]
                assert max(sizes) - min(sizes) <= 1
                for indices, weights in parts:
                    if weights == [0.0]:  # padding: a sample of the batch, weight 0
                        assert len(batch) < world and indices[0] in batch
            # the loader generators were consumed as one process consumes its own
            assert all(torch.equal(loader.generator.get_state(), single.generator.get_state()) for loader in ranks)


def test_prediction_shards_cover_the_items_in_order():
    loader = DataLoader(_Indices(11), batch_size=4)
    for world in (1, 2, 3, 12):
        shards = [[i for b in distributed_eval_loader(loader, Distributed(rank=r, world=world)) for i in b["index"]]
                  for r in range(world)]
        assert [int(i) for shard in shards for i in shard] == list(range(11))


def test_single_process_collectives_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with Distributed.from_env("cpu") as dist:
        assert not dist.enabled and dist.is_main and (dist.rank, dist.world) == (0, 1)
        assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
        dist.barrier()
        t = torch.ones(2)
        assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    assert Distributed.single("cpu") == Distributed()


# ---------------------------------------------------------------- DDP against one process

def _data():
    """Cached-feature instances (MG + US) of 3 unbalanced classes, features carrying the class."""
    rng = np.random.default_rng(0)
    features, instances = {}, []
    labels = [0] * 22 + [1] * 15 + [2] * 13
    rng.shuffle(labels)
    for i, y in enumerate(labels):
        mg = []
        for k in range(4):
            path = f"P{i}/mg{k}"
            if k == 3 and i % 4 == 0:
                mg.append(None)  # a missing view
                continue
            features[path] = (rng.normal(size=(2, DIM)) + y).astype(np.float32)
            mg.append(ImageRecord(f"P{i}", Side.LEFT, Modality.MG, path))
        path = f"P{i}/us"
        features[path] = (rng.normal(size=(2, DIM)) - y).astype(np.float32)
        us = ImageRecord(f"P{i}", Side.LEFT, Modality.US, path)
        instances.append(Instance(f"P{i}#us", f"P{i}", "", LABELS[y], tuple(mg), us, MG_SLOTS))
    return instances[:36], instances[36:], features


class _Crash(Exception):
    pass


class _CrashingInstances(FeatureInstances):
    """Training data whose epoch `crash_at` never starts: the training stops there, as if killed."""

    crash_at: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.crash_at:
            raise _Crash(epoch)
        super().set_epoch(epoch)


def _train(dist=None, checkpoint=None, crash_at=None):
    train, test, features = _data()
    torch.manual_seed(SEED)
    model = HeadOnly(build_head(tiny_model_config(), DIM))
    cfg = TrainConfig(mode="cached", epochs=4, batch_size=BATCH, optimizer="sgd", lr=5e-3, select_by="loss",
                      seed=SEED, checkpoint_seconds=0)
    train_set = _CrashingInstances(train, features, True, SEED)
    train_set.crash_at = crash_at
    train_loader = DataLoader(train_set, batch_size=BATCH, shuffle=True,
                              generator=torch.Generator().manual_seed(SEED), drop_last=False)
    test_loader = DataLoader(FeatureInstances(test, features, False, SEED), batch_size=4)
    device = dist.device if dist is not None else torch.device("cpu")
    result = fit(model, train_loader, test_loader, cfg, 1.0, device, progress=False, checkpoint=checkpoint, dist=dist)
    logits, index = predict_logits(model, test_loader, device, dist=dist)
    return {"result": result, "state": model.state_dict(), "logits": logits, "index": index}


def _rank(rank: int, port: int, out: str) -> None:
    """One torchrun-like process: environment, process group; a training stopped after epoch 1,
    resumed from its checkpoint; the result to a file."""
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    checkpoint = Path(out) / "checkpoint.pt"
    with Distributed.from_env("cpu") as dist:
        assert dist.enabled and dist.world == WORLD and dist.is_main == (rank == 0)
        with pytest.raises(_Crash):
            _train(dist, checkpoint, crash_at=2)
        assert checkpoint.is_file()  # written by rank 0 alone, read by rank 0 alone
        got = _train(dist, checkpoint)
        dist.barrier()
        assert got["result"].resumed_after_epoch == 1 and not checkpoint.exists()
    torch.save(got, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    if Path("/sys/class/net/lo").exists():
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # localhost only
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _train()  # uninterrupted, one process

    for got in ranks:
        assert got["result"].best_epoch == single["result"].best_epoch
        np.testing.assert_allclose([h["train_loss"] for h in got["result"].history],
                                   [h["train_loss"] for h in single["result"].history], rtol=1e-5)
        np.testing.assert_allclose([h["test_loss"] for h in got["result"].history],
                                   [h["test_loss"] for h in single["result"].history], rtol=1e-5)
        assert got["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():
            torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=1e-5, msg=key)
        np.testing.assert_array_equal(got["index"], single["index"])
        np.testing.assert_allclose(got["logits"], single["logits"], atol=1e-5, rtol=1e-5)
    # every rank holds the very same weights
    for key, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][key], value), key


def test_torchrun_experiment_on_two_processes_gives_the_single_process_results(tmp_path):
    """The documented command, `torchrun ... -m breastfusion experiment`, end to end: the paper's
    fusion (branches first, shared through the memo), 3 folds, cached features; only rank 0
    writes; its predictions equal a one-process run's."""
    import subprocess
    import sys

    import pandas as pd
    import yaml

    from breastfusion.config import BackboneConfig, CVConfig, RunConfig, to_dict
    from breastfusion.experiment import run_experiment
    from breastfusion.records import read_manifest

    from conftest import write_tiny_cohort

    manifest = write_tiny_cohort(tmp_path / "data", n_cases=18)
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    row = RunConfig(name="MM", model=model, cv=CVConfig(folds=3, test_folds=1),
                    train=TrainConfig(mode="cached", epochs=3, batch_size=5, feature_copies=1,
                                      cache_dir=str(tmp_path / "cache"), device="cpu"))
    (tmp_path / "rows.yaml").write_text(yaml.safe_dump({"rows": [to_dict(row)]}))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "breastfusion",
                           "experiment", str(tmp_path / "rows.yaml"), "--manifest", str(manifest),
                           "-o", str(tmp_path / "ddp"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    single = run_experiment(read_manifest(manifest), [row], tmp_path / "one", progress=False)
    a = pd.read_csv(tmp_path / "one" / "rows" / "MM" / "predictions_instances.csv")
    b = pd.read_csv(tmp_path / "ddp" / "rows" / "MM" / "predictions_instances.csv")
    assert list(a["instance_id"]) == list(b["instance_id"])
    cols = [c for c in a.columns if c.startswith("p_")]
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), atol=1e-5)
    assert (tmp_path / "ddp" / "report.md").is_file()
    assert single["rows"][0]["patient"]["confusion"] is not None
    assert sorted(p.name for p in (tmp_path / "ddp" / "branches").glob("*.json")) == \
        sorted(p.name for p in (tmp_path / "one" / "branches").glob("*.json"))  # same shared branches
