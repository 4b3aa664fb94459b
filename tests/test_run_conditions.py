"""Trust under real conditions (docs/reliability.md, "Concurrent runs" and "A full disk"):
processes that share a cache or a run folder, and writes that find no room.

The file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stands in for a full disk: a write past it
fails with EFBIG as one on a full file system fails with ENOSPC, and the code treats both alike.
It is set in this process for the span of one `with file_size_limit(...)` block (pytest writes
nothing large meanwhile), which spares a subprocess its ~3-7 s of imports. Where the tests may
mount one (root), a 200 KiB tmpfs gives a real ENOSPC too.
"""

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from breastfusion.cli import main
from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, to_dict
from breastfusion.errors import RunLockedError, StorageError
from breastfusion.files import atomic_path, remove_stale_temporaries, save_npy, write_text
from breastfusion.locks import LOCK_FILE, RunLock
from breastfusion.logs import log_to

from conftest import tiny_model_config, write_tiny_cohort


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Within: no file of this process may grow past `nbytes` (writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def one_thread():
    """Within: torch on one thread, as the subprocesses here (OMP_NUM_THREADS=1): the calibration's
    float sums, and so metrics.json, depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(manifest, config file): one cached-mode US row, 9 cases, 3 folds, one epoch."""
    root = tmp_path_factory.mktemp("tiny")
    manifest = write_tiny_cohort(root / "data", n_cases=9)
    model = tiny_model_config(modalities=["US"],
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    row = RunConfig(name="US", model=model, cv=CVConfig(folds=3, test_folds=1),
                    train=TrainConfig(mode="cached", epochs=1, batch_size=8, feature_copies=1,
                                      cache_dir=str(root / "cache")))
    cfg = root / "rows.yaml"
    cfg.write_text(yaml.safe_dump({"rows": [to_dict(row)]}))
    return manifest, cfg


@pytest.fixture(scope="module")
def alone(tiny, tmp_path_factory):
    """The figures of `tiny` run alone, into its own folder, from its own cache."""
    root = tmp_path_factory.mktemp("alone")
    with one_thread():
        out = CliRunner().invoke(main, _args(*tiny, root / "run", root / "cache"))
    assert out.exit_code == 0, out.output
    return _numbers(root / "run")


def _args(manifest, cfg, out, cache):
    return ["experiment", str(cfg), "--manifest", str(manifest), "-o", str(out), "--cache-dir", str(cache), "--quiet"]


def _numbers(run: Path) -> str:
    """Every figure of metrics.json (rows and statistics), without timings and provenance."""
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["rows"]]
    return json.dumps({"rows": rows, "statistics": metrics["statistics"]}, sort_keys=True)


def _check_cache(cache: Path) -> int:
    """Every entry of a cache is whole (loads, finite); no temporary file is left. How many."""
    assert not list(cache.rglob("*.tmp"))
    entries = list(cache.rglob("*.npy"))
    for f in entries:
        assert np.isfinite(np.load(f)).all(), f
    return len(entries)


# ---- concurrent runs ------------------------------------------------------------------------

WRITER = """
import pathlib, sys, numpy as np
from breastfusion.files import save_npy
value, path, stop = float(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
array = np.full(1 << 18, value, np.float32)   # 1 MiB: each write takes a while
print("ready", flush=True)
writes = 0
while not stop.exists():
    save_npy(path, array)
    writes += 1
print(writes)
"""


def test_two_writers_of_one_cache_entry_never_show_a_reader_half_a_file(tmp_path):
    """Two processes write the same entry over and over (different bytes, to tell them apart)
    while this one reads it: every read finds a whole entry of one writer, and one whole entry is
    left at the end."""
    entry, stop = tmp_path / "cache" / "entry.npy", tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(v), str(entry), str(stop)], stdout=subprocess.PIPE,
                                text=True) for v in (1.0, 2.0)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        reads, seen, deadline = 0, set(), time.monotonic() + 60
        while (reads < 300 or len(seen) < 2) and time.monotonic() < deadline:
            try:
                array = np.load(entry)
            except FileNotFoundError:  # not written yet
                continue
            assert array.shape == (1 << 18,), f"read {array.shape}: half a file"
            values = np.unique(array)
            assert len(values) == 1 and values[0] in (1.0, 2.0), f"read a mixture {values[:5]}"
            seen.add(float(values[0]))
            reads += 1
    finally:
        stop.touch()
        writes = [int(w.communicate(timeout=60)[0]) for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    assert seen == {1.0, 2.0} and min(writes) > 0, (seen, writes)  # the reads overlapped both writers
    assert np.unique(np.load(entry)).tolist() in ([1.0], [2.0])
    assert [p.name for p in entry.parent.iterdir()] == ["entry.npy"]  # no temporary left behind


GO = """
import pathlib, sys, time
import breastfusion.experiment, breastfusion.training.cv  # the slow imports, before the start line
from breastfusion.cli import main
go = pathlib.Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
main(sys.argv[2:], prog_name="breastfusion")
"""


def test_two_experiments_started_together_on_one_empty_cache_give_the_metrics_of_one_alone(tmp_path, tiny, request):
    """One experiment in a subprocess and one in this process, released at the same moment onto
    one empty cache (each fills it: preprocessed images, features), into two run folders."""
    manifest, cfg = tiny
    cache = tmp_path / "cache"
    other = subprocess.Popen([sys.executable, "-c", GO, str(tmp_path / "go"),
                              *_args(manifest, cfg, tmp_path / "a", cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reference = request.getfixturevalue("alone")  # (computed while the subprocess imports)
    assert other.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()
    with one_thread():
        here = CliRunner().invoke(main, _args(manifest, cfg, tmp_path / "b", cache))
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert here.exit_code == 0, here.output
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b") == reference
    assert _check_cache(cache) == 2 * 18  # 18 US images: preprocessed and features


def test_a_second_experiment_into_a_held_run_folder_is_refused_naming_the_holder(tmp_path, tiny):
    manifest, cfg = tiny
    run = tmp_path / "run"
    with RunLock(run, "breastfusion experiment first.yaml"):
        out = CliRunner().invoke(main, _args(manifest, cfg, run, tmp_path / "cache"))
        assert out.exit_code == 3, out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {run}: in use by pid {os.getpid()} "
                                                       "(command breastfusion experiment first.yaml, since "), lines
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing of the refused run
    assert not run.joinpath(LOCK_FILE).exists()  # released


HOLDER = """
import sys
from breastfusion.locks import RunLock
lock = RunLock(sys.argv[1], "breastfusion experiment held.yaml").acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_is_refused_while_its_holder_lives_and_taken_over_once_it_is_killed(tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} \(command breastfusion "
                                                  r"experiment held.yaml, since \d{4}-\d\d-\d\d"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    stale = json.loads((run / LOCK_FILE).read_text())
    assert stale["pid"] == holder.pid  # the lock file outlives its killed holder ...
    with caplog.at_level(logging.WARNING, logger="breastfusion"), RunLock(run, "second"):  # ... but not its lock
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} \(command second"):
            RunLock(run).acquire()  # another holder, even in this process
    assert f"taking over the lock of pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run / LOCK_FILE).exists()


def test_stale_temporaries_are_removed_but_not_those_of_a_live_writer(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {"dead": f".x.npy.{dead.pid}.0123abcd.tmp", "live": f".x.npy.{live.pid}.0123abcd.tmp",
                 "mine": f".x.npy.{os.getpid()}.0123abcd.tmp", "old": ".y.tmp", "new": ".z.tmp"}
        for name in names.values():
            (tmp_path / "sub").mkdir(exist_ok=True)
            (tmp_path / "sub" / name).write_bytes(b"half")
        os.utime(tmp_path / "sub" / names["old"], (time.time() - 7200,) * 2)
        assert remove_stale_temporaries(tmp_path) == 2
        left = {p.name for p in (tmp_path / "sub").iterdir()}
        assert left == {names["live"], names["mine"], names["new"]}
    finally:
        live.kill()
        live.wait()


# ---- a full disk ----------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT], ids=["ENOSPC", "EFBIG", "EDQUOT"])
def test_a_write_that_finds_no_room_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path, code):
    target = tmp_path / "sub" / "metrics.json"
    write_text(target, "old, whole")
    with pytest.raises(StorageError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(code, os.strerror(code))
    assert str(caught.value) == (f"{target}: cannot write ({os.strerror(code)}); free space and run the command "
                                 "again (completed work is kept)")
    assert target.read_text() == "old, whole"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_other_write_failures_are_not_taken_for_a_full_disk(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_path(tmp_path / "x.npy") as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == []


def _writers():
    """Every kind of writer the project uses, each of which words a short write its own way
    (numpy: no errno; safetensors: its own exception; torch: RuntimeError)."""
    import matplotlib.pyplot as plt

    from breastfusion.models.weights import save_weights
    from breastfusion.training.checkpoint import FitResult, save_checkpoint

    big = np.zeros(1 << 16, np.float32)  # 256 KiB
    net = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def csv(path):
        with atomic_path(path) as tmp:
            pd.DataFrame({"p": big}).to_csv(tmp, index=False)

    def png(path):
        fig = plt.figure(figsize=(8, 8))
        fig.gca().imshow(np.random.default_rng(0).random((400, 400)))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    return {"cache.npy": lambda p: save_npy(p, big),
            "model.safetensors": lambda p: save_weights(net, p),
            "checkpoint.pt": lambda p: save_checkpoint(p, 0, net, opt, net.state_dict(), FitResult(0, 0.0), None),
            "predictions.csv": csv, "roc.png": png, "report.md": lambda p: write_text(p, "x" * big.nbytes)}


@pytest.mark.parametrize("name", ["cache.npy", "model.safetensors", "checkpoint.pt", "predictions.csv", "roc.png",
                                  "report.md"])
def test_every_writer_past_the_file_size_limit_raises_storage_error_and_writes_nothing(tmp_path, name):
    write = _writers()[name]
    write_text(tmp_path / name, "old")
    with file_size_limit(64 << 10):
        with pytest.raises(StorageError, match=rf"^{re.escape(str(tmp_path / name))}: cannot write \(File too large\); "
                                               "free space"):
            write(tmp_path / name)
    assert (tmp_path / name).read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_a_storage_error_crosses_a_process_boundary_whole():
    """(fold worker processes, --jobs N, send their errors back pickled)"""
    error = pickle.loads(pickle.dumps(StorageError("m.npy: cannot write (File too large)", "m.npy", "File too large")))
    assert (str(error), error.path, error.reason) == ("m.npy: cannot write (File too large)", "m.npy", "File too large")


def test_no_room_outside_an_atomic_write_is_one_line_too(tmp_path, tiny, monkeypatch):
    """A folder or the log file that cannot be created on a full disk: the command line's last
    net turns the OSError into the same one line (exit 3)."""
    log_file = tmp_path / "run" / "breastfusion.log"

    def full(folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log_file))

    monkeypatch.setattr("breastfusion.experiment.log_to", full)
    out = CliRunner().invoke(main, _args(*tiny, tmp_path / "run", tmp_path / "cache"))
    assert out.exit_code == 3, out.output
    assert out.output.strip().splitlines() == [f"error: {log_file}: cannot write (No space left on device); free "
                                               "space and run the command again (completed work is kept)"]


def test_a_log_file_that_cannot_grow_says_so_once_without_a_traceback(tmp_path, capfd):
    log = logging.getLogger("breastfusion.test")
    with file_size_limit(1000), log_to(tmp_path):  # (closing it flushes what is buffered: fails too)
        for k in range(100):
            log.info("line %d of a long run %s", k, "." * 40)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("cannot write the log (File too large)") == 1
    assert (tmp_path / "breastfusion.log").stat().st_size <= 1000


def test_an_experiment_on_a_full_disk_ends_with_one_line_and_resumes_to_identical_metrics(tmp_path, tiny, alone):
    """The limit lets the caches fill (4 KiB entries) and stops the run at the first network it
    saves (~140 KiB): exit 3, one line naming that file; nothing half-written; the same command
    with room again finishes with the metrics of an uninterrupted run."""
    manifest, cfg = tiny
    run, cache = tmp_path / "run", tmp_path / "cache"
    with file_size_limit(64 << 10), one_thread():
        out = CliRunner().invoke(main, _args(manifest, cfg, run, cache))
    assert out.exit_code == 3, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1, lines
    failed = re.fullmatch(r"error: (\S+): cannot write \(File too large\); free space and run the command again "
                          r"\(completed work is kept\)", lines[0])
    assert failed is not None, lines[0]
    assert failed[1].endswith(".safetensors") and not Path(failed[1]).exists()
    assert _check_cache(cache) == 2 * 18  # the caches were filled before the failure, every entry whole
    assert not list(run.rglob("*.tmp")) and not (run / "metrics.json").exists()
    assert not list(run.rglob("predictions*.csv"))  # no fold claims to be done
    assert not (run / LOCK_FILE).exists()

    with one_thread():
        again = CliRunner().invoke(main, _args(manifest, cfg, run, cache))
    assert again.exit_code == 0, again.output
    assert _numbers(run) == alone


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB file system (tmpfs) at tmp_path/disk, for as long as the test; skipped where
    this process may not mount one (not root, no CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_experiment_that_fills_a_real_file_system_resumes_once_space_returns(small_disk, tiny, alone):
    """The same on a real full disk (ENOSPC): run folder and cache on a 200 KiB file system,
    which fills while the caches are written; grown to 20 MiB, the same command finishes."""
    run, cache = small_disk / "run", small_disk / "cache"
    with one_thread():
        out = CliRunner().invoke(main, _args(*tiny, run, cache))
    assert out.exit_code == 3, out.output
    lines = out.output.strip().splitlines()
    failed = re.fullmatch(r"error: (\S+): cannot write \(No space left on device\); free space and run the command "
                          r"again \(completed work is kept\)", lines[-1])
    assert failed is not None, lines
    assert all("cannot write the log (No space left on device)" in line for line in lines[:-1]), lines
    assert 0 < _check_cache(cache) < 2 * 18, "the disk was to fill while the caches were written"
    assert not (run / "metrics.json").exists() and not (run / LOCK_FILE).exists()

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    with one_thread():
        again = CliRunner().invoke(main, _args(*tiny, run, cache))
    assert again.exit_code == 0, again.output
    assert _numbers(run) == alone
    assert _check_cache(cache) == 2 * 18
