"""The OpenAI-compatible server against the official openai client, over real loopback HTTP: greedy
completions, chat and streams are token for token the library's (and `generate --greedy`'s), log-
probabilities are the model's, every sampling control reaches the sampler, the key is enforced, bad
parameters are a 400 sentence, and a full queue answers at once."""
from __future__ import annotations

import math
import threading
import time

import pytest

from core.generation import SamplingConfig, generate
from core.generation.autoregressive import token_logprobs
from core.models.loading import load_model
from core.serve.chat import TRANSCRIPT_STOP, chat_prompt, transcript
from tests.serve.helpers import busy, client, post, serving

PROMPT = "ROMEO: But soft"
MESSAGES = [{"role": "system", "content": "You speak verse."}, {"role": "user", "content": "Who is there?"}]


@pytest.fixture(scope="module")
def lm(tiny_gptlab_dir):
    return load_model(str(tiny_gptlab_dir))


@pytest.fixture(scope="module")
def server(lm):
    with serving(lm) as s:
        yield s


def greedy(lm, prompt: str, k: int, **kw):
    return generate(lm, prompt, SamplingConfig(max_new_tokens=k, greedy=True, **kw))


def test_models_lists_the_served_model_and_its_context(server, lm):
    models = client(server.url).models.list().data
    assert [m.id for m in models] == [lm.spec] and models[0].max_model_len == lm.stack.context_length
    assert client(server.url).models.retrieve(lm.spec).id == lm.spec


def test_greedy_completion_is_the_librarys_and_the_clis(server, lm, tiny_gptlab_dir, capsys):
    from core.commands.cli import main

    expected = greedy(lm, PROMPT, 12, n_alternatives=3)
    r = client(server.url).completions.create(model=lm.spec, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == expected.completion and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(PROMPT)) and r.usage.completion_tokens == 12
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.tokens], abs=1e-5)
    for top, tok in zip(lp.top_logprobs, expected.tokens):
        assert len(top) >= 3 and top[tok.text] == pytest.approx(tok.logprob, abs=1e-5)
        assert max(top.values()) == pytest.approx(math.log(tok.alternatives[0][2]), abs=1e-5)

    assert main(["generate", "--model", str(tiny_gptlab_dir), "--prompt", PROMPT, "--greedy", "--max-new-tokens",
                 "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == PROMPT + choice.text + "\n"


def test_streamed_completion_adds_up_to_the_same_text(server, lm):
    expected = greedy(lm, PROMPT, 16)
    chunks = list(client(server.url).completions.create(model=lm.spec, prompt=PROMPT, max_tokens=16, temperature=0,
                                                        stream=True, logprobs=2,
                                                        stream_options={"include_usage": True}))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == expected.completion
    assert [p.finish_reason for p in pieces][-1] == "length" and all(p.finish_reason is None for p in pieces[:-1])
    streamed_lp = [x for p in pieces if p.logprobs for x in p.logprobs.token_logprobs]
    assert streamed_lp == pytest.approx([t.logprob for t in expected.tokens], abs=1e-5)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_continues_the_transcript(server, lm):
    prompt, stops = chat_prompt(lm, MESSAGES)
    assert prompt == transcript(MESSAGES) == "system: You speak verse.\nuser: Who is there?\nassistant:"
    assert stops == [TRANSCRIPT_STOP]
    expected = greedy(lm, prompt, 10, stop=stops, n_alternatives=2)
    c = client(server.url)
    r = c.chat.completions.create(model=lm.spec, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                                  top_logprobs=2)
    msg = r.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == expected.completion
    assert "".join(t.token for t in msg.logprobs.content) == msg.message.content
    assert [t.logprob for t in msg.logprobs.content] == pytest.approx([t.logprob for t in expected.tokens], abs=1e-5)
    assert all(len(t.top_logprobs) == 2 for t in msg.logprobs.content)
    chunks = list(c.chat.completions.create(model=lm.spec, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected.completion
    # without max_tokens a chat may use the rest of the context
    r = c.chat.completions.create(model=lm.spec, messages=MESSAGES, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= lm.stack.context_length


def test_every_sampling_control_reaches_the_sampler(server, lm):
    c = client(server.url)
    settings = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=7)
    r = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=10, n=3,
                             temperature=settings["temperature"], top_p=settings["top_p"], seed=settings["seed"],
                             extra_body={k: settings[k] for k in ("top_k", "min_p", "repetition_penalty")})
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):  # choice i is seeded seed + i, so each one can be repeated alone
        want = generate(lm, PROMPT, SamplingConfig(max_new_tokens=10, **{**settings, "seed": 7 + i}))
        assert ch.text == want.completion
    again = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=10, n=3, temperature=0.7, top_p=0.9, seed=7,
                                 extra_body={k: settings[k] for k in ("top_k", "min_p", "repetition_penalty")})
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    beams = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=6, extra_body={"num_beams": 3})
    assert beams.choices[0].text == generate(lm, PROMPT, SamplingConfig(max_new_tokens=6, num_beams=3)).completion


def test_stop_strings_cut_the_text_and_its_stream(server, lm):
    full = greedy(lm, PROMPT, 20).completion
    stop = full[5:8]
    expected = greedy(lm, PROMPT, 20, stop=[stop]).completion
    assert stop not in expected and full.startswith(expected)
    c = client(server.url)
    r = c.completions.create(model=lm.spec, prompt=[PROMPT, PROMPT + " light"], max_tokens=20, temperature=0,
                             stop=stop, logprobs=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.choices[1].text == greedy(lm, PROMPT + " light", 20, stop=[stop]).completion
    assert "".join(r.choices[0].logprobs.tokens).startswith(expected)
    streamed = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected


def test_echo_scores_the_prompt(server, lm):
    text = PROMPT + ", what light through yonder window breaks"
    r = client(server.url).completions.create(model=lm.spec, prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    ids, expected = token_logprobs(lm, text)
    assert r.choices[0].text == text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_the_api_key_is_enforced(lm, monkeypatch):
    monkeypatch.setenv("GPTLAB_API_KEY", "from-the-environment")
    with serving(lm) as s:
        import openai

        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError) as e:
                client(s.url, key or "x").completions.create(model=lm.spec, prompt=PROMPT, max_tokens=2)
            assert e.value.status_code == 401 and "Authorization: Bearer KEY" in e.value.body["message"]
            assert e.value.body["code"] == "invalid_api_key"
        status, body, _ = post(s.url, "/models", None, method="GET")
        assert status == 401 and body["error"]["type"] == "invalid_request_error"
        assert client(s.url, "from-the-environment").models.list().data[0].id == lm.spec
        assert post(s.url.removesuffix("/v1"), "/health", None, method="GET")[:2] == (200, {"status": "ok"})
    with serving(lm, api_key="given") as s:   # --api-key wins over the variable
        assert client(s.url, "given").completions.create(model=lm.spec, prompt=PROMPT, max_tokens=2).choices


BAD = [
    ({"prompt": PROMPT, "top_p": 3}, "top-p must be in (0, 1]"),
    ({"prompt": PROMPT, "temperature": -1}, "'temperature' must be 0 (greedy) or above"),
    ({"prompt": PROMPT, "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"prompt": PROMPT, "max_tokens": 10_000}, "leaves room for"),
    ({"prompt": PROMPT, "n": 0}, "'n' must be between 1 and"),
    ({"prompt": PROMPT, "logprobs": 50}, "'logprobs' must be between 0 and 20"),
    ({"prompt": PROMPT, "seed": "x"}, "'seed' must be a whole number"),
    ({"prompt": PROMPT, "top_k": 2.5}, "'top_k' must be a whole number"),
    ({"prompt": PROMPT, "stop": [""]}, "'stop' holds an empty string"),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, "use repetition_penalty instead"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "only applies with \"stream\": true"),
    ({"prompt": ""}, "The prompt is empty"),
    ({"prompt": []}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": [1, 2, 3]}, "token ids are not accepted"),
    ({"prompt": "x" * 5000}, "shorten the prompt"),
    ({"prompt": PROMPT, "stream": True, "max_tokens": 10_000}, "leaves room for"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "Message 0 needs a \"role\""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "reads text only"),
    ({"messages": MESSAGES, "top_logprobs": 3}, "needs \"logprobs\": true"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "'tools' is not supported"),
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a RecursionError: a 500 "bug in GPT Lab"
    (b'{"prompt": "a", "temperature": NaN}', "must be a finite number"),
    (b"[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_parameters_are_a_400_sentence(server, body, message):
    path = "/chat/completions" if isinstance(body, dict) and "messages" in body else "/completions"
    status, answer, _ = post(server.url, path, body)
    assert status == 400, answer
    err = answer["error"]
    assert message in err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_parameter"


def test_unknown_models_and_paths_are_404_in_openai_format(server, lm):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client(server.url).completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found" and f"serves '{lm.spec}'" in e.value.body["message"]
    status, body, _ = post(server.url, "/embeddings", {"input": "x"})
    assert status == 404 and "POST /v1/completions" in body["error"]["message"]
    status, body, _ = post(server.url, "/completions", None, method="GET")
    assert status == 405 and "does not take GET" in body["error"]["message"]


def test_a_full_queue_answers_503_at_once_and_never_hangs(lm):
    import openai

    with serving(lm, max_queue=1) as s:
        c = client(s.url)
        with busy(s, jobs=2):  # one running, one waiting: full
            for stream in (False, True):
                t0 = time.monotonic()
                with pytest.raises(openai.InternalServerError) as e:
                    c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=2, stream=stream)
                assert time.monotonic() - t0 < 5
                assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
                assert e.value.response.headers["retry-after"] == "1"
        # the held jobs are done: there is room again
        assert c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_a_request_that_waits_too_long_is_refused(lm):
    import openai

    with serving(lm, queue_timeout_s=0.3) as s:
        with busy(s) as release:
            threading.Timer(1.0, release.set).start()
            with pytest.raises(openai.InternalServerError) as e:
                client(s.url).completions.create(model=lm.spec, prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and "without starting" in e.value.body["message"]


def test_several_clients_at_once_each_get_their_answer(server, lm):
    prompts = [PROMPT, "JULIET:", "The quick brown fox", "Once upon a time"]
    expected = {p: greedy(lm, p, 8).completion for p in prompts}
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(p: str, stream: bool):
        try:
            c = client(server.url)
            if stream:
                got[p + "|s"] = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=lm.spec, prompt=p, max_tokens=8, temperature=0, stream=True))
            else:
                got[p] = c.completions.create(model=lm.spec, prompt=p, max_tokens=8, temperature=0).choices[0].text
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p, s)) for p in prompts for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and all(not t.is_alive() for t in threads)
    assert got == {**expected, **{p + "|s": v for p, v in expected.items()}}


def test_a_gpt2_model_is_served_the_same_way(tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    with serving(lm, model_name="tiny") as s:
        c = client(s.url)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == greedy(lm, PROMPT, 8).completion


def test_a_chat_template_is_used_when_the_tokenizer_has_one(tiny_gpt2_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "chatty"
    shutil.copytree(tiny_gpt2_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(folder)
    lm = load_model(str(folder))
    prompt, stops = chat_prompt(lm, MESSAGES)
    assert prompt == "<system>You speak verse.<user>Who is there?<assistant>" and stops == []
    with serving(lm) as s:
        r = client(s.url).chat.completions.create(model=lm.spec, messages=MESSAGES, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == greedy(lm, prompt, 6).completion


def test_a_diffusion_model_is_served_without_logprobs(tiny_diffusion_dir):
    from core.generation.diffusion import DiffusionConfig, generate as diffusion_generate

    lm = load_model(str(tiny_diffusion_dir))
    expected = diffusion_generate(lm, PROMPT, DiffusionConfig(gen_length=8, steps=8, temperature=0.0, seed=0))
    with serving(lm) as s:
        c = client(s.url)
        r = c.completions.create(model=lm.spec, prompt=PROMPT, max_tokens=8, temperature=0, seed=0)
        assert r.choices[0].text == expected.completion and r.usage.completion_tokens == 8
        assert "".join(ch.choices[0].text for ch in c.completions.create(
            model=lm.spec, prompt=PROMPT, max_tokens=8, temperature=0, seed=0, stream=True)) == expected.completion
        for body, words in (({"logprobs": 2}, "no per-token log-probabilities"),
                            ({"repetition_penalty": 1.3}, "has no repetition_penalty")):
            status, answer, _ = post(s.url, "/completions", {"prompt": PROMPT, **body})
            assert status == 400 and words in answer["error"]["message"]


def test_a_diffusion_model_samples_with_the_top_p_and_min_p_it_is_sent(tiny_diffusion_dir):
    """top_p and min_p reach the diffusion sampler: the served text equals the sampler's own with the
    same filters and seed, and the filters change the text (so they were not dropped on the way)."""
    from core.generation.diffusion import DiffusionConfig, generate as diffusion_generate

    lm = load_model(str(tiny_diffusion_dir))

    def sampled(**filters) -> str:
        return diffusion_generate(lm, PROMPT, DiffusionConfig(gen_length=8, steps=8, temperature=1.0, seed=5,
                                                              **filters)).completion

    nucleus, floor, plain = sampled(top_p=0.05), sampled(min_p=0.9), sampled()
    assert nucleus != plain and floor != plain
    with serving(lm) as s:
        c = client(s.url)
        ask = dict(model=lm.spec, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5)
        assert c.completions.create(**ask, top_p=0.05).choices[0].text == nucleus
        assert c.completions.create(**ask, extra_body={"min_p": 0.9}).choices[0].text == floor
        assert c.completions.create(**ask).choices[0].text == plain
        status, answer, _ = post(s.url, "/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
                                                         "seed": 5, "top_p": 0.05, "min_p": 0.9})
        assert status == 200 and answer["choices"][0]["text"] == sampled(top_p=0.05, min_p=0.9)
