"""Request bodies of the OpenAI-compatible API, checked into plain values (pure code).

Every problem becomes an ``ApiError`` carrying the status and the body OpenAI's own API
would send, so clients (the ``openai`` package, Open WebUI, curl) show a useful message.
Parameters Groove cannot honour are refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionParams:
    model: str
    chat: bool
    messages: list[dict] = field(default_factory=list)  # chat
    prompt: str | list[int] = ""  # completions: text, or token ids
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    speculative: str | None = None  # None: the relay's --speculative default


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"'{name}' must be a number between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(f"'{name}' must be an integer {bound}, got {value!r}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _text_content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{where}: only text content parts are supported, got {kind!r}", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where}: 'content' must be a string or a list of text parts", "messages")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}]: role {m['role']!r} is not supported (system, developer, user, assistant)", "messages")
        out.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")})
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise _bad("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise _bad("only one prompt per request is supported", "prompt")
    raise _bad("'prompt' must be a non-empty string or a list of token ids", "prompt")


def _stop(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
        raise _bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return value


UNSUPPORTED = {  # parameter: the value that means "not used"
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}


def parse(body, chat: bool) -> CompletionParams:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: one of the ids GET /v1/models lists", "model")
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise _bad(f"'{name}' is not supported by Groove", name)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise _bad(f"'n' must be 1: Groove generates one choice per request, got {n}", "n")
    params = CompletionParams(model=model, chat=chat)
    if chat:
        params.messages = _messages(body.get("messages"))
    else:
        params.prompt = _prompt(body.get("prompt"))
    limit = _int(body, "max_completion_tokens", 1) if chat else None
    params.max_tokens = limit if limit is not None else _int(body, "max_tokens", 1)
    params.temperature = _number(body, "temperature", 1.0, 0, 2)
    params.top_p = _number(body, "top_p", 1.0, 0, 1)
    if params.top_p == 0:
        raise _bad("'top_p' must be above 0", "top_p")
    params.top_k = _int(body, "top_k", 0) or 0  # an extension vLLM and llama.cpp accept too
    params.seed = _int(body, "seed", -(1 << 63), (1 << 63) - 1)
    params.stop = _stop(body.get("stop"))
    params.stream = _flag(body, "stream")
    params.ignore_eos = _flag(body, "ignore_eos")
    speculative = body.get("speculative")  # an extension: "ngram" or "none" (default: the relay's choice)
    if speculative is not None:
        if speculative not in ("ngram", "none"):
            raise _bad(f"'speculative' must be \"ngram\" or \"none\", got {speculative!r}", "speculative")
        params.speculative = "" if speculative == "none" else speculative
    options = body.get("stream_options")
    if options is not None:
        if not params.stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        params.include_usage = _flag(options, "include_usage")
    return params
