"""Read-only queries shared by the SQL backends (operator views: dashboards, metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway._stores import COLUMNS

__all__ = ["list_query"]


def list_query(
    table: str,
    mark: str,
    states: Sequence[str] | None,
    kind: str | None,
    payer: str | None,
    since: float | None,
    oldest_first: bool,
) -> tuple[str, list[Any]]:
    """`SELECT COLUMNS FROM table WHERE <filters> ORDER BY ...` and its arguments, without LIMIT/OFFSET.

    `mark` is the placeholder style: "?" (SQLite) or "$" (PostgreSQL, numbered $1, $2, ...).
    """
    where: list[str] = []
    args: list[Any] = []

    def param(value: Any) -> str:
        args.append(value)
        return "?" if mark == "?" else f"${len(args)}"

    if states is not None:
        where.append(f"state IN ({', '.join(param(s) for s in states)})" if states else "false")
    if kind is not None:
        where.append(f"kind = {param(kind)}")
    if payer is not None:
        where.append(f"lower(payer) = lower({param(payer)})")
    if since is not None:
        where.append(f"created_at >= {param(since)}")
    order = "" if oldest_first else " DESC"
    sql = f"SELECT {COLUMNS} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + f" ORDER BY created_at{order}, key{order}", args
