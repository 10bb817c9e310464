"""Where a model's replica runs: the placement group its tensor/pipeline workers need.

One bundle per worker (tensor_parallel_size x pipeline_parallel_size). The replica actor itself
lives in the first bundle, as in Ray Serve LLM, so vLLM's Ray executor finds its workers' bundles
in the replica's own placement group. Pure logic: the feasibility check takes the nodes' resources
as data so it is tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from deployments.config import ModelConfig

Strategy = Literal["STRICT_PACK", "PACK"]
Bundle = dict[str, float]


@dataclass(frozen=True)
class ReplicaPlacement:
    bundles: list[Bundle]
    strategy: Strategy

    def total(self) -> Bundle:
        total: Bundle = {}
        for bundle in self.bundles:
            for resource, amount in bundle.items():
                total[resource] = total.get(resource, 0.0) + amount
        return total


def replica_placement(model: ModelConfig) -> ReplicaPlacement:
    worker: Bundle = {"CPU": model.cpus_per_worker}
    if model.device == "gpu":
        worker["GPU"] = 1.0
    first = dict(worker)
    first["CPU"] = first["CPU"] + model.replica_cpus
    bundles = [first] + [dict(worker) for _ in range(model.num_workers - 1)]
    # Tensor-parallel workers talk over NVLink/shared memory: one node. Pipeline stages only pass
    # activations, so they may span nodes (PACK still prefers one). On CPU, vLLM's mp executor
    # forks its workers locally, so they are always on the replica's node.
    spans_nodes = model.device == "gpu" and model.pipeline_parallel_size > 1
    return ReplicaPlacement(bundles, "PACK" if spans_nodes else "STRICT_PACK")


class PlacementInfeasible(ValueError):
    """A model's replicas cannot be placed on this cluster as it is."""


def check_fits(models: Sequence[ModelConfig], nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise PlacementInfeasible naming each model one replica of which no node (or, for PACK,
    the nodes together, each bundle whole on one node) can host. `nodes` are the alive nodes'
    total resources, e.g. {"CPU": 8, "GPU": 4}.

    This is a per-replica check, the part that can never succeed: Ray would otherwise leave the
    placement group pending forever and Serve would wait on it without saying why.
    """
    problems: list[str] = []
    for model in models:
        placement = replica_placement(model)
        need = placement.total()
        if placement.strategy == "STRICT_PACK":
            if not any(_covers(node, need) for node in nodes):
                largest = _largest_node(nodes, need)
                problems.append(
                    f"model {model.name!r}: one replica needs {_fmt(need)} on a single node "
                    f"(tensor_parallel_size={model.tensor_parallel_size}, "
                    f"pipeline_parallel_size={model.pipeline_parallel_size}), but the largest "
                    f"node has {_fmt(largest)}"
                )
        else:
            cluster = {r: sum(n.get(r, 0.0) for n in nodes) for r in need}
            if not _covers(cluster, need):
                problems.append(
                    f"model {model.name!r}: one replica needs {_fmt(need)} across nodes, "
                    f"but the cluster has {_fmt(cluster)}"
                )
            elif (placed := _most_bundles_placed(placement, nodes)) < len(placement.bundles):
                # Enough in total, but a bundle cannot straddle nodes: what each node has left
                # over after whole bundles is lost.
                first, worker = placement.bundles[0], placement.bundles[-1]
                problems.append(
                    f"model {model.name!r}: one replica needs {len(placement.bundles)} bundles, "
                    f"each whole on one node (the first {{{_fmt(first)}}}, the others "
                    f"{{{_fmt(worker)}}} each), but the nodes can hold only {placed} of them"
                )
    if problems:
        raise PlacementInfeasible("; ".join(problems))


def _covers(available: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(available.get(r, 0.0) + 1e-9 >= amount for r, amount in need.items())


def _most_bundles_placed(placement: ReplicaPlacement, nodes: Sequence[Mapping[str, float]]) -> int:
    """The most bundles of one replica the nodes can hold at once, bundles whole on one node.
    Exact because every bundle after the first is the same worker bundle (replica_placement):
    try each node as the first bundle's host and fill all the nodes with workers."""
    first, *workers = placement.bundles
    best = 0
    for room in _with_first_bundle(nodes, first):
        copies = sum(_copies(node, workers[0]) for node in room) if workers else 0
        best = max(best, 1 + min(copies, len(workers)))
    return best


def _with_first_bundle(
    nodes: Sequence[Mapping[str, float]], first: Mapping[str, float]
) -> Iterator[list[dict[str, float]]]:
    """The nodes' resources with `first` taken from each node that can host it in turn, one
    try per distinct free shape (nodes alike give the same outcome, and a large uniform cluster
    costs a few tries)."""
    hosts: dict[tuple[tuple[str, float], ...], int] = {}  # free shape -> its first node
    for i, node in enumerate(nodes):
        if _covers(node, first):
            hosts.setdefault(tuple(sorted(node.items())), i)
    for host in hosts.values():
        room = [dict(node) for node in nodes]
        _take(room[host], first)
        yield room


def _copies(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of `bundle` fit in `node` (capped at 1024, like replicas_that_fit)."""
    return min(
        (int((node.get(r, 0.0) + 1e-9) // amount) for r, amount in bundle.items() if amount > 0),
        default=1024,
    )


def _largest_node(nodes: Sequence[Mapping[str, float]], need: Mapping[str, float]) -> Bundle:
    if not nodes:
        return {}
    scarce = "GPU" if "GPU" in need else "CPU"
    best = max(nodes, key=lambda n: n.get(scarce, 0.0))
    return {r: best.get(r, 0.0) for r in need}


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))


def replicas_that_fit(placement: ReplicaPlacement, free: Sequence[Mapping[str, float]]) -> int:
    """How many more replicas fit in the nodes' free resources, one replica after the other, a
    replica counted only when all its bundles found room. STRICT_PACK: all on the first node
    that fits. PACK: the first bundle, the one that differs, goes to the node that leaves room
    for the most worker bundles afterwards, the workers to the first node that fits; first fit
    alone put a larger first bundle where it stranded a worker. A heuristic (packing is
    NP-hard), exact for one replica. Bounded by 1024 (more is "unbounded" for any policy
    here)."""
    nodes = [dict(node) for node in free]
    count = 0
    while count < 1024:
        placed = _place_one(placement, nodes)
        if placed is None:
            return count
        nodes = placed
        count += 1
    return count


def _place_one(
    placement: ReplicaPlacement, nodes: Sequence[dict[str, float]]
) -> list[dict[str, float]] | None:
    """The nodes' free resources after placing one replica, or None when it does not fit."""
    if placement.strategy == "STRICT_PACK":  # one bundle: the first node that fits it
        return next(_with_first_bundle(nodes, placement.total()), None)
    first, *workers = placement.bundles
    best: tuple[int, list[dict[str, float]]] | None = None
    for trial in _with_first_bundle(nodes, first):
        for bundle in workers:
            host = next((free for free in trial if _covers(free, bundle)), None)
            if host is None:
                break
            _take(host, bundle)
        else:
            room = sum(_copies(free, placement.bundles[-1]) for free in trial)
            if best is None or room > best[0]:
                best = (room, trial)
    return None if best is None else best[1]


def _take(node: dict[str, float], need: Mapping[str, float]) -> None:
    for resource, amount in need.items():
        node[resource] = node.get(resource, 0.0) - amount
