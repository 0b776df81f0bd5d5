"""Handlers written with Restate's Python SDK, for Ferry's compatibility tests.

Served over HTTP/1.1 by hypercorn: `hypercorn --bind 127.0.0.1:PORT handlers:app`.
"""

from datetime import timedelta

import restate
from restate import Context, ObjectContext, Service, VirtualObject

echo = Service("PyEcho")


@echo.handler()
async def headers(ctx: Context, payload: dict) -> dict:
    """Returns the headers of the request it was invoked with."""
    return dict(ctx.request().headers)


counter = VirtualObject("PyCounter")


@counter.handler()
async def add(ctx: ObjectContext, payload: dict) -> int:
    """Increments the object's `count` and returns it."""
    count = (await ctx.get("count") or 0) + 1
    ctx.set("count", count)
    return count


ephemeral = Service("PyEphemeral", journal_retention=timedelta(0))


@ephemeral.handler()
async def run(ctx: Context, payload: dict) -> str:
    """Returns "done"; its invocations are not kept once completed."""
    return "done"


caller = Service("PyCaller")


@caller.handler()
async def call(ctx: Context, payload: dict) -> list:
    """Calls PyCounter/add for each of `keys` at once, then returns the results."""
    calls = [ctx.object_call(add, key=key, arg={}) for key in payload["keys"]]
    await restate.gather(*calls)
    return [await c for c in calls]


app = restate.app(services=[echo, counter, ephemeral, caller])
