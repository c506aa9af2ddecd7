"""Bookinfo ratings: how many stars each reviewer gave a book.

    GET /ratings/<id>  →  {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}, "version": "v1"}

A leaf: it calls nobody. Only reviews may read it (policies/lib/access.star), and the
mesh injects faults in front of it for the test users (policies/lib/routing.star).

    python3 apps/ratings.py --service ratings --version v1 --listen 127.0.0.1:0
"""

from __future__ import annotations

from aiohttp import web

from common import AppArgs, parse_args, run

__all__ = ["RATINGS", "make_app"]

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}
"""Every book gets the same stars: this is a demo, not a bookshop."""


def make_app(args: AppArgs) -> web.Application:
    """The ratings app for one version."""

    async def ratings(request: web.Request) -> web.Response:
        book = int(request.match_info["id"])
        return web.json_response({"id": book, "ratings": RATINGS, "version": args.version})

    app = web.Application()
    app.router.add_get(r"/ratings/{id:\d+}", ratings)
    return app


if __name__ == "__main__":
    arguments = parse_args(__doc__ or "", service="ratings", versions=["v1"])
    run(make_app(arguments), arguments)
