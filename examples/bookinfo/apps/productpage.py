"""Bookinfo productpage: the page people load, put together from details and reviews.

    GET /                      → redirect to /productpage
    GET /productpage           → HTML: the book, its details, its reviews (with stars when
                                 reviews v2/v3 answered), and who served each part:
                                 "reviews v2 · details v1 · ratings v1"
    GET /api/v1/products       → [{"id", "title", "description"}]
    GET /api/v1/products/<id>  → {"id", "title", "description", "details", "reviews",
                                  "served_by", "errors", "user"}
    GET /login?user=NAME       → sets the cookie user=NAME, back to /productpage
    GET /logout                → clears it

One page view calls details and reviews at the same time, through the sidecar:

    productpage ──┬─► details /details/<id>
                  └─► reviews /reviews/<id> ──► ratings (v2, v3)

and sends `end-user: NAME` with both (from an incoming `end-user` header, else the
login cookie): that header is what the mesh's rules read (jason is pinned to
reviews v2, chaos-tester's calls to ratings fail). A call that fails (403 denied,
503, timeout, the sidecar unreachable) leaves its part empty and says why in
"errors" and on the page; the page itself still answers 200.

    python3 apps/productpage.py --service productpage --version v1 --listen 127.0.0.1:0 --outbound 127.0.0.1:15001
"""

from __future__ import annotations

import asyncio
import html
import re

from aiohttp import web

from common import AppArgs, Downstream, Reply, parse_args, run

__all__ = ["CALL_TIMEOUT", "PRODUCTS", "make_app", "render_page"]

PRODUCTS: dict[int, dict[str, object]] = {
    0: {
        "id": 0,
        "title": "The Comedy of Errors",
        "description": "One of William Shakespeare's early plays: a farce of mistaken identity, "
        "with two sets of identical twins accidentally separated at birth.",
    },
}
CALL_TIMEOUT = 3.0
"""Seconds to wait for details or reviews: below the 5 s the mesh gives a page view
(lib/resilience.star), so the page can say what was slow before the mesh gives up."""
USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def make_app(args: AppArgs) -> web.Application:
    """The productpage app; `args.outbound` is the sidecar it calls details and reviews through."""
    assert args.outbound is not None, "parse_args requires --outbound for productpage"
    downstream = Downstream(args.outbound, CALL_TIMEOUT)

    async def product(request: web.Request, book: int) -> dict[str, object]:
        user = request.headers.get("end-user") or request.cookies.get("user")
        details, reviews = await asyncio.gather(
            downstream.get_json("details", f"/details/{book}", request, end_user=user),
            downstream.get_json("reviews", f"/reviews/{book}", request, end_user=user),
        )
        return {
            **PRODUCTS[book],
            "details": details.data,
            "reviews": reviews.data,
            "served_by": {
                "productpage": args.version,
                "details": _field(details, "version"),
                "reviews": _field(reviews, "version"),
                "ratings": _field(reviews, "ratings_version"),
            },
            "errors": {"details": details.error, "reviews": reviews.error},
            "user": user,
        }

    async def products(request: web.Request) -> web.Response:
        return web.json_response(list(PRODUCTS.values()))

    async def one_product(request: web.Request) -> web.Response:
        book = int(request.match_info["id"])
        if book not in PRODUCTS:
            raise web.HTTPNotFound(text=f"no product {book}: GET /api/v1/products lists them\n")
        return web.json_response(await product(request, book))

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=render_page(await product(request, 0)), content_type="text/html")

    async def login(request: web.Request) -> web.Response:
        user = request.query.get("user", "")
        if not USER_NAME.fullmatch(user):
            raise web.HTTPBadRequest(text="log in with /login?user=NAME (letters, digits, '.', '_' or '-')\n")
        response = web.HTTPFound("/productpage")
        response.set_cookie("user", user, httponly=True, samesite="Lax")
        raise response

    async def logout(request: web.Request) -> web.Response:
        response = web.HTTPFound("/productpage")
        response.del_cookie("user")
        raise response

    async def home(request: web.Request) -> web.Response:
        raise web.HTTPFound("/productpage")

    app = web.Application()
    app.cleanup_ctx.append(downstream.session)
    app.router.add_get("/", home)
    app.router.add_get("/productpage", page)
    app.router.add_get("/api/v1/products", products)
    app.router.add_get(r"/api/v1/products/{id:\d+}", one_product)
    app.router.add_get("/login", login)
    app.router.add_get("/logout", logout)
    return app


def _field(reply: Reply, name: str) -> object:
    return reply.data.get(name) if reply.data is not None else None


# --------------------------------------------------------------------------- the page


def render_page(product: dict[str, object]) -> str:
    """The product page's HTML, from what `GET /api/v1/products/<id>` answers."""
    e = html.escape
    served = product["served_by"]
    errors = product["errors"]
    assert isinstance(served, dict) and isinstance(errors, dict)
    user = product.get("user")
    account = (
        f'Signed in as <b>{e(str(user))}</b> · <a href="/logout">sign out</a>'
        if user
        else '<form action="/login">Sign in as <input name="user" placeholder="jason"> <button>Sign in</button></form>'
    )
    served_line = " · ".join(f"{name} {served.get(name) or '—'}" for name in ("reviews", "details", "ratings"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bookinfo: {e(str(product["title"]))}</title></head>
<body style="font-family: sans-serif; max-width: 46em; margin: 2em auto">
<div style="float: right">{account}</div>
<h1>{e(str(product["title"]))}</h1>
<p>{e(str(product["description"]))}</p>
<h2>Details</h2>
{_details_html(product["details"], errors.get("details"))}
<h2>Reviews</h2>
{_reviews_html(product["reviews"], errors.get("reviews"))}
<hr><p class="served-by"><small>{e(served_line)}</small></p>
</body></html>
"""


def _error_html(what: str, error: object) -> str:
    return f'<p class="error" style="color: #a00">{html.escape(what)} unavailable: {html.escape(str(error))}</p>'


def _details_html(details: object, error: object) -> str:
    if not isinstance(details, dict):
        return _error_html("Details are", error)
    rows = "".join(
        f"<tr><th align=left>{html.escape(key)}</th><td>{html.escape(str(details.get(key)))}</td></tr>"
        for key in ("author", "year", "type", "pages", "publisher", "language", "ISBN-10", "ISBN-13")
    )
    return f"<table>{rows}</table>"


def _reviews_html(reviews: object, error: object) -> str:
    if not isinstance(reviews, dict):
        return _error_html("Reviews are", error)
    items = reviews.get("reviews")
    parts = [_review_html(item) for item in (items if isinstance(items, list) else []) if isinstance(item, dict)]
    if reviews.get("ratings_error"):
        parts.append(_error_html("Ratings are", reviews["ratings_error"]))
    return "\n".join(parts)


def _review_html(review: dict[str, object]) -> str:
    text, reviewer, rating = review.get("text"), review.get("reviewer"), review.get("rating")
    stars = ""
    if isinstance(rating, dict) and isinstance(rating.get("stars"), int):
        count = max(0, min(5, rating["stars"]))
        color = html.escape(str(rating.get("color")))
        stars = f'<br><span class="stars" style="color: {color}">{"★" * count}{"☆" * (5 - count)}</span>'
    signed = f"<small>— {html.escape(str(reviewer))}</small>"
    return f"<blockquote>{html.escape(str(text))}<br>{signed}{stars}</blockquote>"


if __name__ == "__main__":
    arguments = parse_args(__doc__ or "", service="productpage", versions=["v1"], needs_outbound=["v1"])
    run(make_app(arguments), arguments)
