"""``--chat-template FILE`` replaces the model's template, and a request's ``chat_template_kwargs`` reach the
render (Qwen3's ``enable_thinking`` switch, here in a custom template), through a real server and the
official openai client. The prompt a chat request ran on is checked exactly: its token count, /tokenize of
the same messages, and greedy output equal to a completion on the expected text's tokens."""
from __future__ import annotations

import httpx
import openai
import pytest


TEMPLATE = """\
{%- for m in messages -%}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{%- endif -%}"""
MESSAGES = [{"role": "user", "content": "Name a colour."}]
PLAIN = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
NO_THINKING = PLAIN + "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def templated(tmp_path_factory, launch_server):
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    srv = launch_server("--chat-template", str(path), timeout=600)  # start-up took 200-250 s on a loaded 2-core host
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(templated):
    return openai.OpenAI(base_url=templated.v1, api_key="unused")


def _ids(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    return r.json()["tokens"]


@pytest.mark.parametrize("kwargs, expected", [(None, PLAIN), ({"enable_thinking": False}, NO_THINKING),
                                              ({"enable_thinking": True}, PLAIN)])
def test_chat_renders_the_file_with_the_request_kwargs(templated, client, kwargs, expected):
    ids = _ids(templated, expected)
    body = {"messages": MESSAGES, **({"chat_template_kwargs": kwargs} if kwargs else {})}
    assert httpx.post(templated.url + "/tokenize", json=body).json()["tokens"] == ids
    extra = {"chat_template_kwargs": kwargs} if kwargs else None
    chat = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES,
                                          temperature=0, max_tokens=4, extra_body=extra)
    assert chat.usage.prompt_tokens == len(ids)
    if kwargs == {"enable_thinking": False}:  # the generation itself ran on exactly that prompt
        completion = client.completions.create(model=chat.model, prompt=ids, temperature=0, max_tokens=4)
        assert chat.choices[0].message.content == completion.choices[0].text


def test_reserved_kwargs_are_rejected(client):
    with pytest.raises(openai.BadRequestError, match="'add_generation_prompt' is set by the server"):
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_offline_llm_takes_the_template(tmp_path):
    """LLM(chat_template=...) reaches the tokenizer (a tiny random model, its shape only, for speed); a file
    that does not parse is refused at load, naming its line."""
    import json

    from sift.models.embedded import embedded_model_path
    from sift.models.registry import ModelLoadError
    from sift.models.tokenizer import read_chat_template
    from sift.server.engine.llm import LLM

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}))
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer=embedded_model_path(), chat_template=str(path),
              num_blocks=8)
    assert llm.tokenizer.apply_chat_template(MESSAGES, template_kwargs={"enable_thinking": False}) == NO_THINKING
    path.write_text("{% for m in messages %}{{ m.content }}")  # unclosed for
    with pytest.raises(ModelLoadError, match="chat.jinja, line 1"):
        read_chat_template(str(path))
