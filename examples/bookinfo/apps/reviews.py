"""Bookinfo reviews: what readers wrote, with their stars from the ratings service.

    GET /reviews/<id>  →  {"id", "version", "ratings_version",
                           "reviews": [{"reviewer", "text", "rating": {"stars", "color"}}],
                           "ratings_error": null | "503 fault"}

The three versions are what the mesh routes between (policies/lib/routing.star):

    v1  never calls ratings: reviews without stars
    v2  calls ratings: black stars          (jason is pinned here)
    v3  calls ratings: red stars            (the 20% canary)

When ratings fails (the chaos tester's requests get a 503 from the mesh, or ratings is
down or slow) reviews still answers 200: the reviews without stars, `ratings_error`
saying what went wrong. `ratings_version` is the ratings version that answered (null
when none did), so the product page can show who served the page.

    python3 apps/reviews.py --service reviews --version v2 --listen 127.0.0.1:0 --outbound 127.0.0.1:15001
"""

from __future__ import annotations

from aiohttp import web

from common import AppArgs, Downstream, parse_args, run

__all__ = ["REVIEWS", "STAR_COLORS", "RATINGS_TIMEOUT", "make_app"]

REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
)
STAR_COLORS = {"v2": "black", "v3": "red"}
"""The versions that show stars, and in which color; v1 shows none."""
RATINGS_TIMEOUT = 2.0
"""Seconds to wait for ratings: below the 2.5 s the mesh gives reviews (lib/resilience.star)."""


def make_app(args: AppArgs) -> web.Application:
    """The reviews app for one version."""
    color = STAR_COLORS.get(args.version)
    ratings = None if color is None or args.outbound is None else Downstream(args.outbound, RATINGS_TIMEOUT)

    async def reviews(request: web.Request) -> web.Response:
        book = int(request.match_info["id"])
        items: list[dict[str, object]] = [{"reviewer": who, "text": text} for who, text in REVIEWS]
        ratings_version: object = None
        ratings_error: str | None = None
        if ratings is not None:
            reply = await ratings.get_json("ratings", f"/ratings/{book}", request)
            stars = reply.data.get("ratings") if reply.data is not None else None
            if reply.data is not None and isinstance(stars, dict):
                ratings_version = reply.data.get("version")
                for item in items:
                    given = stars.get(item["reviewer"])
                    if isinstance(given, int):
                        item["rating"] = {"stars": given, "color": color}
            else:
                ratings_error = reply.error or "200 ratings answered without a ratings object"
        return web.json_response(
            {
                "id": book,
                "version": args.version,
                "reviews": items,
                "ratings_version": ratings_version,
                "ratings_error": ratings_error,
            }
        )

    app = web.Application()
    if ratings is not None:
        app.cleanup_ctx.append(ratings.session)
    app.router.add_get(r"/reviews/{id:\d+}", reviews)
    return app


if __name__ == "__main__":
    arguments = parse_args(__doc__ or "", service="reviews", versions=["v1", "v2", "v3"], needs_outbound=["v2", "v3"])
    run(make_app(arguments), arguments)
