"""Turning a request body into engine inputs: prompt token ids (chat templates rendered, texts that can never
fit rejected before tokenizing), sampling parameters (their ValueErrors as 400s naming the field) and the
admission checks the engine would otherwise fail later. Routes call these off the event loop where they are
CPU work."""
from __future__ import annotations

from sift.server.api.errors import APIError
from sift.server.engine.async_engine import AsyncEngine


def check_admissible(engine: AsyncEngine, prompts: list, params) -> None:
    """400s the engine would give, decided here: a prompt over the context is rejected before it is
    shipped to the core thread, and a fan-out (n x prompts) that exceeds the whole waiting queue could
    never be admitted, so it is not a retryable 429."""
    queue_limit = engine.config.scheduler.max_queued_requests
    if len(prompts) * params.n > queue_limit:
        raise APIError(400, f"n: {params.n} choice(s) x {len(prompts)} prompt(s) exceed the server's queue "
                       f"of {queue_limit} requests; this request can never be admitted", param="n",
                       code="invalid_value")
    for prompt in prompts:
        try:
            params.validate_for_model(engine.vocab_size, len(prompt), engine.max_model_len)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None


def render_chat(tok, messages: list[dict], template_kwargs: dict | None, tools: list | None = None) -> str:
    """The chat prompt text; a missing template, a reserved kwarg or a template's own error is a 400."""
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, template_kwargs=template_kwargs,
                                       tools=tools)
    except (ValueError, TemplateError) as e:
        param = "chat_template_kwargs" if str(e).startswith("chat_template_kwargs") else "messages"
        raise APIError(400, f"cannot apply the chat template: {e}", param=param) from None


def sampling_params(body, default_max_tokens: int):
    return checked(body, body.to_sampling_params, default_max_tokens)


def checked(body, fn, *args):
    """``fn(*args)``, its ValueError as a 400 naming the field the message starts with."""
    try:
        return fn(*args)
    except ValueError as e:
        # SamplingParams' messages start with the field they reject ("temperature must be >= 0")
        words = str(e).split()
        field = words[0].rstrip(":") if words else ""
        param = field if field.split(".")[0] in type(body).model_fields else None
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def max_piece_chars(tokenizer) -> int:
    """Most characters one token can cover (its vocabulary string; special tokens included), or 0 if unknown.
    A text of c characters then has at least c / this many tokens."""
    cached = getattr(tokenizer, "_sift_max_piece_chars", None)
    if cached is None:
        try:
            cached = max(map(len, getattr(tokenizer, "hf", tokenizer).get_vocab()))
        except (AttributeError, TypeError, ValueError):
            cached = 0
        try:
            tokenizer._sift_max_piece_chars = cached
        except AttributeError:
            pass
    return cached


def reject_if_surely_too_long(engine: AsyncEngine, num_chars: int, param: str) -> None:
    """A text that cannot fit the context whatever its tokenization is rejected without tokenizing it (a
    multi-megabyte prompt would otherwise cost seconds of tokenizer time before the same 400)."""
    piece = max_piece_chars(engine.tokenizer)
    # x4: slack for normalizers that compose characters (NFC/NFKC) before the vocabulary sees them
    if piece and num_chars > 4 * engine.max_model_len * piece:
        raise APIError(400, f"{param}: {num_chars} characters exceed the model's context length "
                       f"({engine.max_model_len} tokens) whatever their tokenization", param=param,
                       code="invalid_value")


def encode_chat(tokenizer, messages: list, template_kwargs: dict | None = None, tools: list | None = None) -> list:
    return tokenizer.encode(render_chat(tokenizer, messages, template_kwargs, tools), add_special_tokens=False)


def encode_prompts(tokenizer, raw: list) -> list:
    return [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in raw]
