"""Paid A2A agents (needs the `a2a-sdk` package): `PaidAgent` charges per task with the a2a-x402 extension
through the gateway's paywall; `agent_card` declares the extension. See `gateway._a2a` for the flow."""

from ._a2a import PaidAgent, agent_card

__all__ = ["PaidAgent", "agent_card"]
