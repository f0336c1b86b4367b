from __future__ import annotations

import pytest
from tests.unit.api.api_helpers import BASE_URL, Client, api_headers, assert_error

VERSION_HEADERS = (
    "OpenStack-API-Minimum-Version",
    "OpenStack-API-Maximum-Version",
    "OpenStack-API-Version",
    "Vary",
)


async def test_root_lists_v1_with_its_version_range(client: Client) -> None:
    response = await client.get("/")
    assert response.status == 200
    body = await response.json()
    expected = {
        "id": "v1",
        "status": "CURRENT",
        "min_version": "1.1",
        "max_version": "1.40",
        "links": [{"href": f"{BASE_URL}/v1/", "rel": "self"}],
    }
    assert body["versions"] == [expected]
    assert body["default_version"] == expected
    assert {"name", "description"} <= set(body)
    assert response.headers["x-openstack-request-id"].startswith("req-")


@pytest.mark.parametrize("path", ["/v1", "/v1/"])
async def test_v1_document_links_each_collection(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    body = await response.json()
    assert body["id"] == "v1"
    assert body["media_types"][0]["base"] == "application/json"
    for collection in ("capsules", "containers", "hosts", "quotas", "quota_classes", "registries"):
        assert {"href": f"{BASE_URL}/v1/{collection}/", "rel": "self"} in body[collection]
    for header in VERSION_HEADERS:
        assert header in response.headers


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        (None, "container 1.1"),
        ("container 1.1", "container 1.1"),
        ("container 1.32", "container 1.32"),
        ("container 1.40", "container 1.40"),
        ("container latest", "container 1.40"),
        ("container LATEST", "container 1.40"),
    ],
)
async def test_microversion_negotiation(client: Client, sent: str | None, served: str) -> None:
    headers = {} if sent is None else {"OpenStack-API-Version": sent}
    response = await client.get("/v1/capsules", headers=headers)
    assert response.status == 200
    assert response.headers["OpenStack-API-Version"] == served
    assert response.headers["OpenStack-API-Minimum-Version"] == "container 1.1"
    assert response.headers["OpenStack-API-Maximum-Version"] == "container 1.40"
    assert response.headers["Vary"] == "OpenStack-API-Version"


@pytest.mark.parametrize(
    "sent",
    [
        "container 1.41",
        "container 1.0",
        "container 2.1",
        "container 0.9",
        "container abc",
        "container 1",
        "container 1.2.3",
        "compute 1.2",
        "container",
        "1.2",
        "container 1.-1",
    ],
)
async def test_bad_or_out_of_range_versions_are_406_in_zun_body(client: Client, sent: str) -> None:
    response = await client.get("/v1/capsules", headers={"OpenStack-API-Version": sent})
    await assert_error(response, 406, "container.microversion-unsupported")
    body = await response.json()
    assert body["errors"][0]["min_version"] == "1.1"
    assert body["errors"][0]["max_version"] == "1.40"
    for header in VERSION_HEADERS:
        assert header in response.headers


async def test_root_ignores_the_microversion_header(client: Client) -> None:
    response = await client.get("/", headers={"OpenStack-API-Version": "container 9.9"})
    assert response.status == 200
    assert "OpenStack-API-Version" not in response.headers


@pytest.mark.parametrize("path", ["/v1/capsules", "/v1/capsules/"])
async def test_collections_answer_with_and_without_trailing_slash(
    client: Client, path: str
) -> None:
    response = await client.get(path, headers=api_headers())
    assert response.status == 200
    assert (await response.json())["capsules"] == []
