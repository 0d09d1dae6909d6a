"""Which requests the rate limits (RATELIMIT_DEFAULT) apply to: every route that changes something.

Reads (a counter's value, a shared value, health, static files) are never limited, so monitoring and
pages keep working for a client that hit its write limit.
"""

from flask import request

from common import limiter

READ_ONLY_ENDPOINTS = frozenset(
    {"static", "api.read", "clients.me_read", "shared.read", "health.healthz", "health.livez"}
)


@limiter.request_filter
def reads_are_not_limited() -> bool:
    return request.endpoint in READ_ONLY_ENDPOINTS
