"""JSON API of shared values: ``/api/shared/<key>``, and a shared set updated atomically."""

from __future__ import annotations

from flask import Blueprint, jsonify
from werkzeug.exceptions import BadRequest

from common import shared

from .auth import admin_required
from .body import json_object
from .limits import never_limited

bp = Blueprint("shared", __name__, url_prefix="/api/shared")

MEMBER_MAX = 200


def value_response(key: str, value):
    response = jsonify(key=key, value=value)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/<key>")
@never_limited
def read(key: str):
    return value_response(key, shared.get_value(key))


def add_member(members, member: str) -> list[str]:
    """A shared set kept as a sorted list of strings."""
    if not isinstance(members, list):
        raise BadRequest("this shared value is not a set of members")
    return sorted(set(members) | {member})


@bp.post("/<key>/add")
def add(key: str):
    member = json_object({"member"}).get("member")
    if not isinstance(member, str) or not 1 <= len(member) <= MEMBER_MAX:
        raise BadRequest(f'send {{"member": "<string of 1 to {MEMBER_MAX} characters>"}}')
    return value_response(key, shared.update(key, lambda members: add_member(members, member), []))


@bp.put("/<key>")
@admin_required
def replace(key: str):
    body = json_object({"value"})
    if "value" not in body:
        raise BadRequest('send {"value": <any JSON>}')
    return value_response(key, shared.set_value(key, body["value"]))


@bp.delete("/<key>")
@admin_required
def delete(key: str):
    shared.delete_value(key)
    return value_response(key, None)
