"""The coordinator's OpenAI-compatible HTTP front door (``omni-coordinator --http-listen``).

``openai_api``: OpenAI's JSON to and from ``GenerateRequest``/``GenerateResponse``, and the
error mapping; ``app``: the ASGI app (routes, auth, SSE); ``server``: uvicorn, embedded in the
coordinator's own event loop. Requests take the same path as gRPC ``Generate``
(``CoordinatorService.stream``), so limits, validation, failover and resume are the same.
"""
