"""Data for a federation: the server's public and test splits and each client's partition."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedtiny.data.partition import METHODS, partition_indices
from fedtiny.data.shift import SensorShift, apply_shift, client_shift, fleet_shift
from fedtiny.data.sources import DataError, DataSource, ImageSet, load_source
from fedtiny.data.synthetic import DEFAULT_SIZE, Synthetic
from fedtiny.scenario import scenario_from_json
from fedtiny.variants import DATA_SOURCES

__all__ = [
    "DataError",
    "ImageSet",
    "Federation",
    "build_federation",
    "load_federation",
    "partition_indices",
    "SensorShift",
    "apply_shift",
    "client_shift",
    "fleet_shift",
    "load_source",
    "METHODS",
]


@dataclass(frozen=True)
class Federation:
    """How one scenario's data is split between the server and the clients.

    Attributes
    ----------
    public
        The server's clean "cloud" split, used for pretraining.
    test
        The server's held-out global test set, in the deployment domain (fleet shift).
    pool
        The samples shared among clients (before each client's own shift).
    partitions
        Indices into ``pool`` of each client's samples.
    draw
        Instead of ``pool`` and ``partitions``: a function drawing client ``i``'s samples
        when it is first asked for (the synthetic source; nothing is held per client).
    num_clients
        Number of clients.
    """

    public: ImageSet
    test: ImageSet
    pool: ImageSet | None
    partitions: list[np.ndarray]
    scenario_shift: object
    seed: int
    client_test_fraction: float
    draw: Callable[[int], ImageSet] | None = None
    num_clients: int = 0

    @property
    def num_classes(self) -> int:
        return self.public.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.public.shape

    def largest_partition(self) -> int:
        """Samples of the largest client partition (train and test together: a bound of any client's training
        samples), without drawing them where the source draws lazily (its clients are all the same size)."""
        if self.draw is not None:
            return len(self.draw(0)) if self.num_clients else 0
        return max((len(p) for p in self.partitions), default=0)

    def client_shift(self, partition_id: int) -> SensorShift:
        """The fixed sensor shift of client ``partition_id``."""
        return client_shift(self.scenario_shift, partition_id, self.seed)

    def client_data(self, partition_id: int) -> tuple[ImageSet, ImageSet]:
        """Return client ``partition_id``'s ``(train, test)`` splits, as its sensor sees them."""
        if not 0 <= partition_id < self.num_clients:
            raise IndexError(f"partition-id {partition_id} out of range [0, {self.num_clients})")
        data = self.draw(partition_id) if self.draw is not None else self.pool.subset(self.partitions[partition_id])
        x = apply_shift(data.x, self.client_shift(partition_id), [self.seed, 31, partition_id])
        data = ImageSet(x, data.y, data.num_classes, data.name)
        order = np.random.default_rng([self.seed, 17, partition_id]).permutation(len(data))
        n_test = int(round(self.client_test_fraction * len(data)))
        if len(data) - n_test < 1:
            n_test = 0
        return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def build_federation(scenario) -> Federation:
    """Load the scenario's data source and split it (seeded) between server and clients."""
    d, seed = scenario.data, scenario.run.seed
    source = DATA_SOURCES.get(d.source)
    if source.federation is not None:
        return source.federation(scenario)
    data = load_source(
        d.source,
        d.root,
        image_size=d.image_size,
        max_samples=d.max_samples,
        seed=seed,
        channels=d.channels,
        image_width=d.image_width,
    )
    order = np.random.default_rng([seed, 3]).permutation(len(data))
    n_pub, n_test = int(d.public_fraction * len(data)), int(d.test_fraction * len(data))
    public = data.subset(np.sort(order[:n_pub]))
    test = data.subset(np.sort(order[n_pub : n_pub + n_test]))
    pool = data.subset(np.sort(order[n_pub + n_test :]))
    test = ImageSet(apply_shift(test.x, fleet_shift(scenario.shift), [seed, 5]), test.y, test.num_classes, test.name)
    parts = partition_indices(
        pool.y,
        scenario.run.clients,
        d.partition,
        seed=seed,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
        min_partition_size=d.min_partition_size,
    )
    return Federation(
        public, test, pool, parts, scenario.shift, seed, d.client_test_fraction, num_clients=scenario.run.clients
    )


def _synthetic_federation(scenario) -> Federation:
    d, seed = scenario.data, scenario.run.seed
    gen = Synthetic(
        seed,
        d.num_classes,
        d.image_size or DEFAULT_SIZE,
        d.channels or 1,
        d.samples_per_client,
        d.partition,
        d.alpha,
        d.classes_per_client,
        width=d.image_width,
    )
    images = lambda xy: ImageSet(*xy, gen.num_classes, "synthetic")  # noqa: E731
    public, test = images(gen.server_split(0, d.server_samples)), images(gen.server_split(1, d.server_samples))
    test = ImageSet(apply_shift(test.x, fleet_shift(scenario.shift), [seed, 5]), test.y, test.num_classes, test.name)
    return Federation(
        public,
        test,
        None,
        [],
        scenario.shift,
        seed,
        d.client_test_fraction,
        draw=lambda pid: images(gen.client(pid)),
        num_clients=scenario.run.clients,
    )


@functools.lru_cache(maxsize=4)
def _cached(scenario_json: str) -> Federation:
    return build_federation(scenario_from_json(scenario_json))


def load_federation(scenario) -> Federation:
    """:func:`build_federation`, cached per process (Flower calls a ClientApp many times)."""
    return _cached(scenario.to_json())


DATA_SOURCES.add("synthetic", DataSource("synthetic", federation=_synthetic_federation))
