"""`measure_observability_capacity` on a real nats-server: each row drains every node.

Figures are not asserted (timing on a shared machine); that they are there, consistent and
that the worker counted every node once is.
"""

from __future__ import annotations

import pytest

from bus import NatsServer
from workers.tools._bench_observability import measure_observability_capacity

pytestmark = pytest.mark.nats


async def test_every_row_drains_every_node_once() -> None:
    async with NatsServer() as server:
        result = await measure_observability_capacity(server.url, nodes=600, repeats=1)
    rows = result["rows"]
    assert set(rows) == {"natspy_fetch", "pull_only", "worker", "worker_ack_all"}
    for name, row in rows.items():
        assert row["drained"] == 600, name
        assert row["nodes_per_s"] > 0 and row["cpu_us_per_node"] > 0, name
        assert row["cpu_bound_nodes_per_s"] == pytest.approx(
            1e6 / row["cpu_us_per_node"], rel=0.01), name
    assert rows["natspy_fetch"]["cpu_vs_natspy_fetch"] == 1.0
    assert (result["consumed"], result["cpu_us_per_node"]) == (
        600, rows["worker"]["cpu_us_per_node"])
