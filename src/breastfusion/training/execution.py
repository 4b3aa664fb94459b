"""How the folds of a cross-validation run: one after another, several at once in worker
processes (`--jobs N`), or each by all ranks together (DistributedDataParallel under torchrun),
behind one function, `run_folds`. A fold's result does not depend on which way it ran.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from .. import allocator
from ..config import RunConfig
from ..errors import BreastFusionError
from ..inference import layout
from .branches import BranchMemo
from .distributed import Distributed
from .fold import run_fold
from .preparation import CVData
from .splits import FoldSplit


def fold_devices(jobs: int) -> list[str]:
    """The device of each parallel fold job: one GPU each (round robin) when there are
    several, else all on the one GPU or the CPU."""
    n = torch.cuda.device_count()
    if n > 1:
        return [f"cuda:{k % n}" for k in range(jobs)]
    return ["cuda" if n == 1 else "cpu"] * jobs


def run_folds_parallel(data: CVData, splits: list[FoldSplit], cfg: RunConfig, out_dir: Path, jobs: int,
                       progress: bool = True, memo: BranchMemo | None = None) -> None:
    """Independent folds as separate processes (`--jobs N`): at most `jobs` at a time, each
    with its share of the CPU threads and, when several GPUs are present, its own GPU.

    Each worker process takes one device for its life (`fold_devices`), so two folds never
    share a GPU while another idles. A fold's result does not depend on which process ran it
    (its seed is the fold's, its data the same `CVData`); a failed fold raises here after the
    others have finished, and rerunning resumes as usual. `cfg.train.device` "auto" uses the
    worker's device; an explicit device is kept."""
    jobs = min(jobs, len(splits))
    threads = max(1, torch.get_num_threads() // jobs)
    ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
    slots = ctx.Queue()
    for device in fold_devices(jobs):
        slots.put(device if cfg.train.device == "auto" else cfg.train.device)
    errors = []
    bar = tqdm(total=len(splits), desc=f"{cfg.name} folds ({jobs} jobs)", unit="fold", disable=not progress,
               leave=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_fold_worker_init,
                             initargs=(slots, threads, allocator.applied())) as pool:
        futures = {pool.submit(_fold_job, data, split, cfg, layout.fold_dir(out_dir, split.fold), memo): split.fold
                   for split in splits}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported after every fold has had its chance
                errors.append((futures[future], exc))
            bar.update(1)
    bar.close()
    if errors:
        fold, exc = min(errors, key=lambda e: e[0])
        raise exc if isinstance(exc, BreastFusionError) else BreastFusionError(
            f"fold {fold} failed in its worker process: {type(exc).__name__}: {exc}") from exc


_WORKER_DEVICE: str | None = None  # the device of this fold worker process (run_folds_parallel)


def _fold_worker_init(slots, threads: int, reuse_memory: bool) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = slots.get()
    torch.set_num_threads(threads)
    if reuse_memory:  # as the parent process does (a spawned process starts with glibc's defaults)
        allocator.reuse_freed_memory()


def _fold_job(data: CVData, split: FoldSplit, cfg: RunConfig, fold_dir: Path, memo: BranchMemo | None) -> None:
    run_fold(data, split, cfg, fold_dir, progress=False, memo=memo, device=torch.device(_WORKER_DEVICE))


def run_folds(data: CVData, splits: list[FoldSplit], cfg: RunConfig, out_dir: Path, progress: bool = True,
              memo: BranchMemo | None = None, jobs: int = 1, dist: Distributed | None = None) -> None:
    """Train `splits` (each fold's files under out_dir/folds/fold_K): with an enabled `dist`, each
    fold by all ranks together; with `jobs` > 1, that many folds at once in worker processes;
    else one after another."""
    if dist is not None and dist.enabled:
        for split in splits:
            run_fold(data, split, cfg, layout.fold_dir(out_dir, split.fold), progress, memo, dist=dist)
            dist.barrier()  # the fold's files are written before anyone reads them
    elif jobs > 1 and len(splits) > 1:
        run_folds_parallel(data, splits, cfg, out_dir, jobs, progress, memo)
    else:
        for split in splits:
            run_fold(data, split, cfg, layout.fold_dir(out_dir, split.fold), progress, memo)
