"""Tensor and pipeline parallelism: the ranks of one model, their process groups, and how the model is split
(docs/parallelism.md).

One engine runs on ``tensor_parallel_size`` (or ``pipeline_parallel_size``) processes. Rank 0 is the *driver*: it holds the scheduler and the KV
block bookkeeping, and its ``ModelRunner`` sends every step's ``SchedulerOutput`` to the other ranks (*followers*)
before running it; each rank then runs the same forward on its share of the weights and of the KV pool, the
row-parallel layers sum the ranks' partial outputs with one all-reduce, and rank 0 samples and sends the sampled
tokens back so that every rank's request state stays identical. Followers run nothing but ``follow()``.

Two process groups: ``group`` carries tensors (NCCL on GPUs, gloo on CPUs), ``control`` carries the pickled step
messages (always gloo: object broadcasts go through host memory).

Pipeline parallelism splits the blocks into consecutive stages instead (unevenly where they do not divide); each
rank holds its stages' KV pool. A step's activations go from stage to stage in micro-batches (groups of whole
sequences, each sent on as soon as a stage is done with it, so that the stages work at once), and the last stage's
output comes back to all of them.

Splits (GPT-2): attention heads and MLP columns are split as evenly as possible, the first ``n % size`` ranks taking
one more (GPT-2 XL's 25 heads over 2 ranks: 13 and 12), so a head count that does not divide is split unevenly
instead of refused. ``c_attn`` and ``c_fc`` are column-parallel (each rank computes its heads' q, k, v and its MLP
columns, no communication); the two ``c_proj`` are row-parallel (each rank multiplies its input columns, then
all-reduce). A row-parallel layer's bias and the residual stream are added by rank 0 only, inside its fused
kernel, so that the all-reduce sums them exactly once.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def split_sizes(n: int, parts: int) -> list[int]:
    """``n`` items over ``parts`` ranks, as evenly as possible, the first ranks taking one more."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def shard_range(n: int, parts: int, rank: int) -> range:
    sizes = split_sizes(n, parts)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel model; size 1 makes the all-reduce a no-op."""

    rank: int = 0
    size: int = 1
    group: Any = None  # NCCL on GPUs, gloo on CPUs

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


@dataclass(frozen=True)
class PipelineParallel:
    """This rank's stage of a pipeline-parallel model: the blocks ``layers`` (of all ``num_layers``). A stage gets
    its input activations from the previous one, and the last stage's output (after the final LayerNorm) goes to
    every stage, so that rank 0 can sample."""

    rank: int = 0
    size: int = 1
    group: Any = None
    micro_batches: int = 1  # a step's groups of sequences in flight at once, so that the stages overlap

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        return shard_range(num_layers, self.size, self.rank)

    def recv_activations(self, out: torch.Tensor) -> torch.Tensor:
        """The previous stage's activations, received into ``out`` (returned)."""
        dist.recv(out, src=self.rank - 1, group=self.group)
        return out

    def send_activations(self, x: torch.Tensor) -> Any:
        """Start sending ``x`` (contiguous) to the next stage and return at once, so that this stage goes on with
        the next micro-batch; the caller keeps ``x`` until the returned work's ``wait()``."""
        return dist.isend(x, dst=self.rank + 1, group=self.group)

    def share_output(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's ``x`` on every stage (others pass a tensor of the right shape to receive into)."""
        x = x.contiguous()
        dist.broadcast(x, src=self.size - 1, group=self.group)
        return x


@dataclass(frozen=True)
class Ranks:
    """The processes of one model: rank 0 drives (scheduler, sampling), the others follow; ``tp`` / ``pp`` say how
    the model is split (one of the two, for now). ``control`` carries the pickled step messages (gloo)."""

    rank: int = 0
    size: int = 1
    control: Any = None
    tp: TensorParallel = TensorParallel()
    pp: PipelineParallel = PipelineParallel()

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (each rank sizes its KV pool; all must agree)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's ``message``, on every rank."""
        if self.size == 1:
            return message
        box = [message if self.is_driver else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the ranks' rendezvous; tests' servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ranks(rank: int, tp_size: int, pp_size: int, init_method: str, device: torch.device,
               micro_batches: int = 1) -> Ranks:
    """Join the ranks' process groups (every rank calls this with the same ``init_method``). ``micro_batches``:
    of a pipeline-parallel step."""
    size = tp_size * pp_size
    assert tp_size == 1 or pp_size == 1, "tensor and pipeline parallelism together are not supported yet"
    # NVLink SHARP (multicast) stays off: the GPU hosts we measure on do not allow it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size)
    control = dist.group.WORLD
    group = dist.new_group(backend="nccl") if device.type == "cuda" else control
    return Ranks(rank, size, control,
                 TensorParallel(rank, tp_size, group) if tp_size > 1 else TensorParallel(),
                 PipelineParallel(rank, pp_size, group, micro_batches) if pp_size > 1 else PipelineParallel())


def _follower_main(config_json: str, rank: int, init_method: str) -> None:
    """A follower process: build this rank's runner (which joins the groups) and run the driver's steps until it
    says stop."""
    from gpt2serve.engine.config import EngineConfig
    from gpt2serve.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING)
    runner = ModelRunner(EngineConfig.model_validate_json(config_json), rank=rank, init_method=init_method)
    runner.follow()


def launch_followers(config, size: int) -> tuple[str, Callable[[], None]]:
    """Start ranks 1..size-1 for ``config`` (the driver is this process); returns the groups' rendezvous address
    and a function that waits for the followers to exit after the driver has told them to stop.

    Inside a Ray placement group (a Serve worker deployment with ``placement_group_bundles``: actors/settings.py),
    rank r is a Ray task in bundle r, holding that bundle's CPUs and GPU. Elsewhere the followers are processes
    spawned here, so a script that builds a parallel engine needs the usual ``if __name__ == "__main__":`` guard.
    Either way all ranks are on this host (the rendezvous is on 127.0.0.1; Serve's bundles are packed on a node)."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    config_json = config.model_dump_json()
    group = _current_placement_group()
    if group is not None:
        return init_method, _launch_ray_followers(group, config_json, size, init_method)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fork would copy CUDA state and the driver's threads
    procs = [ctx.Process(target=_follower_main, args=(config_json, r, init_method), daemon=True)
             for r in range(1, size)]
    for p in procs:
        p.start()

    def join() -> None:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    return init_method, join


def _current_placement_group():
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    return get_current_placement_group() if ray.is_initialized() else None


def _launch_ray_followers(group, config_json: str, size: int, init_method: str) -> Callable[[], None]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = group.bundle_specs
    if len(bundles) < size:
        raise ValueError(f"{size} ranks need {size} placement-group bundles, the worker has {len(bundles)}")
    follower = ray.remote(_follower_main)
    refs = [follower.options(
        num_cpus=bundles[r].get("CPU", 0), num_gpus=bundles[r].get("GPU", 0),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r),
    ).remote(config_json, r, init_method) for r in range(1, size)]

    def join() -> None:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=30)
        for ref in running:
            ray.cancel(ref, force=True)

    return join
