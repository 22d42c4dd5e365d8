"""The payer side of MPP sessions (draft-evm-session-00): one channel, a cumulative voucher per request.

`SessionClient` answers a session 402 by opening a channel through its `ChannelOpener` (the payer's
smart account or EOA sends `open` with the session key as `authorizedSigner`), then pays each request with
a voucher signed by the session key. A voucher pre-authorizes the next request's maximum on top of what
the server says was spent (its receipt); when the server answers 402 with `requiredCumulative`, the client
signs that (within its `SpendPolicy`) and retries once. `close()` signs a final voucher for exactly what was
spent, so the payee is paid the actual charges and the rest of the deposit goes back to the payer.

`stream()` reads a billed SSE response: on `payment-need-voucher` it posts a voucher for the required
cumulative amount to the same URL (which the server does not charge) and keeps reading.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
import msgspec

from ._errors import NoPayableOffer, SpendPolicyViolation, X402Error
from ._mpp import MppCredential, b64url_decode, decode_json_param
from ._mpp_header import format_credential, parse_www_authenticate
from ._session import DepositAuthorization, SessionReceipt, channel_id, deposit_payload, sign_voucher
from ._signer import Signer
from .client import Offer, Reservation, SpendPolicy

__all__ = ["AuthorizingOpener", "ChannelOpener", "SessionClient"]


class ChannelOpener(Protocol):
    """Puts money in a channel on chain: the payer's side. `gateway.EoaChannelOpener` (an EOA sends
    `open`), `escrow.AccountChannelOpener` (a smart account's session key signs a user operation, a bundler
    sends it) and `escrow.AuthorizationChannelOpener` (the payer signs an EIP-3009 authorization, a relayer
    sends `openWithAuthorization`)."""

    @property
    def payer(self) -> str: ...

    async def open(self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str) -> str:
        """Open the channel; returns the transaction hash."""
        ...

    async def top_up(self, *, escrow: str, channel: str, amount: int) -> str: ...


class AuthorizingOpener(ChannelOpener, Protocol):
    """An opener that can also sign the deposit for the server to relay (`feePayer: true`): an EIP-3009
    authorization from the payer's key (`escrow.AuthorizationChannelOpener`) or an owner-signed file
    (`escrow.PresignedChannelOpener`). None: it cannot sign this one."""

    async def authorize_open(
        self, *, escrow: str, payee: str, token: str, deposit: int, salt: str, signer: str
    ) -> DepositAuthorization | None: ...

    async def authorize_top_up(
        self, *, escrow: str, channel: str, amount: int
    ) -> DepositAuthorization | None: ...


class _Open(msgspec.Struct, kw_only=True):
    channel: str
    escrow: str
    chain_id: int
    deposit: int
    signed: int = 0  # the highest voucher signed
    spent: int = 0  # what the server says was charged
    signature: str = ""
    types: tuple[str, ...] = ("hash",)  # the credential types the server takes
    fee_payer: bool = False  # the server relays `authorization` deposits


def _session_request(response: httpx.Response) -> tuple[Any, dict[str, Any]]:
    for value in response.headers.get_list("www-authenticate"):
        for challenge in parse_www_authenticate(value):
            if challenge.method == "evm" and challenge.intent == "session":
                return challenge, decode_json_param(challenge.request)
    raise NoPayableOffer("the server offers no evm/session challenge")


class SessionClient:
    """Pays session routes over one channel per (payee, escrow).

    `max_voucher_step`: the most a single request may pre-authorize on top of what was spent (the
    per-call cap, enforced before signing); `deposit`: what a new channel holds.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        signer: Signer,
        opener: ChannelOpener,
        deposit: int,
        max_voucher_step: int,
        policy: SpendPolicy | None = None,
    ) -> None:
        self.http = http
        self.signer = signer
        self.opener = opener
        self.deposit = deposit
        self.max_voucher_step = max_voucher_step
        self.channels: dict[tuple[str, str], _Open] = {}
        self._challenge: dict[str, Any] = {}
        self._step: dict[str, int] = {}
        self.receipts: list[SessionReceipt] = []
        # SpendPolicy: what vouchers authorize beyond what was spent is held; what is spent is committed.
        self.policy = policy
        self._held: dict[str, Reservation] = {}
        self._payee: dict[str, tuple[str, str, str]] = {}  # channel -> (payee, token, network)

    async def _channel(self, url: str, response: httpx.Response) -> tuple[_Open, Any]:
        challenge, request = _session_request(response)
        self._challenge[url.split("?", 1)[0]] = challenge
        details = request.get("methodDetails") or {}
        escrow, payee = str(details["escrowContract"]), str(request["recipient"])
        key = (payee.lower(), escrow.lower())
        ch = self.channels.get(key)
        if ch is None:
            ch = await self._open(url, challenge, request)
            self.channels[key] = ch
        return ch, challenge

    async def _open(self, url: str, challenge: Any, request: dict[str, Any]) -> _Open:
        """Open a channel: relayed by the server when it pays the fee and the opener can sign the deposit
        (`AuthorizingOpener`), else through the opener (a `hash` credential: only if the server lists it)."""
        details = request.get("methodDetails") or {}
        escrow, payee, token = (
            str(details["escrowContract"]),
            str(request["recipient"]),
            str(request["currency"]),
        )
        chain_id = int(details["chainId"])
        types = tuple(str(t) for t in details.get("credentialTypes") or ["hash"])
        relayed = bool(details.get("feePayer")) and "authorization" in types
        salt, payer, amount = "0x" + os.urandom(32).hex(), self.opener.payer, self.deposit
        deposit: DepositAuthorization | None = None
        authorize = getattr(self.opener, "authorize_open", None) if relayed else None
        if authorize is not None:
            deposit = await authorize(
                escrow=escrow, payee=payee, token=token, deposit=amount, salt=salt, signer=self.signer.address
            )
        if deposit is not None:
            if (
                deposit.authorized_signer.lower() != self.signer.address.lower()
                or deposit.to.lower() != escrow.lower()
            ):
                raise X402Error("the signed open is for another session key or escrow", code="open_mismatch")
            salt, payer, amount = deposit.salt, deposit.payer, deposit.value
        elif "hash" not in types:  # a client must not send a type the server did not list
            raise NoPayableOffer(f"the server takes only {list(types)}; this payer cannot sign a deposit")
        else:
            await self.opener.open(
                escrow=escrow, payee=payee, token=token, deposit=amount, salt=salt, signer=self.signer.address
            )
        cid = channel_id(
            payer=payer,
            payee=payee,
            token=token,
            salt=salt,
            authorized_signer=self.signer.address,
            escrow=escrow,
            chain_id=chain_id,
        )
        ch = _Open(
            channel=cid, escrow=escrow, chain_id=chain_id, deposit=amount, types=types, fee_payer=relayed
        )
        self._payee[cid] = (payee, token, f"eip155:{chain_id}")
        if deposit is not None:  # the server relays the open (and pays its gas): a management request, 204
            voucher = sign_voucher(self.signer, chain_id=chain_id, escrow=escrow, channel=cid, cumulative=0)
            payload = {
                "action": "open",
                "channelId": cid,
                **deposit_payload(deposit),
                "cumulativeAmount": "0",
                "voucherSignature": voucher,
            }
            response = await self.http.post(url, headers=self._auth(challenge, payload))
            if response.status_code != 204:
                raise X402Error(
                    f"open refused: {response.status_code} {response.text[:200]}", code="open_refused"
                )
        return ch

        return ch, challenge

    def adopt(
        self, *, channel: str, payee: str, escrow: str, token: str, chain_id: int, deposit: int
    ) -> None:
        """Pay `payee` over a channel opened elsewhere (e.g. an owner's offline-signed open, relayed):
        its `authorizedSigner` must be this client's signer."""
        self.channels[(payee.lower(), escrow.lower())] = _Open(
            channel=channel.lower(), escrow=escrow, chain_id=chain_id, deposit=deposit
        )
        self._payee[channel.lower()] = (payee, token, f"eip155:{chain_id}")

    def channel(self, url: str) -> _Open | None:
        """The open channel that pays `url`'s payee, once the first 402 (or `adopt`) named it."""
        known = self._known(url)
        return None if known is None else known[0]

    async def top_up(self, url: str, amount: int, *, hash: str | None = None) -> SessionReceipt | None:
        """Add `amount` to the channel paying `url` (through the opener, unless `hash` names a top-up already
        sent), then tell the server (a `topUp` credential, answered 204 without running the handler)."""
        known = self._known(url)
        if known is None:
            raise X402Error(f"no open channel pays {url}", code="no_channel")
        ch, challenge = known
        authorize = getattr(self.opener, "authorize_top_up", None) if ch.fee_payer and hash is None else None
        deposit = None
        if authorize is not None:
            deposit = await authorize(escrow=ch.escrow, channel=ch.channel, amount=amount)
        payload: dict[str, Any] = {
            "action": "topUp",
            "channelId": ch.channel,
            "additionalDeposit": str(amount),
        }
        if deposit is not None:  # the server relays it
            payload.update(deposit_payload(deposit))
        elif "hash" not in ch.types:
            raise NoPayableOffer(
                f"the server takes only {list(ch.types)} top-ups; this payer cannot sign one"
            )
        else:
            if hash is None:
                hash = await self.opener.top_up(escrow=ch.escrow, channel=ch.channel, amount=amount)
            payload.update({"type": "hash", "hash": hash})
        response = await self.http.post(url, headers=self._auth(challenge, payload))
        if response.status_code != 204:
            raise X402Error(
                f"top-up refused: {response.status_code} {response.text[:200]}", code="top_up_refused"
            )
        ch.deposit += amount
        value = response.headers.get("payment-receipt")
        return None if value is None else msgspec.json.decode(_b64(value), type=SessionReceipt)

    def _voucher(self, ch: _Open, cumulative: int, action: str = "voucher") -> dict[str, Any]:
        if action != "close":
            cumulative = max(cumulative, ch.signed)
            if cumulative - ch.spent > self.max_voucher_step:
                raise SpendPolicyViolation(
                    f"the server asks to pre-authorize {cumulative - ch.spent}, above {self.max_voucher_step}"
                )
            if cumulative > ch.deposit:
                raise SpendPolicyViolation(f"voucher {cumulative} above the channel deposit {ch.deposit}")
        if action != "close" and cumulative > ch.signed:
            self._hold(ch, cumulative - ch.spent)  # refused here, before signing, when the policy says no
        if cumulative != ch.signed or not ch.signature or action == "close":
            ch.signature = sign_voucher(
                self.signer, chain_id=ch.chain_id, escrow=ch.escrow, channel=ch.channel, cumulative=cumulative
            )
            ch.signed = max(ch.signed, cumulative) if action != "close" else cumulative
        signature = ch.signature
        return {
            "action": action,
            "channelId": ch.channel,
            "cumulativeAmount": str(cumulative),
            "signature": signature,
        }

    def _auth(self, challenge: Any, payload: dict[str, Any]) -> dict[str, str]:
        credential = MppCredential(challenge=challenge, payload=payload)
        return {"authorization": "Payment " + format_credential(credential)}

    def _read_receipt(self, ch: _Open, response: httpx.Response) -> None:
        value = response.headers.get("payment-receipt")
        if value is None:
            return
        receipt = msgspec.json.decode(b64url_decode(value), type=SessionReceipt)
        if receipt.channel_id != ch.channel:
            raise X402Error(
                f"receipt for channel {receipt.channel_id}, not {ch.channel}", code="receipt_mismatch"
            )
        self._spend(ch, _spent(receipt))
        self.receipts.append(receipt)

    def _hold(self, ch: _Open, outstanding: int) -> None:
        if self.policy is None:
            return
        payee, token, network = self._payee.get(ch.channel, (ch.escrow, ch.escrow, f"eip155:{ch.chain_id}"))
        offer = Offer(
            protocol="mpp",
            scheme="evm/session",
            network=network,
            asset=token,
            amount=outstanding,
            pay_to=payee,
        )
        previous = self._held.pop(ch.channel, None)
        if previous is not None:
            previous.release()
        try:
            self._held[ch.channel] = self.policy.reserve(offer)
        except SpendPolicyViolation:
            if previous is not None:  # keep holding what the last voucher authorized
                self._held[ch.channel] = self.policy.reserve(
                    Offer(
                        protocol="mpp",
                        scheme="evm/session",
                        network=network,
                        asset=token,
                        amount=previous.amount,
                        pay_to=payee,
                    )
                )
            raise

    def _spend(self, ch: _Open, spent: int) -> None:
        """The server charged up to `spent`: commit the difference, keep holding the rest authorized."""
        delta = spent - ch.spent
        ch.spent = max(ch.spent, spent)
        if self.policy is None or delta <= 0:
            return
        held = self._held.pop(ch.channel, None)
        if held is not None:
            held.commit(delta)  # spends `delta`, frees the rest of the hold ...
        rest = max(0, ch.signed - ch.spent)
        if rest:  # ... which the signed vouchers still authorize: hold it again
            payee, token, network = self._payee[ch.channel]
            offer = Offer(
                protocol="mpp", scheme="evm/session", network=network, asset=token, amount=rest, pay_to=payee
            )
            self._held[ch.channel] = self.policy.reserve(offer)

    def _known(self, url: str) -> tuple[_Open, Any] | None:
        """The channel and challenge already used for `url`'s path: pay it without a 402 round trip."""
        challenge = self._challenge.get(url.split("?", 1)[0])
        if challenge is None:
            return None
        request = decode_json_param(challenge.request)
        key = (str(request["recipient"]).lower(), str(request["methodDetails"]["escrowContract"]).lower())
        ch = self.channels.get(key)
        return None if ch is None else (ch, challenge)

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """Send a request, paying it over the session (opening the channel on the first 402)."""
        headers = dict(kw.pop("headers", {}) or {})
        known = self._known(url)
        if known is None:
            response = await self.http.request(method, url, headers=headers, **kw)
            if response.status_code != 402:
                return response
            ch, challenge = await self._channel(url, response)
        else:
            ch, challenge = known
        target = ch.spent + self._step.get(
            url.split("?", 1)[0], int(decode_json_param(challenge.request)["amount"])
        )
        for attempt in range(3):
            payload = self._voucher(ch, target)
            response = await self.http.request(
                method, url, headers={**headers, **self._auth(challenge, payload)}, **kw
            )
            if response.status_code != 402:
                self._read_receipt(ch, response)
                return response
            problem = response.json() if "problem" in response.headers.get("content-type", "") else {}
            required = problem.get("requiredCumulative")
            if required is not None:
                target = int(required)
                # Remember how much this route pre-authorizes, to send enough the next time at once.
                self._step[url.split("?", 1)[0]] = target - ch.spent
            elif (
                str(problem.get("type", "")).endswith(("challenge-expired", "challenge-not-found"))
                and attempt == 0
            ):
                challenge, _ = _session_request(response)
                self._challenge[url.split("?", 1)[0]] = challenge
            else:
                return response
        return response

    async def stream(self, url: str, **kw: Any) -> AsyncIterator[tuple[str, str]]:
        """Yield the (event, data) of a billed SSE stream, posting vouchers when the server asks."""
        first = await self.http.get(url, **kw)
        if first.status_code != 402:
            raise X402Error(f"expected a 402 from {url}, got {first.status_code}", code="unexpected_status")
        ch, challenge = await self._channel(url, first)
        payload = self._voucher(ch, ch.spent + int(decode_json_param(challenge.request)["amount"]))
        headers = {"accept": "text/event-stream", **self._auth(challenge, payload)}
        async with self.http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise X402Error(
                    f"stream refused: {response.status_code} {response.text[:200]}", code="stream_refused"
                )
            event, data = "message", ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif line == "":
                    if event == "payment-need-voucher":
                        need = msgspec.json.decode(data)
                        unit = int(decode_json_param(challenge.request)["amount"])
                        # A stream charges one unit at a time: the server has spent all but the next unit.
                        self._spend(ch, int(need["requiredCumulative"]) - unit)
                        voucher = self._voucher(
                            ch, int(need["requiredCumulative"]) + self._stream_step(challenge)
                        )
                        posted = await self.http.post(
                            url, headers={"accept": "text/event-stream", **self._auth(challenge, voucher)}
                        )
                        if posted.status_code != 204:
                            raise X402Error(
                                f"voucher refused: {posted.status_code} {posted.text[:200]}",
                                code="voucher_refused",
                            )
                    elif event == "payment-receipt":
                        receipt = msgspec.json.decode(data, type=SessionReceipt)
                        self._spend(ch, _spent(receipt))
                        self.receipts.append(receipt)
                        yield event, data
                    else:
                        yield event, data
                    event, data = "message", ""

    def _stream_step(self, challenge: Any) -> int:
        """Vouchers during a stream pre-authorize a batch of units at once (fewer round trips)."""
        unit = int(decode_json_param(challenge.request)["amount"])
        return max(0, min(self.max_voucher_step - unit, unit * 99))

    async def close(self, url: str) -> SessionReceipt | None:
        """Close every channel to `url`'s payee with a final voucher for exactly what was spent."""
        challenge = self._challenge.get(url.split("?", 1)[0])
        if challenge is None:
            return None
        request = decode_json_param(challenge.request)
        key = (str(request["recipient"]).lower(), str(request["methodDetails"]["escrowContract"]).lower())
        ch = self.channels.pop(key, None)
        if ch is None:
            return None
        payload = self._voucher(ch, ch.spent, action="close")
        held = self._held.pop(ch.channel, None)
        if held is not None:  # the channel ends at what was spent: nothing more is authorized
            held.release()
        response = await self.http.post(url, headers=self._auth(challenge, payload))
        if response.status_code == 503 and "close-pending" in response.text:
            # Sent, not yet mined: the server waits for that transaction. Ask again (`close`) for its outcome.
            self.channels[key] = ch
            raise X402Error(f"close pending: {response.text[:200]}", code="close_pending")
        if response.status_code != 204:
            raise X402Error(
                f"close refused: {response.status_code} {response.text[:200]}", code="close_refused"
            )
        value = response.headers.get("payment-receipt")
        return None if value is None else msgspec.json.decode(_b64(value), type=SessionReceipt)


def _b64(value: str) -> bytes:
    return b64url_decode(value)


def _spent(receipt: SessionReceipt) -> int:
    """A paid response's receipt must say what was spent (only a top-up's may leave it out)."""
    if receipt.spent is None:
        raise X402Error("the session receipt of a paid response has no spent", code="receipt_mismatch")
    return int(receipt.spent)
