"""Schemathesis hooks for tools/e2e/schemathesis_test.sh.

Every generated chat completion runs the real engine to its end, so a positive
`max_tokens` (or `max_completion_tokens`) above a few tokens is lowered: a schema-valid
32,000-token answer from the tiny model would only make the run slow, not find more.
Values the server must refuse (0, negative, not an integer) are left as generated.
"""

import schemathesis

MAX_NEW_TOKENS = 8


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
                body[key] = MAX_NEW_TOKENS
    return body
