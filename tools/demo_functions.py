"""Demo business logic, published as catalog functions (each becomes a governed MCP tool)."""

from __future__ import annotations

from datetime import date

from tools.functions import catalog_function


@catalog_function("main.tools.apply_discount")
def apply_discount(price: float, percent: float = 10.0) -> float:
    """Price after a percentage discount, rounded to cents.

    Args:
        price: The list price.
        percent: The discount in percent (0-100).
    """
    if not 0 <= percent <= 100:
        raise ValueError("percent must be between 0 and 100")
    return round(price * (1 - percent / 100), 2)


@catalog_function("main.tools.days_between")
def days_between(start: date, end: date) -> int:
    """Calendar days from start to end (negative when end is earlier).

    Args:
        start: The first day (YYYY-MM-DD).
        end: The last day (YYYY-MM-DD).
    """
    return (date.fromisoformat(str(end)) - date.fromisoformat(str(start))).days
