"""The API bodies of the benchmark's fake upstream (see mock_upstream.py): routes, tokens, usage."""

import json
import time

try:
    import orjson

    def dumps(obj):
        return orjson.dumps(obj)

    loads = orjson.loads
except ImportError:  # pragma: no cover - stdlib fallback
    orjson = None

    def dumps(obj):
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads

# The completion text, one token per SSE content chunk.
PIECES = ["The", " gateway", " forwards", " this", " request", " to", " the", " upstream", " and", " back."]
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 413: b"Payload Too Large"}
MAX_BODY = 16 * 1024 * 1024
MODELS = ["bench-model", "bench-embed", "gpt-4o-mini", "text-embedding-3-small"]


class Config:
    delay = 0.0
    chunk_delay = 0.0
    embed_dim = 64


class Counter:
    n = 0


def next_id():
    Counter.n += 1
    return Counter.n


# ---------------------------------------------------------------- token estimates


def count_tokens(value):
    """A rough tokenizer: about 4 characters a token, like English text."""
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, (len(value) + 3) // 4)
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        # content parts like {"type": "text", "text": "..."}
        return count_tokens(value.get("text") or value.get("content"))
    return 1


def prompt_tokens_of_messages(messages):
    if not isinstance(messages, list):
        return 1
    return sum(4 + count_tokens(m.get("content") if isinstance(m, dict) else m) for m in messages) + 3


def completion_pieces(req):
    limit = req.get("max_completion_tokens") or req.get("max_tokens") or req.get("max_output_tokens")
    if isinstance(limit, int) and 0 < limit < len(PIECES):
        return PIECES[:limit], "length"
    return PIECES, "stop"


# ---------------------------------------------------------------- handlers
# Each returns (status, content_type, body_bytes) or ("sse", [event bytes, ...]).


def error(status, message, typ="invalid_request_error"):
    return status, b"application/json", dumps({"error": {"message": message, "type": typ, "code": None}})


def chat_completions(req):
    model = req.get("model") or "bench-model"
    pieces, finish = completion_pieces(req)
    prompt = prompt_tokens_of_messages(req.get("messages"))
    completion = len(pieces)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    cid = f"chatcmpl-mock{next_id()}"
    created = int(time.time())
    if not req.get("stream"):
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return 200, b"application/json", dumps(body)

    def chunk(delta, finish_reason=None, with_choice=True, usage_block=None):
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if with_choice
            else [],
        }
        if usage_block is not None:
            obj["usage"] = usage_block
        return b"data: " + dumps(obj) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events.extend(chunk({"content": p}) for p in pieces)
    events.append(chunk({}, finish_reason=finish))
    opts = req.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        events.append(chunk(None, with_choice=False, usage_block=usage))
    events.append(b"data: [DONE]\n\n")
    return "sse", events


def embeddings(req):
    inp = req.get("input")
    items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
    dim = Config.embed_dim
    data = []
    for i, _ in enumerate(items):
        vec = [round(((i + 1) * (j + 3) % 97) / 97.0 - 0.5, 6) for j in range(dim)]
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = count_tokens(
        items if not isinstance(inp, list) or not inp or not isinstance(inp[0], int) else "x" * 4 * len(inp)
    )
    body = {
        "object": "list",
        "data": data,
        "model": req.get("model") or "bench-embed",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return 200, b"application/json", dumps(body)


def responses(req):
    model = req.get("model") or "bench-model"
    pieces, finish = completion_pieces(req)
    inp = req.get("input")
    in_tokens = count_tokens(inp) if isinstance(inp, str) else prompt_tokens_of_messages(inp)
    in_tokens += count_tokens(req.get("instructions"))
    out_tokens = len(pieces)
    rid = f"resp_mock{next_id()}"
    text = "".join(pieces)
    message = {
        "type": "message",
        "id": f"msg_mock{Counter.n}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    body = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if finish == "stop" else "incomplete",
        "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
        "error": None,
        "model": model,
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": in_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tokens + out_tokens,
        },
    }
    if not req.get("stream"):
        return 200, b"application/json", dumps(body)
    # Minimal Responses API event stream.
    events = []
    seq = 0

    def ev(name, obj):
        nonlocal seq
        obj["type"] = name
        obj["sequence_number"] = seq
        seq += 1
        events.append(b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n")

    pending = dict(body, status="in_progress", output=[], usage=None)
    ev("response.created", {"response": pending})
    for p in pieces:
        ev("response.output_text.delta", {"item_id": message["id"], "output_index": 0, "content_index": 0, "delta": p})
    ev("response.output_text.done", {"item_id": message["id"], "output_index": 0, "content_index": 0, "text": text})
    ev("response.completed", {"response": body})
    return "sse", events


def models(_req):
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in MODELS]
    return 200, b"application/json", dumps({"object": "list", "data": data})


POST_ROUTES = {
    b"/v1/chat/completions": chat_completions,
    b"/v1/embeddings": embeddings,
    b"/v1/responses": responses,
}
GET_ROUTES = {b"/v1/models": models}


def dispatch(method, path, body):
    path = path.split(b"?", 1)[0]
    if method == b"GET":
        if path in GET_ROUTES:
            return GET_ROUTES[path](None)
        if path == b"/health":
            return 200, b"text/plain", b"ok"
        if path in POST_ROUTES:
            return error(405, "use POST")
        return error(404, "no route for GET {}".format(path.decode("latin-1")))
    if method == b"POST":
        handler = POST_ROUTES.get(path)
        if handler is None:
            return error(404, "no route for POST {}".format(path.decode("latin-1")))
        try:
            req = loads(body) if body else {}
        except ValueError:
            return error(400, "request body is not valid JSON")
        if not isinstance(req, dict):
            return error(400, "request body must be a JSON object")
        return handler(req)
    return error(405, "method not allowed")
