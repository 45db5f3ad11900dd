"""The anchor-task team's HTTP service, for running the example on one machine.

    python receiver.py [PORT]        # default 8091, as in shunter.yaml

Answers 200 to each POST on /hooks/guard and prints the guard purchase it was given: the
body is the decoded value as JSON; the message's coordinates come as Shunter-* headers.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def guard(request: web.Request) -> web.Response:
    value = await request.json()
    where = f"{request.headers.get('Shunter-Topic')}@{request.headers.get('Shunter-Offset')}"
    print(f"anchor-task: {value['anchor_id']} +{value['price']} coins ({where})", flush=True)
    return web.json_response({"ok": True})


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/hooks/guard", guard)
    return application


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8091)
