"""Partition sample indices across clients with flwr-datasets' partitioners (offline).

The partitioners run on an in-memory ``datasets.Dataset`` holding only labels and
sample indices, so no data leaves memory and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from fedtiny.errors import ScenarioError

__all__ = ["partition_indices", "METHODS"]

METHODS = ("iid", "dirichlet", "pathological")


def _partitioner(
    method: str, num_partitions: int, seed: int, alpha: float, classes_per_client: int, min_partition_size: int
):
    # deferred: flwr-datasets takes 3 s to import; only partitioning needs it
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if method == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if method == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if method == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    raise ScenarioError(f"data.partition: unknown method {method!r}; expected one of {', '.join(METHODS)}")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_partitions`` disjoint index arrays.

    Parameters
    ----------
    labels
        Integer class label of every sample.
    num_partitions
        Number of clients.
    method
        ``iid`` (seeded shuffle, equal shards), ``dirichlet`` (label skew with
        concentration ``alpha``) or ``pathological`` (``classes_per_client`` classes each).
    seed
        Same seed, same partitions.

    Returns
    -------
    list of numpy.ndarray
        Sorted sample indices of each partition.

    Raises
    ------
    ValueError
        When the data cannot be split as asked (too few samples, too many classes per client).
    """
    # deferred: datasets takes 2.6 s to import
    from datasets import Dataset

    labels = np.asarray(labels, dtype=np.int64)
    if num_partitions > len(labels):
        raise ScenarioError(f"run.clients: {num_partitions} clients but only {len(labels)} samples to share")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if method == "pathological" and classes_per_client > num_classes:
        raise ScenarioError(f"data.classes_per_client: {classes_per_client} exceeds the {num_classes} classes")
    order = np.random.default_rng([seed, 104729]).permutation(len(labels))
    # IidPartitioner shards contiguously; a seeded permutation first makes its shards random.
    ds = Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    part = _partitioner(method, num_partitions, seed, alpha, classes_per_client, min_partition_size)
    part.dataset = ds
    try:
        return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_partitions)]
    except ValueError as exc:
        raise ScenarioError(
            f"data.partition: {method} cannot split {len(labels)} samples into {num_partitions} clients: {exc}"
        ) from None
