"""Several processes, one job: the rank and world from ``torch.distributed`` (started by torchrun),
deterministic sharding, and the few collective steps a sharded build needs.

Nothing here starts processes or opens sockets of its own: ``torchrun`` starts the ranks and
does the rendezvous (``--nproc-per-node``, ``--nnodes``, ``--rdzv-endpoint``), and
``torch.distributed`` carries the messages (gloo for the small Python objects exchanged here,
NCCL alongside on GPUs). A single process is a world of one and costs nothing: no process group
is created.

The collective steps are written so that an error raised on one rank reaches every rank as the
same ``KnnlmError`` (``on_main``), instead of leaving the others waiting at a barrier.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from knnlm import errors
from knnlm.errors import DistributedError, KnnlmError

__all__ = ["World", "SINGLE", "world_from_env", "init_world", "shutdown", "agree", "on_main", "barrier",
           "shard_range", "gather", "together"]

T = TypeVar("T")
TIMEOUT_S = float(os.environ.get("KNNLM_DIST_TIMEOUT_S", 24 * 3600))  # index training on rank 0 can be long


@dataclass(frozen=True)
class World:
    """This process's place in the job (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


SINGLE = World()


def world_from_env(environ: dict | None = None) -> World:
    """The world torchrun describes in the environment (a world of one without torchrun)."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise DistributedError(f"bad torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK): {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local)


def init_world(device: str = "cpu") -> World:
    """Join the process group torchrun set up (idempotent). ``device``: the device this rank's
    model runs on; CUDA devices get NCCL beside gloo, CPU gets gloo only."""
    world = world_from_env()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise DistributedError(f"the process group ({dist.get_rank()}/{dist.get_world_size()}) does not match "
                               f"the environment ({world})")
    return world


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def _gather(world: World, obj: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(world: World, obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in a world of one)."""
    return _gather(world, obj) if world.distributed else [obj]


def together(world: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank (a collective step: every rank must call it), then check that it
    succeeded everywhere: when it raised on some rank, every rank raises the first failing rank's
    error (a ``KnnlmError`` keeps its class, message and ``param``; any other exception becomes a
    ``DistributedError`` naming the rank), so no rank is left waiting for the others. The failing
    rank re-raises its own exception (with its traceback)."""
    if not world.distributed:
        return fn()
    result, failure, own = None, None, None
    try:
        result = fn()
    except KnnlmError as e:
        failure, own = (type(e).__name__, str(e), e.param), e
    except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised here
        failure, own = ("DistributedError", f"rank {world.rank} failed: {type(e).__name__}: {e}", None), e
    failures = [f for f in _gather(world, failure) if f is not None]
    if own is not None:
        if isinstance(own, KnnlmError):
            own.everywhere = True
        raise own
    if failures:
        raise _rebuilt(failures[0])
    return result


def _rebuilt(failure: tuple) -> KnnlmError:
    """Another rank's error (class name, message, param), raised here too."""
    name, message, param = failure
    e = getattr(errors, name, DistributedError)(message, param=param)
    e.everywhere = True
    return e


def agree(world: World, what: dict[str, Any]) -> None:
    """Every rank must pass the same ``what`` (its arguments, resolved): otherwise each rank raises
    a ``DistributedError`` naming the first setting that differs, before anything is written."""
    if not world.distributed:
        return
    digest = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()
              for k, v in what.items()}
    everyone = _gather(world, (digest, what))
    for rank, (d, theirs) in enumerate(everyone):
        if d != digest:
            key = next(k for k in sorted(set(d) | set(digest)) if d.get(k) != digest.get(k))
            mine, other = what.get(key), theirs.get(key)
            e = DistributedError(f"the ranks disagree on `{key}`: rank {rank} has {_short(other)}, rank "
                                 f"{world.rank} has {_short(mine)}; start every rank with the same arguments",
                                 param=key if key.isidentifier() else None)
            e.everywhere = True
            raise e


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def on_main(world: World, fn: Callable[[], T], *, share: bool = False) -> T | None:
    """Run ``fn`` on rank 0 only and return its result there (``None`` elsewhere, or rank 0's
    result on every rank with ``share``: it must then be picklable); a
    ``KnnlmError`` it raises is raised on every rank (same class, message and ``param``), so no
    rank is left waiting. Other exceptions are re-raised on rank 0 and reported to the others as
    a ``DistributedError``."""
    if not world.distributed:
        return fn()
    result, failure = None, None
    if world.main:
        try:
            result = fn()
        except KnnlmError as e:
            failure = (type(e).__name__, str(e), e.param)
            _broadcast(world, failure)
            raise
        except BaseException as e:
            _broadcast(world, ("DistributedError", f"rank 0 failed: {type(e).__name__}: {e}", None))
            raise
        _broadcast(world, None)
        return _broadcast(world, result) if share else result
    failure = _broadcast(world, None)
    if failure is not None:
        raise _rebuilt(failure)
    return _broadcast(world, None) if share else None


def shard_range(weights: Sequence[int], world: World) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of items with the given weights (e.g. rows per
    batch): the cut points are where the running total first reaches ``r / size`` of the whole,
    so every rank gets about the same weight. Deterministic: a pure function of its arguments."""
    total = sum(weights)
    cuts, acc, r = [0], 0, 1
    for i, w in enumerate(weights):
        while r < world.size and acc >= total * r / world.size:
            cuts.append(i)
            r += 1
        acc += w
    while len(cuts) < world.size:
        cuts.append(len(weights))
    cuts.append(len(weights))
    return cuts[world.rank], cuts[world.rank + 1]
