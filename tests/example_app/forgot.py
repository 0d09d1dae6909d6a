"""The usual mistake: ``Counters()`` created, its ``init_app`` never called."""

from flask import Flask, jsonify

from tally import Counters

counters = Counters()
app = Flask(__name__)


@app.post("/hits")
def hit():
    return jsonify(value=counters.incr("hits"))
