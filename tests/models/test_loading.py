"""Loading by spec: default, local HF folders, our checkpoints, and the clear failures."""
import pytest
import torch

from core.errors import LabError, ModelNotAvailableError
from core.models.gpt import GPT, GPTConfig
from core.models.loading import load_model, load_state_dict_file, offline_message, save_checkpoint
from core.models.tokenizer import load_tokenizer


def test_default_is_the_trained_shakespeare_model():
    lm = load_model("default")
    assert not lm.untrained and lm.name == "default" and lm.card()["untrained"] is False
    card = lm.card()
    assert (card["layers"], card["width"], card["heads"], card["context"]) == (4, 256, 4, 256)
    assert card["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert "Shakespeare" in lm.card_text and "python -m core train" in lm.card_text
    # trained: Shakespeare is far more likely than shuffled words of the same vocabulary
    from core.generation.autoregressive import perplexity
    assert perplexity(lm, "ROMEO:\nBut soft, what light through yonder window breaks?") < \
        perplexity(lm, "window ROMEO: light soft yonder what? breaks through But") / 3


def test_untrained_models_are_labelled(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, block_size=16, n_layer=1, n_head=2, d_model=16))  # the default's BPE
    from core.models.loading import DEFAULT_DIR
    out = save_checkpoint(tmp_path / "u", model, str(DEFAULT_DIR / "tokenizer.json"), untrained=True)
    lm = load_model(str(out))
    assert lm.untrained and lm.name.endswith("(untrained)") and lm.card()["untrained"] is True


def test_uncached_hub_model_offline_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as e:
        load_model("EleutherAI/gpt-neo-2.7B")
    assert str(e.value) == offline_message("EleutherAI/gpt-neo-2.7B")
    assert "default" in str(e.value) and "\n" not in str(e.value)


def test_missing_path_and_bad_device():
    with pytest.raises(LabError, match="does not exist"):
        load_model("./no/such/model")
    with pytest.raises(LabError, match="device"):
        load_model("default", device="tpu")
    with pytest.raises(LabError, match="dtype"):
        load_model("default", dtype="int3")


def test_checkpoint_round_trip_and_dtype(tmp_path, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    out = save_checkpoint(tmp_path / "ck", lm.model, str(tiny_gptlab_dir / "tokenizer.json"))
    again = load_model(str(out))
    ids = torch.tensor([lm.tokenizer.encode("hello there")])
    assert torch.equal(lm.stack.logits(ids), again.stack.logits(ids))
    half = load_model(str(out), dtype="bfloat16")
    assert half.stack.dtype == torch.bfloat16 and half.card()["dtype"] == "bfloat16"


def test_truncated_weights_give_a_clear_message(tmp_path, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    out = save_checkpoint(tmp_path / "ck", lm.model, str(tiny_gptlab_dir / "tokenizer.json"))
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LabError, match="corrupt or truncated"):
        load_model(str(out))


def test_pickle_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(LabError, match="only safetensors or plain tensor"):
        load_state_dict_file(bad)


def test_tokenizers_behind_one_interface(tiny_gpt2_dir, tiny_gptlab_dir):
    text = "ROMEO: But soft!"
    for tok in (load_tokenizer(tiny_gpt2_dir), load_tokenizer(tiny_gptlab_dir / "tokenizer.json"),
                load_tokenizer(tiny_gptlab_dir)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.vocab_size > 0
        assert "".join(tok.token_str(i) for i in ids) == text


def test_tiktoken_when_files_can_be_had():
    try:
        tok = load_tokenizer("tiktoken:gpt2")
    except LabError as e:  # offline without a cached encoding: the message says what to do
        assert "TIKTOKEN_CACHE_DIR" in str(e)
        return
    assert tok.decode(tok.encode("Hello world")) == "Hello world" and tok.vocab_size == 50257


def test_impossible_shapes():
    with pytest.raises(LabError, match="divisible"):
        GPT(GPTConfig(d_model=100, n_head=3))
