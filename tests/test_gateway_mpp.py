"""MPP to the letter, end to end on a devnet (issue 9 items 6, 12 and 16).

- The realm is configuration: never an unlisted `Host`, so a crafted `Host` cannot re-cut a challenge id.
- Both challengeHash forms (the spec's and pympp 0.16's) pay by default; `mpp_strict` takes the spec's only.
- A replayed credential gets the core spec's 402 `invalid-challenge` with a fresh challenge; pympp's 403
  only behind `mpp_replay_status=403`.
- The mpp-tools server-verification cases answer with the problem types the vectors name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow import DevnetState
from gateway import ExactScheme, GatewayError, MemoryStore, PaymentMiddleware
from gateway._pipeline import DEFAULT_REALM
from tests.test_gateway_paid import PRICE, SECRET, Env, _env, _fresh_challenge, _problem
from x402 import MppChallenge, challenge_hash_pympp, challenge_id, parse_www_authenticate

pytestmark = [pytest.mark.chain, pytest.mark.anyio]


@pytest.fixture
async def env(devnet: DevnetState) -> AsyncIterator[Env]:
    async for e in _env(devnet, "before-response"):
        yield e


def _hello() -> Starlette:
    async def hello(request: Request) -> Response:
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/hello", hello)])


def gateway(env: Env, **options: Any) -> httpx.AsyncClient:
    """A paywall over `env`'s chain and payee with MPP `options` (realm, realm_hosts, mpp_strict, ...)."""
    app = PaymentMiddleware(
        _hello(),
        routes={"GET /hello": PRICE},
        schemes=[ExactScheme(env.chain)],
        pay_to=env.payee,
        asset=env.asset,
        store=MemoryStore(),
        secret=SECRET,
        **options,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def _challenge(client: httpx.AsyncClient, host: str | None = None) -> MppChallenge:
    response = await client.get("/hello", headers={"Host": host} if host else None)
    assert response.status_code == 402
    (challenge,) = parse_www_authenticate(response.headers.get_list("www-authenticate"))
    return challenge


# ------------------------------------------------------------------------------- item 6: the realm


async def test_a_crafted_host_cannot_recut_a_challenge_id(env: Env) -> None:
    """Before: the realm was the `Host` header and the HMAC slots were joined unescaped, so a client sending
    `Host: victim.example|evm|charge|<request>|2099-01-01T00:00:00Z:443` got an id that, cut at other pipes,
    is valid for realm `victim.example` expiring in 2099 (the rest of the input moved into `digest`), and
    that forged challenge was paid for and served. Now the realm is configured and the forgery refused."""
    payer = await env.payer()
    async with gateway(env) as client:
        request = (await _challenge(client)).request
        victim = "victim.example"
        crafted = f"{victim}|evm|charge|{request}|2099-01-01T00:00:00Z"
        issued = await _challenge(client, host=crafted + ":443")  # the old realm_for dropped a ":port"
        recut = msgspec.structs.replace(
            issued,
            realm=victim,
            expires="2099-01-01T00:00:00Z",
            digest=f"evm|charge|{request}|{issued.expires}|",
        )
        response = await client.get(
            "/hello", headers={"Host": victim, "Authorization": env.mpp_header(payer, recut)}
        )
    assert response.status_code == 402, f"the forged challenge was served: {response.text}"
    assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
    assert _fresh_challenge(response)
    assert issued.realm == DEFAULT_REALM  # the crafted Host never became the realm
    assert await env.balance(env.payee) == 0


async def test_the_realm_is_configured_never_an_unlisted_host(env: Env) -> None:
    async with gateway(env) as client:
        for host in ("evil.example", "testserver", "a|b"):
            assert (await _challenge(client, host)).realm == DEFAULT_REALM
    async with gateway(env, realm="api.example") as client:
        assert (await _challenge(client, "evil.example")).realm == "api.example"
    async with gateway(env, realm="api.example", realm_hosts=["Pay.Example", "[::1]"]) as client:
        assert (await _challenge(client, "PAY.example:8443")).realm == "pay.example"
        assert (await _challenge(client, "[::1]:8000")).realm == "[::1]"
        assert (await _challenge(client, "pay.example.evil")).realm == "api.example"
        assert (await _challenge(client, "evil.example")).realm == "api.example"


async def test_a_challenge_for_one_listed_host_does_not_pay_at_another(env: Env) -> None:
    """mpp-tools server-verification `realm_mismatch_rejected`: 402 invalid-challenge."""
    payer = await env.payer()
    async with gateway(env, realm_hosts=["a.example", "b.example"]) as client:
        challenge = await _challenge(client, "a.example")
        header = env.mpp_header(payer, challenge)
        response = await client.get("/hello", headers={"Host": "b.example", "Authorization": header})
        assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
        assert _fresh_challenge(response)
        assert await env.balance(env.payee) == 0
        response = await client.get("/hello", headers={"Host": "a.example", "Authorization": header})
        assert response.status_code == 200, response.text
    assert await env.balance(env.payee) == PRICE


@pytest.mark.parametrize(
    "options",
    [{"realm": "a|b"}, {"realm": ""}, {"realm_hosts": ["ok.example", "x|y"]}, {"mpp_replay_status": 401}],
)
def test_an_ambiguous_realm_or_replay_status_is_a_configuration_error(
    options: dict[str, Any], devnet: DevnetState
) -> None:
    with pytest.raises(GatewayError) as info:
        PaymentMiddleware(_hello(), routes={"GET /hello": PRICE}, schemes=[_NoScheme()], **options)
    assert info.value.code == "configuration_error"


class _NoScheme:
    """Configuration is checked before any scheme is used."""

    name = "none"


# ---------------------------------------------------------------------- item 12: both challengeHash forms


async def test_both_challenge_hash_forms_pay_by_default_and_the_log_says_which(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agentpay.gateway")
    payer = await env.payer()
    async with gateway(env) as client:
        pympp = await _challenge(client)
        nonce = challenge_hash_pympp(pympp.id, pympp.realm)
        response = await client.get(
            "/hello", headers={"Authorization": env.mpp_header(payer, pympp, nonce=nonce)}
        )
        assert response.status_code == 200, response.text
        spec = await _challenge(client)
        response = await client.get("/hello", headers={"Authorization": env.mpp_header(payer, spec)})
        assert response.status_code == 200, response.text
    assert await env.balance(env.payee) == 2 * PRICE
    said = [r.getMessage() for r in caplog.records if "challengeHash" in r.getMessage()]
    assert len(said) == 2
    assert pympp.id[:16] in said[0] and "pympp" in said[0]
    assert spec.id[:16] in said[1] and "spec" in said[1]


async def test_strict_mode_takes_the_spec_challenge_hash_only(env: Env) -> None:
    payer = await env.payer()
    async with gateway(env, mpp_strict=True) as client:
        challenge = await _challenge(client)
        nonce = challenge_hash_pympp(challenge.id, challenge.realm)
        header = env.mpp_header(payer, challenge, nonce=nonce)
        response = await client.get("/hello", headers={"Authorization": header})
        assert _problem(response) == (402, "invalid-challenge", "challenge_binding_mismatch")
        assert await env.balance(env.payee) == 0
        response = await client.get("/hello", headers={"Authorization": env.mpp_header(payer, challenge)})
        assert response.status_code == 200, response.text
    assert await env.balance(env.payee) == PRICE


# --------------------------------------------------------------------- item 16: replays, problem types


async def test_a_replay_gets_402_invalid_challenge_and_a_fresh_challenge(env: Env) -> None:
    """Core spec, "Status Codes": an already-used challenge id gets 402, invalid-challenge and a fresh
    challenge."""
    payer = await env.payer()
    async with gateway(env) as client:
        header = env.mpp_header(payer, await _challenge(client))
        assert (await client.get("/hello", headers={"Authorization": header})).status_code == 200
        response = await client.get("/hello", headers={"Authorization": header})
    assert _problem(response) == (402, "invalid-challenge", "invalid_exact_evm_nonce_already_used")
    assert (
        response.json()["challengeId"] == parse_www_authenticate(response.headers["www-authenticate"])[0].id
    )
    assert "payment-receipt" not in response.headers
    assert await env.balance(env.payee) == PRICE


async def test_pympp_replay_answer_behind_an_option(env: Env) -> None:
    payer = await env.payer()
    async with gateway(env, mpp_replay_status=403) as client:
        header = env.mpp_header(payer, await _challenge(client))
        assert (await client.get("/hello", headers={"Authorization": header})).status_code == 200
        response = await client.get("/hello", headers={"Authorization": header})
        assert _problem(response) == (403, "verification-failed", "invalid_exact_evm_nonce_already_used")
        assert "www-authenticate" not in response.headers
        # only a replay: any other refusal is still the spec's 402 with a fresh challenge
        stale = msgspec.structs.replace(await _challenge(client), id="forged")
        response = await client.get("/hello", headers={"Authorization": env.mpp_header(payer, stale)})
        assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
        assert _fresh_challenge(response)
    assert await env.balance(env.payee) == PRICE


async def test_a_challenge_without_expiry_is_an_invalid_challenge(env: Env) -> None:
    """mpp-tools server-verification `missing_credential_expires_rejected_with_route_expiry`: even with a
    valid id (here made with the server's secret), an echo without `expires` is `invalid-challenge`."""
    payer = await env.payer()
    async with gateway(env) as client:
        live = await _challenge(client)
        timeless = msgspec.structs.replace(
            live,
            expires=None,
            id=challenge_id(
                SECRET, live.realm, live.method, live.intent, live.request, None, None, live.opaque
            ),
        )
        response = await client.get("/hello", headers={"Authorization": env.mpp_header(payer, timeless)})
    assert _problem(response) == (402, "invalid-challenge", "invalid_challenge")
    assert _fresh_challenge(response)
    assert await env.balance(env.payee) == 0
