"""Running a sharded stage (capture, align, fuse, sample, score): its folder's key, resume and
manifest around a per-shard function (``run_sharded``), the shards spread over worker
processes (``map_shards``) and over a launcher's ranks. The on-disk format is
``fusechat.shards``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fusechat.io import read_manifest
from fusechat.ranks import Ranks
from fusechat.shards import begin_stage, finish_stage

log = logging.getLogger(__name__)

_WORKER_STATE: Any = None


def _init_worker(setup: Callable, job: Any) -> None:
    _set_state(setup(job))


def _in_worker(task: Callable, i: int) -> Any:
    return task(_WORKER_STATE, i)


def _set_state(state: Any) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def map_shards(
    shards: Sequence[int],
    task: Callable,
    state: Any,
    workers: int = 1,
    rebuild: tuple[Callable, Any] | None = None,
    desc: str = "",
) -> list:
    """``task(state, i)`` for every shard ``i`` of ``shards``, results in that order. With ``workers >
    1`` the shards are spread over processes: forked where the platform forks (they inherit
    ``state``, loaded tokenizers and warm caches included), else spawned, each building its
    own as ``setup(job)`` from ``rebuild = (setup, job)`` (module-level functions and a
    picklable job). Every shard depends on its own inputs alone, so the outputs are those of
    one process."""
    import contextlib
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        n = len(shards)
        if workers <= 1 or n <= 1:
            results: Iterator = (task(state, i) for i in shards)
        else:
            if "fork" in mp.get_all_start_methods():
                # the workers run numpy and tokenizers only; tokenizers' threads are turned off
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                _set_state(state)
                stack.callback(_set_state, None)
                ctx, init, args = mp.get_context("fork"), None, ()
            elif rebuild is None:
                raise ValueError("spawned workers need rebuild=(setup, job)")
            else:
                ctx, init, args = mp.get_context("spawn"), _init_worker, rebuild
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, n), ctx, init, args))
            results = pool.map(partial(_in_worker, task), shards)
        # closed before an error prints; desc None: the task draws its own progress
        bar = stack.enter_context(tqdm(total=n, desc=desc, disable=desc is None))
        out = []
        for r in results:
            out.append(r)
            bar.update()
        return out


def run_sharded(
    out: str | os.PathLike,
    key: dict,
    n_shards: int,
    start: Callable[[frozenset[int]], tuple[Any, Any]],
    task: Callable[[Any, int], tuple[Any, str | None]],
    summarize: Callable[[list], dict],
    overwrite: bool = False,
    workers: int = 1,
    setup: Callable | None = None,
    desc: str | None = "",
    ranks: Ranks | None = None,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> dict:
    """A sharded stage from its per-shard function; returns the manifest.

    Owns what every stage shares: the folder's key (``begin_stage``: a finished folder with
    this key is reused, a partial one resumed, another key refused unless ``overwrite``; it
    may not overlap the stage's ``inputs``), the
    shards (``map_shards`` over ``workers``), their checksums and the manifest
    (``finish_stage``). ``start(done)``, given the shards a previous run wrote, returns the
    shared state and a picklable job (``setup(job)`` rebuilds the state in a spawned worker);
    ``task(state, i)`` returns shard ``i``'s result and the checksum of what it wrote (None
    when the shard was already there); ``summarize(results)`` gives the manifest's stats.

    Under a launcher (``ranks``, several processes) each rank runs every N-th missing shard
    and rank 0, once all exist, prepares the folder before and writes the manifest after."""
    ranks = ranks or Ranks()
    if ranks.rank == 0:  # one process prepares the folder (and clears it with overwrite)
        done = begin_stage(out, key, overwrite, inputs=inputs)
    ranks.barrier()
    if ranks.rank != 0:
        done = begin_stage(out, key, prepared=True)
    if done is None:
        log.info("%s: %s already complete", out, key.get("stage", "stage"))
        return read_manifest(out)
    state, job = start(frozenset(done))
    shards = list(range(n_shards))
    if ranks.world > 1:  # the missing shards, shared out; the others' results stay unknown
        shards = ranks.shards([i for i in shards if i not in done])
    parts = map_shards(shards, task, state, workers, (setup, job) if setup else None, desc)
    ranks.barrier()  # every shard exists
    if ranks.rank != 0:
        ranks.barrier()  # rank 0 writes the manifest
        return read_manifest(out)
    stats = summarize([r for r, _ in parts])
    # the kept shards' checksums were verified by begin_stage: not read again
    sums = {**done, **{i: d for i, (_, d) in zip(shards, parts, strict=True) if d}}
    manifest = finish_stage(out, key, n_shards, stats, sums)
    ranks.barrier()
    return manifest
