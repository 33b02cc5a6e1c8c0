"""Fair scheduling of worker slots between identities."""

from __future__ import annotations

import asyncio

import pytest

from tools.fair_share import FairShare

pytestmark = pytest.mark.anyio


async def test_one_identity_never_holds_every_slot_and_others_get_theirs() -> None:
    share = FairShare(slots=2, per_identity=1)
    order: list[str] = []
    release = asyncio.Event()

    async def job(who: str) -> None:
        async with share.slot(who):
            order.append(who)
            if who == "heavy":
                await release.wait()

    heavy = [asyncio.ensure_future(job("heavy")) for _ in range(3)]
    await asyncio.sleep(0)
    assert share.running("heavy") == 1
    await asyncio.wait_for(job("light"), 5)  # the free slot is the light agent's at once
    assert order == ["heavy", "light"]
    release.set()
    await asyncio.gather(*heavy)
    assert order == ["heavy", "light", "heavy", "heavy"]


async def test_waiting_identities_are_served_in_turn() -> None:
    share = FairShare(slots=1, per_identity=1)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(who: str, wait: bool = False) -> None:
        async with share.slot(who):
            order.append(who)
            if wait:
                await gate.wait()

    first = asyncio.ensure_future(job("a", wait=True))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(job(w)) for w in ("a", "a", "b")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *queued)
    assert order == ["a", "a", "b", "a"]  # b is not queued behind a's whole backlog


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    share = FairShare(slots=1, per_identity=1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with share.slot("a"):
            await gate.wait()

    holder = asyncio.ensure_future(hold())
    await asyncio.sleep(0)

    async def wait_b() -> None:
        async with share.slot("b"):
            pass

    waiter = asyncio.ensure_future(wait_b())
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await holder
    await asyncio.wait_for(wait_b(), 5)
    assert share.running("a") == share.running("b") == 0
