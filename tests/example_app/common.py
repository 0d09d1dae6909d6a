"""Extensions, created without an app, as in the seed's caching answer; Tally follows the cache."""

from flask_caching import Cache

from tally import Counters

cache = Cache()
counters = Counters(cache)
