"""Explainers: prompt building within the input length, the activating token marked, answer
parsing, a tiny random T5 (and a tiny causal LM) driven end to end, and the built-in explainer."""
from __future__ import annotations

import pytest

from core.errors import LabError
from core.interp import BuiltinExplainer, Context, FeatureEvidence, FeatureStore, LMExplainer, describe_store, \
    load_explainer
from core.interp.prompts import (feature_prompt, fit_examples, layer_prompt, mark_context, parse_explanation,
                                 parse_score, parse_yes_no, total_prompt)

WORDS = ("the king is dead long live the queen a neuron fires on token marked snippet answer score yes no "
         "what does detect layer model text one two three four five six seven eight nine ten 1 2 3 4 5 6 7 8 9 10")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random 1-layer T5 with a 400-token BPE vocabulary and a 64-token input limit."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-t5")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([WORDS * 5], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(fast), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1,
                   num_heads=2, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                   decoder_start_token_id=fast.pad_token_id)
    T5ForConditionalGeneration(cfg).eval().save_pretrained(folder)
    return folder


def _ctx(tokens, pos, act=1.0, kind="top"):
    acts = [0.0] * len(tokens)
    acts[pos] = act
    return Context(kind, 0, list(tokens), list(range(len(tokens))), acts, position=pos, activation=act)


LONG = [" the"] * 40 + [" king"] + [" is", " dead"]


def test_prompts_fit_and_mark_the_token(tiny_t5):
    ex = LMExplainer(str(tiny_t5), max_new_tokens=8)
    assert ex.seq2seq and ex.max_input == 64 and ex.name == f"lm:{tiny_t5}"
    contexts = [_ctx([" long", " live", " the", " queen"], 3), _ctx(LONG, 40), _ctx([" a", " king"], 1)]
    prompt, used = feature_prompt(contexts, ex.count, ex.max_input)
    assert ex.count(prompt) <= ex.max_input and used == 1       # the long second example does not fit
    assert "<< queen>>" in prompt
    # one example too long on its own is trimmed from the left, keeping its marked token
    prompt, used = feature_prompt([_ctx(LONG, 40)], ex.count, ex.max_input)
    assert used == 1 and ex.count(prompt) <= ex.max_input and "<< king>>" in prompt
    assert ex.count(layer_prompt(3, ["Fires on \"the\""] * 50, ex.count, ex.max_input)) <= ex.max_input
    assert ex.count(total_prompt([(i, "Layer fires on \"x\"") for i in range(30)], ex.count, ex.max_input,
                                 "ROMEO:", " hello")) <= ex.max_input


def test_tiny_t5_end_to_end(tiny_t5, tmp_path):
    ex = load_explainer(f"lm:{tiny_t5}", max_new_tokens=6, batch_size=2)
    evs = [FeatureEvidence(0, f, [_ctx([" the", " king", " is"], 1, 2.0)], promoted=[(" queen", 1.0)]) for f in range(3)]
    texts = ex.explain_features(evs)
    assert len(texts) == 3 and all(isinstance(t, str) and t and "\n" not in t for t in texts)
    assert ex.describe_layer(0, [(t, 1.0) for t in texts]) and ex.describe_total([(0, "x"), (1, "y")], "a", "b")
    for s in (ex.rate_output("ROMEO:", " the king"), ex.rate_interpretation("ROMEO:", " the king", "x")):
        assert s is None or 1 <= s <= 10
    answers = ex.detector().detect("Fires on \"king\"", [[" the", " king"], [" a", " queen"]])
    assert len(answers) == 2 and all(0.0 <= a <= 1.0 for a in answers)
    # the probability is softmax over the "yes" and "no" logits of the first answer token, exactly
    import torch

    prompt = "Would it fire? Answer:"
    enc = ex.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        dec = torch.full((1, 1), ex.model.config.decoder_start_token_id)
        logits = ex.model(**enc, decoder_input_ids=dec).logits[0, -1]
    yes, no = ex._answer_ids("yes"), ex._answer_ids("no")
    expected = float(torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0])
    assert ex.yes_probability([prompt])[0] == pytest.approx(expected, abs=1e-6)
    assert ex.yes_no([prompt]) == [expected > 0.5]
    fuzz = ex.detector().fuzz("Fires on \"king\"", [([" the", " king"], [1]), ([" the", " king"], [0])])
    assert len(fuzz) == 2 and all(0.0 <= a <= 1.0 for a in fuzz)

    path = tmp_path / "features.sqlite"
    with FeatureStore.build(path) as store:
        from tests.interp.test_feature_store import _fill

        _fill(store)
    with FeatureStore(path) as store:
        store.put_contexts(0, 1, [_ctx([" the", " king"], 1, 1.0, "heldout")])
        events = list(describe_store(store, ex, layers=[0], n_top=5))
        assert events[-1].explainer == ex.name
        assert set(store.explanations(0, ex.name)) == {0, 1}
        assert store.description("layer", 0, ex.name) and store.description("total", -1, ex.name)
        det = store.scores(0, 1)[ex.name]["detection"]
        assert det.n == 2 and det.details["detector"] == ex.name    # one held-out, one negative window
        assert not det.details["yes_no"] and 0 <= det.value <= 1    # graded: AUC of the probabilities


def test_causal_lm_explainer(tiny_gpt2_dir):
    ex = LMExplainer(str(tiny_gpt2_dir), max_new_tokens=4)
    assert not ex.seq2seq and ex.max_input == 64 - 4              # the answer shares the window
    texts = ex.explain_features([FeatureEvidence(0, 0, [_ctx(LONG, 40)])])
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert len(ex.yes_no(["Is it? Answer:", "Is it not a much longer question? Answer:"])) == 2


@pytest.mark.parametrize("trust", [False, True])
def test_the_explainer_passes_trust_remote_code_explicitly(tiny_gpt2_dir, monkeypatch, trust):
    """Every from_pretrained call says whether the repository's code may run: no unless asked."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "missing")))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    ex = load_explainer(str(tiny_gpt2_dir), trust_remote_code=trust) if trust else LMExplainer(str(tiny_gpt2_dir))
    assert isinstance(ex, LMExplainer)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(value is trust for _, value in seen), seen


def test_an_explainer_with_its_own_code_is_refused_without_running_it(own_code_model):
    folder, marker = own_code_model
    with pytest.raises(LabError, match="ships its own Python code.*--trust-remote-code"):
        load_explainer(str(folder))
    assert not marker.exists()


def test_cli_passes_trust_remote_code_to_the_explainer(tiny_gptlab_dir, tmp_path, monkeypatch, capsys):
    import core.interp.explain
    from core.commands.cli import main

    def fake(spec, device="cpu", *, trust_remote_code=False, **_):
        raise LabError(f"explainer {spec} trust_remote_code={trust_remote_code}")
    monkeypatch.setattr(core.interp.explain, "load_explainer", fake)
    for flags, trusted in (([], False), (["--trust-remote-code"], True)):
        rc = main(["transcoders", "describe", "--model", str(tiny_gptlab_dir), "--transcoders", str(tmp_path),
                   "--explainer", "some/lm", *flags])
        assert rc == 2 and f"explainer some/lm trust_remote_code={trusted}" in capsys.readouterr().err


def test_missing_explainer_says_what_to_do(tmp_path):
    with pytest.raises(LabError, match="builtin"):
        load_explainer(str(tmp_path))
    assert isinstance(load_explainer(None), BuiltinExplainer) and isinstance(load_explainer("builtin"), BuiltinExplainer)


@pytest.mark.parametrize("text, score", [
    ("7", 7), ("7/10", 7), ("Score: 7", 7), ("score:7.", 7), ("I'd say 8 out of 10", 8), ("4.5/5", 9),
    ("seven", 7), ("Ten!", 10), ("0", 1), ("15", 10), ("-3", 1), ("Score: 7.6", 8), ("3/10 because", 3),
    ("none", None), ("", None), (None, None), ("<pad> </s>", None), ("good", None)])
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text, expected", [
    ("Answer: the word king", "the word king"), ("  \"royal titles\"  ", "royal titles"),
    ("\n\nExplanation - names of people\nsecond line", "names of people"), ("<pad> </s>", None), ("", None),
    (None, None), ("the <<king>> token", "the king token"), ("The neuron detects: commas", "commas"),
    ("x" * 300, "x" * 200)])
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


def test_parse_yes_no():
    assert parse_yes_no(" Yes, it would") is True and parse_yes_no("no.") is False and parse_yes_no("maybe") is None


def test_fit_examples_with_a_word_counter():
    count = lambda s: len(s.split())  # noqa: E731
    examples = [([f" w{i}" for i in range(10)], 5)] * 6
    prompt, used = fit_examples("head\n", examples, "foot", count, 30)
    assert count(prompt) <= 30 and used == 2 and prompt.count("<<") == 2
    assert mark_context([" a", " b", "\n"], 1) == " a<< b>>\\n"


def test_builtin_explainer_is_deterministic_and_quotes_what_fires():
    ev = FeatureEvidence(2, 7, [_ctx([" of", " the", " king"], 2, 3.0), _ctx([" of", " a", " king"], 2, 2.0),
                                _ctx([" my", " queen"], 1, 0.5)], promoted=[(" crown", 1.0), ("\n", 0.5)])
    ex = BuiltinExplainer()
    text = ex.explain_feature(ev)
    assert text == ex.explain_feature(ev)
    assert text == ('Fires on "king" (91% of its strongest activations). '
                    "It makes the model more likely to write 'crown', '\\n'.")
    assert ex.describe_layer(2, [(text, 1.0)]) == 'Layer 2\'s most active features fire on "king".'
    assert ex.describe_layer(2, [(text, 1.0, 0.875), ("Fires on \"a\".", 0.5, 0.55)]) == (
        'Layer 2: of its 2 most active features, 1 has an explanation that holds up on held-out text (detection AUC '
        '0.7 or more), firing on "king" (detection AUC 0.88).')
    assert ex.describe_layer(2, [("Fires on \"a\".", 0.5, 0.55)]) == (
        'Layer 2: none of its 1 most active features has an explanation that holds up on held-out text (detection '
        'AUC 0.7 or more); the best fires on "a" (detection AUC 0.55).')
    assert ex.rate_output("a", "b", mean_logprob=0.0) is None     # it grades no text
    assert ex.rate_interpretation("a", "b", "c", measured=4) == 4


def test_builtin_explainer_writes_where_a_feature_fires():
    """Sentences name the contexts that hold for most top windows: the token before, the start of a
    line, a speaker's name, the first line of a speech."""
    ex = BuiltinExplainer()
    after_my = [_ctx([" of", " my", " lord"], 2, 2.0), _ctx([" to", " my", " lord"], 2, 1.0),
                _ctx([" my", " lord"], 1, 1.0)]
    assert ex.explain_feature(FeatureEvidence(0, 0, after_my)) == 'Fires on "lord", mostly right after \'my\'.'
    line_start = [_ctx([" said", ".", "\n", "And"], 3, 2.0), _ctx(["!", "\n", "And"], 2, 1.0),
                  _ctx([",", "\n", "And"], 2, 1.0)]
    assert "at the start of a line" in ex.explain_feature(FeatureEvidence(0, 0, line_start))
    speaker = [_ctx([".", "\n\n", "ROM", "EO", ":"], 2, 2.0), _ctx([".", "\n\n", "JUL", "IET", ":"], 2, 1.0)]
    assert "in speakers' names" in ex.explain_feature(FeatureEvidence(0, 0, speaker))
    speech = [_ctx([".", "\n\n", "ROMEO", ":", "\n", "What", " is"], 6, 2.0),
              _ctx([".", "\n\n", "JULIET", ":", "\n", "Where", " is"], 6, 1.0)]
    assert "in the first line of a speech" in ex.explain_feature(FeatureEvidence(0, 0, speech))
    # the rule detector reads only the double-quoted tokens: contexts and promotions are single-quoted
    from core.interp.scoring import quoted_tokens

    assert quoted_tokens(ex.explain_feature(FeatureEvidence(0, 0, after_my, promoted=[(" sir", 1.0)]))) == ["lord"]
