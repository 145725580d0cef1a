"""The proxy's own error answers, in the OpenAI error shape vLLM uses.

``error_response(status, message)`` → JSON ``{"error": {"message", "type", "param",
"code"}}`` with ``code`` the HTTP status. Only errors the proxy itself decides go out
this way (malformed marks, 413, 503, 502/504); the upstream's errors are relayed as
they came.
"""
from __future__ import annotations

import json

from aiohttp import web

_TYPES = {400: "BadRequestError", 413: "PayloadTooLargeError", 502: "BadGatewayError",
          503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": None, "code": status}}


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(error_body(status, message)),
                        content_type="application/json", headers=headers)
