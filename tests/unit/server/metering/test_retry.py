"""The retry queue of failed meter writes: kept in order, retried, bounded, counted."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.metering.retry import MeterRetries
from tests.fakes.backends import MemoryMeter, make_identity

pytestmark = pytest.mark.anyio
AGENT = make_identity()


async def test_a_settle_the_store_refuses_is_owed_then_charged_once_it_answers() -> None:
    meter = MemoryMeter()
    meter.reserved["r1"] = (AGENT.agent_id, 100)
    registry = CollectorRegistry()
    retries = MeterRetries(meter, registry, backoff_seconds=3600)
    meter.down = True
    assert await retries.settle(AGENT, "r1", 42) is False
    assert meter.reserved == {"r1": (AGENT.agent_id, 100)}  # still held: the budget stays covered
    assert await retries.drain() == 1
    meter.down = False
    assert await retries.drain() == 0
    assert (meter.tokens[AGENT.agent_id], meter.reserved) == (42, {})
    assert registry.get_sample_value("castellan_meter_retries_total", {"kind": "settle", "result": "done"}) == 1
    assert registry.get_sample_value("castellan_meter_retry_pending") == 0
    await retries.close()


async def test_a_full_queue_drops_the_oldest_write_and_counts_it() -> None:
    meter = MemoryMeter(down=True)
    registry = CollectorRegistry()
    retries = MeterRetries(meter, registry, capacity=3, backoff_seconds=3600)
    for i in range(5):
        await retries.settle(AGENT, f"r{i}", i)
    assert len(retries) == 3
    assert registry.get_sample_value("castellan_meter_retries_total", {"kind": "settle", "result": "dropped"}) == 2
    meter.down = False
    await retries.drain()
    assert meter.tokens[AGENT.agent_id] == 2 + 3 + 4  # the newest three
    await retries.close()


async def test_the_background_task_retries_by_itself() -> None:
    import asyncio

    meter = MemoryMeter(down=True)
    retries = MeterRetries(meter, backoff_seconds=0.01, backoff_max_seconds=0.05)
    await retries.settle(AGENT, "r1", 7)
    meter.down = False
    for _ in range(200):
        if not len(retries):
            break
        await asyncio.sleep(0.01)
    assert meter.tokens[AGENT.agent_id] == 7
    await retries.close()
