"""The local identity service (/v3) and token checks on /v1, through HTTP as clients do."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from aiohttp import web
from tests.unit.api.api_helpers import BASE_URL, assert_error, zun_template
from tests.unit.api.identity_helpers import (
    PASSWORD,
    Cloud,
    CloudFactory,
    cheap_password_hashes,
    cloud,
    make_cloud,
    token_headers,
)

from capsa.identity.admin import IdentityAdmin
from capsa.identity.tokens import TokenSigner, load_or_create_key
from capsa.store import Store

__all__ = ["cheap_password_hashes", "cloud", "make_cloud"]


async def assert_keystone_error(response: web.StreamResponse, status: int, *fragments: str) -> None:
    assert response.status == status
    body = await response.json()  # type: ignore[attr-defined]
    error = body["error"]
    assert error["code"] == status
    assert error["title"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


async def test_password_auth_answers_201_with_the_token_and_keystone_body(cloud: Cloud) -> None:
    user = await cloud.user("alice", "team-a")
    status, body, token = await cloud.login("alice", "team-a")
    assert status == 201 and token
    t = body["token"]
    assert t["user"]["id"] == user.id and t["user"]["name"] == "alice"
    assert t["user"]["domain"] == {"id": "default", "name": "Default"}
    assert t["project"]["name"] == "team-a" and t["project"]["domain"]["id"] == "default"
    assert t["roles"] == [{"id": "member", "name": "member"}]
    assert t["methods"] == ["password"]
    assert t["expires_at"].endswith("Z") and t["expires_at"] > t["issued_at"]
    catalog = {service["type"]: service for service in t["catalog"]}
    assert set(catalog) == {"container", "identity", "network"}
    [public] = [e for e in catalog["container"]["endpoints"] if e["interface"] == "public"]
    assert public["url"] == f"{BASE_URL}/v1"
    assert {e["url"] for e in catalog["identity"]["endpoints"]} == {f"{BASE_URL}/v3"}
    # Neutron clients add /v2.0 to the network endpoint themselves.
    assert {e["url"] for e in catalog["network"]["endpoints"]} == {f"{BASE_URL}/networking"}
    # The body never carries the password, nor its hash.
    assert PASSWORD not in str(body) and "argon2" not in str(body)


async def test_default_project_scopes_an_unscoped_request(cloud: Cloud) -> None:
    await cloud.user("bob", "team-b")
    status, body, _ = await cloud.login("bob")
    assert status == 201
    assert body["token"]["project"]["name"] == "team-b"


async def test_validating_a_token_answers_the_same_catalog(cloud: Cloud) -> None:
    await cloud.user("carol", "team-c")
    _, body, token = await cloud.login("carol", "team-c")
    assert token is not None
    response = await cloud.client.get(
        "/v3/auth/tokens", headers={"X-Auth-Token": token, "X-Subject-Token": token}
    )
    assert response.status == 200
    catalog = (await response.json())["token"]["catalog"]
    assert catalog == body["token"]["catalog"]
    services = {service["type"]: service for service in catalog}
    assert {e["url"] for e in services["network"]["endpoints"]} == {f"{BASE_URL}/networking"}


@pytest.mark.parametrize(
    ("user", "password", "project"),
    [
        ("alice", "wrong password", "team-a"),
        ("nobody", PASSWORD, "team-a"),
        ("alice", PASSWORD, "team-z"),
        ("alice", PASSWORD, "other-team"),
    ],
)
async def test_bad_credentials_or_scope_answer_401_without_a_token(
    cloud: Cloud, user: str, password: str, project: str
) -> None:
    await cloud.user("alice", "team-a")
    await cloud.project("other-team")
    status, body, token = await cloud.login(user, project, password)
    assert status == 401 and token is None
    assert body["error"]["code"] == 401


async def test_a_disabled_user_cannot_log_in(cloud: Cloud) -> None:
    user = await cloud.user("dave", "team-d")
    await cloud.identity.store.update_user(user.id, enabled=False)
    status, _, token = await cloud.login("dave", "team-d")
    assert status == 401 and token is None


async def test_another_domain_or_a_malformed_body_is_refused(cloud: Cloud) -> None:
    await cloud.user("erin", "team-e")
    password = {"user": {"name": "erin", "domain": {"name": "Other"}, "password": PASSWORD}}
    response = await cloud.client.post(
        "/v3/auth/tokens",
        json={"auth": {"identity": {"methods": ["password"], "password": password}}},
    )
    await assert_keystone_error(response, 401, "Other")
    response = await cloud.client.post("/v3/auth/tokens", json={"auth": {"identity": {}}})
    await assert_keystone_error(response, 400, "auth.identity.methods: required field is missing")


async def test_v1_needs_a_valid_token(cloud: Cloud) -> None:
    response = await cloud.client.get("/v1/capsules", headers={})
    await assert_error(response, 401, "container.not-authenticated", "X-Auth-Token")
    assert response.headers["WWW-Authenticate"] == f'Keystone uri="{BASE_URL}/v3"'
    for token in ("notused", "capsa1.e30.AAAA"):
        response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
        await assert_error(response, 401, "container.not-authenticated", "not valid")
    token = await cloud.token("frank", "team-f")
    response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
    assert response.status == 200
    # The version documents stay public: clients read them before they authenticate.
    assert (await cloud.client.get("/")).status == 200
    assert (await cloud.client.get("/v1")).status == 200
    assert (await cloud.client.get("/v3")).status == 200


async def test_the_project_and_user_come_from_the_token(cloud: Cloud) -> None:
    token = await cloud.token("gina", "team-g")
    user = await cloud.identity.store.find_user("gina")
    project = await cloud.identity.store.find_project("team-g")
    assert user is not None and project is not None
    headers = {**token_headers(token), "X-Project-Id": "someone-else", "X-Roles": "admin"}
    response = await cloud.client.post(
        "/v1/capsules", json={"template": zun_template()}, headers=headers
    )
    assert response.status == 202
    body = await response.json()
    assert body["project_id"] == project.id and body["user_id"] == user.id
    # The headers claimed admin; the token's member role does not see hosts.
    assert "host" not in body


async def test_a_disabled_user_or_a_deleted_project_stops_its_tokens_at_once(
    cloud: Cloud,
) -> None:
    token = await cloud.token("hank", "team-h")
    other = await cloud.token("ivy", "team-i")
    for t in (token, other):
        assert (await cloud.client.get("/v1/capsules", headers=token_headers(t))).status == 200
    user = await cloud.identity.store.find_user("hank")
    assert user is not None
    await cloud.identity.store.update_user(user.id, enabled=False)
    response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 401, "container.not-authenticated")
    project = await cloud.identity.store.find_project("team-i")
    assert project is not None
    await cloud.identity.store.delete_project(project.id)
    response = await cloud.client.get("/v1/capsules", headers=token_headers(other))
    await assert_error(response, 401, "container.not-authenticated")


async def test_a_removed_role_stops_the_token(cloud: Cloud) -> None:
    token = await cloud.token("jack", "team-j")
    user = await cloud.identity.store.find_user("jack")
    project = await cloud.identity.store.find_project("team-j")
    assert user is not None and project is not None
    assert await cloud.identity.store.remove_role(user.id, project.id, "member")
    response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 401, "container.not-authenticated")


async def test_validate_and_revoke(cloud: Cloud) -> None:
    token = await cloud.token("kim", "team-k")
    other = await cloud.token("lee", "team-k")
    admin = await cloud.token("root", "admins", role="admin")

    def check(caller: str, subject: str) -> dict[str, str]:
        return {"X-Auth-Token": caller, "X-Subject-Token": subject}

    response = await cloud.client.get("/v3/auth/tokens", headers=check(token, token))
    assert response.status == 200
    body = await response.json()
    assert body["token"]["user"]["name"] == "kim"
    assert response.headers["X-Subject-Token"] == token
    # Another member may not look at kim's token; an admin (a service) may.
    response = await cloud.client.get("/v3/auth/tokens", headers=check(other, token))
    await assert_keystone_error(response, 403)
    response = await cloud.client.get("/v3/auth/tokens?nocatalog", headers=check(admin, token))
    assert response.status == 200
    assert "catalog" not in (await response.json())["token"]
    assert (await cloud.client.head("/v3/auth/tokens", headers=check(admin, token))).status == 200
    response = await cloud.client.get("/v3/auth/tokens", headers=check(admin, "capsa1.x.y"))
    await assert_keystone_error(response, 404)

    # Revoking kim's token ends it, and only it.
    response = await cloud.client.delete("/v3/auth/tokens", headers=check(other, token))
    await assert_keystone_error(response, 403)
    response = await cloud.client.delete("/v3/auth/tokens", headers=check(token, token))
    assert response.status == 204
    response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
    await assert_error(response, 401, "container.not-authenticated")
    assert (await cloud.client.get("/v1/capsules", headers=token_headers(other))).status == 200
    response = await cloud.client.get("/v3/auth/tokens", headers=check(admin, token))
    await assert_keystone_error(response, 404)


async def test_the_token_method_changes_project(cloud: Cloud) -> None:
    token = await cloud.token("mo", "team-m")
    user = await cloud.identity.store.find_user("mo")
    project = await cloud.project("team-n")
    assert user is not None
    await IdentityAdmin(cloud.identity.store).grant(user, project, "reader")
    body = {
        "auth": {
            "identity": {"methods": ["token"], "token": {"id": token}},
            "scope": {"project": {"id": project.id}},
        }
    }
    response = await cloud.client.post("/v3/auth/tokens", json=body)
    assert response.status == 201
    assert (await response.json())["token"]["roles"] == [{"id": "reader", "name": "reader"}]
    # Without a scope, the new token keeps the old one's project; a token that proves nothing
    # gets none.
    del body["auth"]["scope"]
    response = await cloud.client.post("/v3/auth/tokens", json=body)
    assert response.status == 201
    assert (await response.json())["token"]["project"]["name"] == "team-m"
    body["auth"]["identity"]["token"]["id"] = "capsa1.x.y"
    response = await cloud.client.post("/v3/auth/tokens", json=body)
    await assert_keystone_error(response, 401, "not valid")
    assert "X-Subject-Token" not in response.headers


async def test_expired_or_forged_tokens_prove_nothing(cloud: Cloud) -> None:
    await cloud.user("nina", "team-o")
    user = await cloud.identity.store.find_user("nina")
    project = await cloud.identity.store.find_project("team-o")
    assert user is not None and project is not None
    key = load_or_create_key(cloud.identity_key_path)
    expired, _ = TokenSigner(key).issue(user.id, project.id, timedelta(seconds=-1))
    forged, _ = TokenSigner(b"x" * 32).issue(user.id, project.id, timedelta(hours=1))
    good, _ = TokenSigner(key).issue(user.id, project.id, timedelta(hours=1))
    for token in (expired, forged):
        response = await cloud.client.get("/v1/capsules", headers=token_headers(token))
        await assert_error(response, 401, "container.not-authenticated")
    assert (await cloud.client.get("/v1/capsules", headers=token_headers(good))).status == 200


async def test_passwords_are_never_logged(cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await cloud.user("oscar", "team-p")
    await cloud.login("oscar", "team-p")
    await cloud.login("oscar", "team-p", password="a wrong one")
    assert "issued" in caplog.text and "refused" in caplog.text
    assert PASSWORD not in caplog.text and "a wrong one" not in caplog.text


async def test_the_network_service_runs_with_the_tokens_caller(
    make_cloud: CloudFactory, store: Store
) -> None:
    cloud = await make_cloud()
    response = await cloud.client.get("/networking/v2.0/networks")
    assert response.status == 401
    token = await cloud.token("pat", "team-q", role="reader")
    project = await cloud.identity.store.find_project("team-q")
    assert project is not None
    theirs = await store.networks.create_network(project_id=project.id, name="q-net", mtu=1500)
    await store.networks.create_network(project_id="other", name="other-net", mtu=1500)
    # The token decides who calls, whatever the headers say; a reader reads, and writes nothing.
    headers = {"X-Auth-Token": token, "X-Project-Id": "other"}
    response = await cloud.client.get("/networking/v2.0/networks", headers=headers)
    assert response.status == 200
    assert [n["id"] for n in (await response.json())["networks"]] == [theirs.id]
    response = await cloud.client.post(
        "/networking/v2.0/networks", json={"network": {"name": "x"}}, headers=headers
    )
    assert response.status == 403
    assert (await response.json())["NeutronError"]["type"] == "PolicyNotAuthorized"
