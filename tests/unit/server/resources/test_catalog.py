"""The resource catalog: URIs and templates resolve to the one source that serves them."""

from __future__ import annotations

from typing import Any

import pytest

from server.resources.catalog import ResourceCatalog
from server.resources.target import ResourceDefinition, ResourceTarget, slug, template_pattern


async def _nothing(uri: str) -> list[dict[str, Any]]:
    return [{"uri": uri, "text": "x"}]


def target(uri: str, *, template: bool = False, source: str = "a") -> ResourceTarget:
    return ResourceTarget(
        ResourceDefinition(uri=uri, name=uri, template=template),
        name=f"{source}.{slug(uri)}",
        securable=f"main.upstream.{source}__resource__{slug(uri)}",
        reader=_nothing,
        upstream=source,
    )


@pytest.mark.parametrize(
    ("template", "uri", "matches"),
    [
        ("test://template/{id}/data", "test://template/123/data", True),
        ("test://template/{id}/data", "test://template/1/2/data", False),
        ("test://template/{id}/data", "test://template//data", False),
        ("file:///{+path}", "file:///a/b/c.txt", True),
        ("demo://r/{id}{?page}", "demo://r/7?page=2", True),
        ("demo://r/{id}{?page}", "demo://r/7", True),
        ("x://a.b/{id}", "x://aXb/1", False),  # literal parts are literal, not patterns
    ],
)
def test_a_template_matches_exactly_the_uris_it_expands_to(template: str, uri: str, matches: bool) -> None:
    assert (template_pattern(template).fullmatch(uri) is not None) is matches


def test_an_exact_resource_wins_over_a_template_that_matches_it() -> None:
    catalog = ResourceCatalog()
    catalog.sync("a", [target("test://t/{id}", template=True), target("test://t/special")])
    found = catalog.find("test://t/special")
    assert found is not None
    assert not found.definition.template
    templated = catalog.find("test://t/7")
    assert templated is not None
    assert templated.definition.template
    assert catalog.find("test://other") is None


def test_a_uri_another_source_serves_is_a_collision_and_the_first_keeps_serving() -> None:
    catalog = ResourceCatalog()
    catalog.sync("a", [target("test://shared")])
    clash = catalog.collision("b", target("test://shared", source="b"))
    assert clash is not None
    assert "a's" in clash
    assert catalog.collision("a", target("test://shared")) is None  # its own, re-listed


def test_listeners_hear_of_a_change_and_not_of_a_relisting() -> None:
    catalog = ResourceCatalog()
    heard: list[int] = []
    catalog.on_change(lambda: heard.append(1))
    catalog.sync("a", [target("test://one")])
    catalog.sync("a", [target("test://one")])
    catalog.sync("a", [target("test://one"), target("test://two")])
    assert len(heard) == 2


def test_reading_needs_use_catalog_use_schema_and_read_on_the_resource() -> None:
    needed = [str(r) for r in target("test://one").requirements()]
    assert needed == [
        "USE CATALOG on main",
        "USE SCHEMA on main.upstream",
        "READ on main.upstream.a__resource__test_one",
    ]


def test_a_slug_is_a_catalog_name_and_long_ones_stay_distinct() -> None:
    assert slug("test://static-text") == "test_static_text"
    long_a, long_b = slug("x://" + "a" * 100 + "1"), slug("x://" + "a" * 100 + "2")
    assert long_a != long_b
    assert len(long_a) <= 64


@pytest.mark.anyio
async def test_a_read_returns_the_contents_as_resource_blocks() -> None:
    output = await target("test://one").invoke({"uri": "test://one"})
    assert output.content == ({"type": "resource", "resource": {"uri": "test://one", "text": "x"}},)
    assert output.text == "x"
