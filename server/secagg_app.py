"""A ServerApp that sums fedtiny's dense int8 changes with Flower's SecAgg+, metering every message.

Flower 1.41 runs SecAgg+ as a workflow of its legacy API (``DefaultWorkflow`` with
``SecAggPlusWorkflow``, a legacy ``FedAvg``), not through the Message-API strategies fedtiny's
own ServerApp uses; this app exists to measure what the protocol costs on fedtiny's updates
(``fedtiny bench secagg``). With ``secagg = False`` the same legacy round runs without it: the
baseline for the ratios.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.serde import message_to_proto
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

__all__ = ["MeteredGrid", "make_secagg_server_app"]


class MeteredGrid:
    """A :class:`Grid` that counts the serialized bytes of every message to and from each node.

    Flower's workflows exchange everything through ``send_and_receive``; the other
    methods pass through.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.exchanges = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + message_to_proto(m).ByteSize()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            node = r.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + message_to_proto(r).ByteSize()
        self.exchanges += 1
        return replies


def make_secagg_server_app(
    sizes: list[int],
    clients: int,
    *,
    secagg: bool,
    out: dict[str, Any],
    num_shares: int | float = 1.0,
    threshold: int | float = 0.7,
    clipping_range: float = 256.0,
) -> ServerApp:
    """One round over ``clients`` clients whose changes have tensors of ``sizes`` elements.

    The round's mean change lands in ``out["mean"]`` (a list of arrays), the metered bytes
    per node in ``out["down"]`` / ``out["up"]`` and the round's wall seconds in ``out["seconds"]``.
    ``clipping_range`` bounds the values SecAgg+ quantizes (an int8 change lies in [-255, 255]).
    """
    app = ServerApp()

    def capture(server_round: int, arrays, config):
        if server_round > 0:
            out["mean"] = [np.array(a, copy=True) for a in arrays]
        return None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            evaluate_fn=capture,
            initial_parameters=ndarrays_to_parameters([np.zeros(n, np.float32) for n in sizes]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        fit = (
            SecAggPlusWorkflow(
                num_shares=num_shares,
                reconstruction_threshold=threshold,
                clipping_range=float(clipping_range),
                max_weight=1.0,
            )
            if secagg
            else None
        )
        metered = MeteredGrid(grid)
        t0 = time.perf_counter()
        DefaultWorkflow(fit_workflow=fit)(metered, legacy)
        out.update(
            seconds=time.perf_counter() - t0, down=dict(metered.down), up=dict(metered.up), exchanges=metered.exchanges
        )

    return app
