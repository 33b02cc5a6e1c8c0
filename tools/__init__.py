"""Built-in tools, each a small module with a typed signature."""

from __future__ import annotations

from server.registry import Tool
from tools.clock import ClockTool
from tools.echo import EchoTool
from tools.profile import ProfileTool
from tools.reset import ResetTool


def demo_tools() -> list[Tool]:
    """The tools served with `demo = true`: enough to see grants, policy and obligations at work."""
    return [EchoTool(), ClockTool(), ProfileTool(), ResetTool()]
