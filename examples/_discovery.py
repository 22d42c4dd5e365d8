"""What the sub-agent's discovery documents say beyond its route table (`/openapi.json`, `/llms.txt`).

`POST /summarize` is priced from its body, so a request without one cannot be priced (400); the example
body lets a validator (`mppx validate`) retry with it and reach the 402.
"""

from __future__ import annotations

from gateway import Discovery

__all__ = ["DISCOVERY"]

DISCOVERY = Discovery(
    title="agentpay sub-agent",
    description="A paid sub-agent: greetings, weather and summaries, paid per call over x402 or MPP.",
    categories=("ai", "utilities"),
    operations={
        "POST /summarize": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["text"],
                            "properties": {
                                "text": {"type": "string", "description": "the text to summarize"}
                            },
                        },
                        "example": {"text": "Agents pay agents per call, in stablecoins, over HTTP 402."},
                    }
                },
            }
        },
        "GET /weather": {
            "parameters": [
                {"name": "city", "in": "query", "required": False, "schema": {"type": "string"}},
            ]
        },
    },
)
