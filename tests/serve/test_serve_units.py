"""The server's and the client's pure parts: request parsing into SamplingConfig, the stream's
hold-back buffer, URLs, and prompt-length estimates."""
from __future__ import annotations

import pytest

from core.errors import LabError
from core.serve.client import estimate_tokens, keep_tail, shown_url, split_url
from core.serve.config import COMPLETIONS_MAX_TOKENS, EndpointConfig
from core.serve.protocol import parse_chat, parse_completion
from core.serve.responses import DeltaBuffer


def test_openai_fields_map_onto_the_sampling_config():
    req = parse_completion({"prompt": "hi", "temperature": 0, "top_k": -1, "stop": "\n", "seed": 3, "n": 2,
                            "logprobs": 0, "user": "ignored", "presence_penalty": 0, "logit_bias": {}})
    s = req.sampling
    assert s.greedy and s.top_k == 0 and s.stop == ["\n"] and s.seed == 3 and req.n == 2 and req.logprobs == 0
    assert req.max_tokens == COMPLETIONS_MAX_TOKENS and req.prompts == ["hi"]
    assert req.choice_config(1, 5).seed == 4 and req.choice_config(1, 5).max_new_tokens == 5
    chat, messages = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}],
                                 "logprobs": True, "top_logprobs": 4, "max_completion_tokens": 7})
    assert messages == [{"role": "user", "content": "ab"}] and chat.logprobs == 4 and chat.max_tokens == 7
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]})[0].max_tokens is None  # rest of the context


@pytest.mark.parametrize("body", [{"prompt": "x", "temperature": True}, {"prompt": "x", "n": 1.5},
                                  {"prompt": "x", "best_of": 3}, {"prompt": "x", "echo": "yes"},
                                  {"prompt": "x", "response_format": {"type": "json_object"}}])
def test_wrong_types_are_sentences(body):
    with pytest.raises(LabError) as e:
        parse_completion(body)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_the_stream_never_takes_text_back():
    buf = DeltaBuffer(["END"])           # the last 2 characters could still begin "END"
    sent = [buf.update(t) for t in ("Hel", "Hello wor", "Hello world!E", "Hello world!EN")]
    assert sent == ["H", "ello w", "orld", "!"] and buf.finish("Hello world!") == ""
    plain = DeltaBuffer([])
    assert plain.update("ab\ufffd") == "ab" and plain.update("abé") == "é"   # an unfinished character waits


def test_urls_name_the_api_and_hide_credentials():
    assert split_url("http://127.0.0.1:8000/v1") == ("http://127.0.0.1:8000/v1", "chat")
    assert split_url("http://h:1/v1/completions") == ("http://h:1/v1", "completions")
    assert split_url("http://h:1/v1/chat/completions/") == ("http://h:1/v1", "chat")
    assert split_url("http://h:1") == ("http://h:1/v1", "chat")
    assert shown_url("https://user:pw@h.example:8443/v1?key=abc") == "https://h.example:8443/v1"
    with pytest.raises(LabError, match="must start with http"):
        EndpointConfig(url="localhost:8000").check()


def test_prompt_estimates_are_cautious_and_cuts_keep_the_end():
    assert estimate_tokens("abcd") == 2 and estimate_tokens("é") == 1
    tail = keep_tail("x" * 100 + "Answer:", 5)
    assert tail == "xxxAnswer:" and estimate_tokens(tail) <= 5
