"""Generation on every rank while rank 0 runs a one-process stage (evaluate, curate, rejection_sample).

Those stages are written for one process: rank 0 runs them and alone writes their files. With N
processes (hardware=cpu_ddp2, 2xa100, Slurm tasks) the other ranks do not sit idle at a barrier: they
*follow* rank 0 and generate their share of its prompts on their own GPU (hardware.device), so an
evaluation on 8 GPUs takes about an eighth of the time, and no rank waits inside NCCL, whose watchdog
kills a process after `ddp_timeout` (30 min).

    rank 0: with sharded.leading(): stage(...)                  ranks 1..N-1: sharded.follow()
      generation.load(cfg, path)   -- load load_here, cfg, path -->  load_here(cfg, path)
      backend.generate(rows, n)    -- their batches             -->  generate them; results gathered on rank 0
      backend.close()              -- close                     -->  drop the model, free its memory
      (the stage ends)             -- end                       -->  return   (an exception on rank 0: abort)

HFBackend cuts the prompts into the same batches whatever the number of ranks, batch i runs on rank
i % N, and each batch is seeded from its own content: generations, and so metrics, equal those of a
1-process run (tests/test_sharded.py). Every message is a pickled object on hardware.wait_group (gloo,
long timeout): rows travel with their images, one round of batches at a time. Backends that do not
`shares_ranks` (vllm, openai) are not shared: rank 0 generates alone while the others wait for `end`.

    python train.py hardware=cpu_ddp2            # the evaluate stage generates on both processes
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from reinforce_cot import hardware

log = logging.getLogger(__name__)
_leading = False


def world() -> int:
    """How many ranks share the generation right now: the world size inside `leading()`, else 1."""
    return hardware.world_size() if _leading else 1


@contextlib.contextmanager
def leading():
    """Rank 0 runs a one-process stage in this block while the other ranks `follow()` it."""
    global _leading
    if hardware.world_size() <= 1:
        yield
        return
    _leading = True
    try:
        yield
    except BaseException as e:
        _leading = False
        _scatter([("abort", f"{type(e).__name__}: {e}")] * hardware.world_size())
        raise
    _leading = False
    _scatter([("end", None)] * hardware.world_size())


def follow() -> None:
    """Ranks > 0: do what rank 0's stage asks (load, generate, close) until it ends. A `load` names its
    loader (a function, pickled by name), so this module needs nothing of the generation package."""
    backend = None
    while True:
        op, arg = _scatter(None)
        if op == "end":
            break
        if op == "abort":
            raise RuntimeError(f"rank 0 failed during the stage ({arg}); rank {hardware.rank()} stops too")
        try:
            if op == "load":
                if backend is not None:
                    backend.close()
                loader, *args = arg
                backend = loader(*args)
                reply = None
            elif op == "generate":
                batches, (n, temperature, template) = arg
                reply = [backend.generate_batch(b, n, temperature, template) for b in batches]
                log.info("generated %d prompts x %d for rank 0", sum(map(len, batches)), n)
            elif op == "close":
                backend, reply = None, None
                hardware.release_memory()
            else:
                raise ValueError(f"unknown request {op!r}")
            _gather(("ok", reply))
        except Exception as e:  # reported to rank 0, which raises it and aborts everyone
            log.exception("rank %d failed at %s", hardware.rank(), op)
            _gather(("error", f"{type(e).__name__}: {e}"))
    if backend is not None:
        backend.close()


def everywhere(op: str, arg: Any, local: Callable[[], Any], per_rank: list | None = None) -> Any:
    """Rank 0: send `op` with `arg` (or per_rank[r] to rank r) to every other rank, run `local()` here
    meanwhile, then wait for every rank's reply. Returns (local's value, the others' replies) when
    per_rank is given, else local's value. A rank's failure is raised here, naming the rank."""
    n = hardware.world_size()
    _scatter([(op, per_rank[r] if per_rank is not None else arg) for r in range(n)])
    failed: BaseException | None = None
    try:
        value = local()
    except Exception as e:
        value, failed = None, e
    replies = _gather(("ok", None))  # rank 0's own entry carries nothing
    if failed is not None:
        raise failed
    for r, (status, reply) in enumerate(replies[1:], start=1):
        if status != "ok":
            raise RuntimeError(f"rank {r} failed at {op}: {reply}")
    return (value, [reply for _, reply in replies[1:]]) if per_rank is not None else value


def map_batches(batches: list[list[dict]], run: Callable[[list[dict]], Any], params: tuple) -> tuple[list, list]:
    """Rank 0: batch i runs on rank i % world (`run` here, `generate_batch(batch, *params)` there).
    Returns the results in batch order and the rank of each batch."""
    n = hardware.world_size()
    mine, others = everywhere(
        "generate", None, lambda: [run(b) for b in batches[0::n]], per_rank=[(batches[r::n], params) for r in range(n)]
    )
    out: list = [None] * len(batches)
    ranks: list = [None] * len(batches)
    for r, results in enumerate([mine, *others]):
        out[r::n] = results
        ranks[r::n] = [r] * len(results)
    return out, ranks


def _scatter(payloads: list | None):
    """Rank 0 hands payloads[r] to rank r; every rank returns its own."""
    import torch.distributed as dist

    got = [None]
    dist.scatter_object_list(got, payloads, src=0, group=hardware.wait_group())
    return got[0]


def _gather(obj) -> list | None:
    """Every rank's `obj`, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    out = [None] * hardware.world_size() if hardware.is_main() else None
    dist.gather_object(obj, out, dst=0, group=hardware.wait_group())
    return out
