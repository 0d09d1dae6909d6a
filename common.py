"""Extension instances, created without an app: importing this module never talks to a server."""

from flask_caching import Cache

from tally import Counters, SharedValues

#: Flask-Caching, for page caching and any cached value that may expire.
cache = Cache()
#: Shared counters on the store ``cache`` is set up with: atomic on every backend (Flask-Caching's
#: own ``inc`` is not).
counters = Counters(cache)
#: Shared JSON values with an atomic ``update``, on the same store.
shared = SharedValues(cache)
