"""The server's side of OpenAI's API: requests parsed and checked, errors in OpenAI's shape, and
generated ids read as the text a client gets.

Every check raises APIError, which the server answers as {"error": {"message", "type", "param",
"code"}} with `param` naming the field at fault. Completions decode the prompt and continuation
together, as generate.generate does; chat replies are decoded and stripped, as chat.replies does.
Both are cut at the first stop string and before the first blocked term (serve.blocklist). While a
row is still generating, `TextView.safe_end` says how much of its text may already be streamed:
not what could still turn out to be a stop string or a blocked term, an incomplete UTF-8
character or (chat) trailing whitespace.
"""
import dataclasses
import json
import re
import secrets
from typing import Sequence

from fmjax.infer import batching, generate

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
# Parameters of OpenAI's API that fmjax does not implement, with the values that ask for nothing.
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
                "logit_bias": (None, {}), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
                "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"})}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


class Blocklist:
    """Terms matched as whole words, case-insensitively; a phrase's words may be separated by any
    non-word characters (as in data preparation's blocklist)."""

    def __init__(self, terms: Sequence[str]):
        words = [w for w in (re.findall(r"\w+", t) for t in terms) if w]
        self.longest = max((len(w) for w in words), default=0)
        alternation = "|".join(r"\W+".join(map(re.escape, w)) for w in sorted(words, key=len, reverse=True))
        self._re = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE) if words else None

    def find(self, text: str, final: bool = True) -> int | None:
        """Where the first match starts; in an unfinished text, only a match that more text cannot
        turn into a longer word."""
        for m in self._re.finditer(text) if self._re else ():
            if final or m.end() < len(text):
                return m.start()
        return None

    def hold_from(self, text: str) -> int:
        """Where a match that more text could complete would start: the longest term's number of words back."""
        if self._re is None:
            return len(text)
        starts = [m.start() for m in re.finditer(r"\w+", text)][-self.longest:]
        return starts[0] if starts else len(text)


_UNFINISHED = re.compile(r"\ufffd+$")  # bytes of a UTF-8 character whose rest is still to come
_UNFINISHED_REPLY = re.compile(r"[\s\ufffd]+$")  # a reply is stripped at the end: trailing space may go


@dataclasses.dataclass(frozen=True)
class TextView:
    """How a row's new ids read: a completion's continuation of prompt_ids, or with prompt_ids None
    a chat reply."""
    tokenizer: object
    stop: tuple[str, ...]
    blocklist: Blocklist
    prompt_ids: tuple[int, ...] | None = None
    prompt_text: str = ""  # decode(prompt_ids)

    def read(self, ids: Sequence[int], final: bool) -> tuple[str, str | None]:
        """(the text so far, "stop" or "content_filter" when a stop string or a blocked term ends it)."""
        if self.prompt_ids is None:
            text = self.tokenizer.decode(ids)
        else:
            text, start = generate.decode_continuation(self.tokenizer, self.prompt_ids, ids, (), self.prompt_text)
            text = text[start:]
        reason = None
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        blocked = self.blocklist.find(text, final or reason is not None)
        if blocked is not None:
            text, reason = text[:blocked], "content_filter"
        if self.prompt_ids is None:
            text = text.strip() if final or reason else text.lstrip()
        return text, reason

    def safe_end(self, text: str) -> int:
        """How much of an unfinished text can be streamed already."""
        end = (_UNFINISHED_REPLY if self.prompt_ids is None else _UNFINISHED).search(text)
        end = end.start() if end else len(text)
        for s in self.stop:
            k = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
            end = min(end, len(text) - k)
        return min(end, self.blocklist.hold_from(text))


def get(body: dict, name: str, types, default=...):
    """body[name] (default when absent or null; required without one), of one of `types` (a bool is not a number)."""
    value = body.get(name)
    if value is None:
        if default is ...:
            raise APIError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise APIError(400, f"Invalid type for '{name}': expected {' or '.join(_TYPE_NAMES[t] for t in types)}, "
                       f"got {json.dumps(value)[:60]}.", param=name, code="invalid_type")
    return value


def in_range(body: dict, name: str, types, default, low, high, low_open: bool = False):
    value = get(body, name, types, default)
    if not (low < value if low_open else low <= value) or value > high:
        raise APIError(400, f"Invalid '{name}': {value} is not in {'(' if low_open else '['}{low}, {high}].",
                       param=name, code="invalid_value")
    return value


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in value)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The generation settings of a request."""
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the model reads
    reads_as: tuple[int, ...]  # what the text of prompt + continuation is decoded from
    text: str  # decode(reads_as)


class Parser:
    """Reads and checks the requests of one served model (serve: the config's serve section)."""

    def __init__(self, serve, tokenizer, *, kind: str, vocab_size: int = 0, template=None, system_prompt: str = "",
                 embed_width: int = 0, embed_max_len: int = 0, task_name: str = ""):
        self.serve, self.tokenizer, self.kind, self.template = serve, tokenizer, kind, template
        self.vocab_size = vocab_size
        self.system_prompt, self.embed_width, self.embed_max_len = system_prompt, embed_width, embed_max_len
        self.task_name, self.blocklist = task_name, Blocklist(serve.blocklist)

    def authorize(self, headers) -> None:
        if not self.serve.api_key:
            return
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.serve.api_key.encode()):
            raise APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(self, body: dict, kind: str) -> None:
        """The request names this server's model, which serves `kind` requests (decoder or encoder)."""
        name = get(body, "model", str)
        if name != self.serve.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{self.serve.model_name}'.",
                           param="model", code="model_not_found")
        if kind != self.kind:
            what = {"decoder": "completions and chat completions", "encoder": "embeddings"}[self.kind]
            raise APIError(400, f"The model '{name}' (a {self.kind}) serves {what} only.", param="model",
                           code="unsupported_endpoint")

    def check_text(self, text: str, param: str) -> None:
        if self.blocklist.find(text) is not None:
            raise APIError(400, f"'{param}' contains a term that the server's content filter blocks.", param=param,
                           code="content_filter")

    def check_length(self, ids: Sequence[int], limit: int, param: str) -> None:
        if len(ids) > limit:
            raise APIError(400, f"'{param}' has {len(ids)} tokens; this server takes at most {limit}.",
                           param=param, code="context_length_exceeded")

    def sampling(self, body: dict, default_max_tokens: int, names=("max_tokens",)) -> Sampling:
        """The settings of a completion or chat request; max_tokens under the first of `names` given."""
        name = next((n for n in names if body.get(n) is not None), names[-1])
        for param, allowed in _UNSUPPORTED.items():
            if body.get(param) not in allowed:
                raise APIError(400, f"'{param}' is not supported by this server.", param=param,
                               code="unsupported_parameter")
        stop = get(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"Invalid 'stop': up to {MAX_STOPS} non-empty strings.", param="stop",
                           code="invalid_value")
        return Sampling(
            max_tokens=in_range(body, name, int, default_max_tokens, 0, self.serve.max_tokens),
            temperature=float(in_range(body, "temperature", (int, float), 1.0, 0, 2)),
            top_p=float(in_range(body, "top_p", (int, float), 1.0, 0, 1, low_open=True)),
            top_k=in_range(body, "top_k", int, 0, 0, self.vocab_size),
            n=in_range(body, "n", int, 1, 1, self.serve.max_batch_size),
            seed=in_range(body, "seed", int, secrets.randbelow(2**31), -2**63, 2**63 - 1) % 2**31,
            stop=tuple(stop), stream=get(body, "stream", bool, False),
            include_usage=get(get(body, "stream_options", dict, {}), "include_usage", bool, False))

    def completion_prompts(self, body: dict) -> list[Prompt]:
        """A string gets [bos] in front (as in generate.generate); token ids run as they are."""
        prompt = get(body, "prompt", (str, list))
        prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
        if not prompts or not all(isinstance(p, str) or _is_ids(p) for p in prompts):
            raise APIError(400, "Invalid 'prompt': a string, an array of strings, or (arrays of) token ids.",
                           param="prompt", code="invalid_type")
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = [self.tokenizer.bos_id] + self.tokenizer.encode(p)
                reads_as = tuple(ids[1:])
            elif all(0 <= i < self.vocab_size for i in p):
                ids, reads_as = p, tuple(p)
            else:
                raise APIError(400, f"Invalid 'prompt': token ids must be in [0, {self.vocab_size}).",
                               param="prompt", code="invalid_value")
            self.check_length(ids, self.serve.max_prompt_tokens, "prompt")
            out.append(Prompt(ids, reads_as, self.tokenizer.decode(reads_as)))
            self.check_text(out[-1].text, "prompt")
        return out

    def chat_prompt(self, body: dict) -> list[int]:
        """The template's prompt for the next assistant turn of body["messages"]."""
        if self.template is None:
            raise APIError(400, f"The model '{self.serve.model_name}' has no chat template: serve a chat-tuned "
                           f"workdir (task.name sft or preference), not task.name={self.task_name!r}; "
                           "/v1/completions takes plain prompts.", param="messages", code="unsupported_endpoint")
        turns = []
        for i, m in enumerate(get(body, "messages", list)):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" and
                                                 isinstance(c.get("text"), str) for c in content):
                content = "".join(c["text"] for c in content)
            role = {"developer": "system"}.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise APIError(400, f"Invalid 'messages[{i}]': expected {{'role': system, developer, user or "
                               "assistant, 'content': text}.", param=f"messages[{i}]", code="invalid_value")
            self.check_text(content, f"messages[{i}].content")
            turns.append({"role": role, "content": content})
        if not turns:
            raise APIError(400, "'messages' must not be empty.", param="messages", code="invalid_value")
        if self.system_prompt and turns[0]["role"] != "system":  # as the model was tuned (fmjax.data.chat)
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        ids = self.template.prompt(self.tokenizer, turns)
        self.check_length(ids, self.serve.max_prompt_tokens, "messages")
        return ids

    def rows(self, prompt_ids: Sequence[int], s: Sampling, extra_stop_ids=(), first: int = 0):
        """The n generation rows of one prompt, seeded seed + first, seed + first + 1, ...; the stop
        strings also stop decoding as token sequences (as in generate.generate)."""
        stop_ids = tuple(extra_stop_ids) + tuple(tuple(t) for t in map(self.tokenizer.encode, s.stop) if t)
        return [batching.GenerationRow(tuple(prompt_ids), s.max_tokens, s.temperature, s.top_k, s.top_p,
                                       (s.seed + first + j) % 2**31, stop_ids) for j in range(s.n)]

    def embedding_inputs(self, body: dict) -> tuple[list[str], list[int], bool]:
        """(texts, tokens each takes, whether to answer in base64)."""
        texts = get(body, "input", (str, list))
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or len(texts) > MAX_EMBED_INPUTS or not all(isinstance(t, str) and t for t in texts):
            raise APIError(400, f"Invalid 'input': a non-empty string or up to {MAX_EMBED_INPUTS} of them "
                           "(token ids are not supported).", param="input", code="invalid_value")
        encoding = get(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise APIError(400, "Invalid 'encoding_format': float or base64.", param="encoding_format",
                           code="invalid_value")
        if get(body, "dimensions", int, self.embed_width) != self.embed_width:
            raise APIError(400, f"Invalid 'dimensions': this model's embeddings have {self.embed_width}.",
                           param="dimensions", code="invalid_value")
        tokens = []
        for i, t in enumerate(texts):
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(t), self.tokenizer.eos_id]  # as embed.tokenize
            self.check_length(ids, self.embed_max_len, f"input[{i}]" if len(texts) > 1 else "input")
            self.check_text(t, "input")
            tokens.append(len(ids))
        return texts, tokens, encoding == "base64"
