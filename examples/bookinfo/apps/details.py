"""Bookinfo details: the facts about a book.

    GET /details/<id>  →  {"id", "version", "author", "year", "type", "pages",
                           "publisher", "language", "ISBN-10", "ISBN-13"}

A leaf: it calls nobody. v1 answers the product page; v2, a rewrite, only sees the
copies the mesh mirrors to it (policies/lib/routing.star), so its answers are dropped.
The two give the same facts; `version` says which one answered.

    python3 apps/details.py --service details --version v1 --listen 127.0.0.1:0
"""

from __future__ import annotations

from aiohttp import web

from common import AppArgs, parse_args, run

__all__ = ["BOOK", "make_app"]

BOOK: dict[str, object] = {
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
    "ISBN-13": "123-1234567890",
}


def make_app(args: AppArgs) -> web.Application:
    """The details app for one version."""

    async def details(request: web.Request) -> web.Response:
        book = int(request.match_info["id"])
        return web.json_response({"id": book, "version": args.version, **BOOK})

    app = web.Application()
    app.router.add_get(r"/details/{id:\d+}", details)
    return app


if __name__ == "__main__":
    arguments = parse_args(__doc__ or "", service="details", versions=["v1", "v2"])
    run(make_app(arguments), arguments)
