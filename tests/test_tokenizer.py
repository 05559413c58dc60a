import pytest

from dllm_jax import tokenizer as T


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    T.save(str(d))
    return d


def test_vocab_small_and_specials():
    t = T.CharTokenizer()
    assert t.vocab_size < 128
    assert len(set(t.vocab.values())) == t.vocab_size
    assert t.pad_id == t.eos_id
    assert len({t.mask_id, t.eos_id, t.bos_id}) == 3


def test_round_trip():
    t = T.CharTokenizer()
    s = "def f(a, b):\n    if a > b:\n        return a * 3\n#### 42 ~{}[]|\\'\""
    ids = t.encode(s)
    assert len(ids) == len(s)
    assert t.decode(ids) == s
    assert T.decode(ids + [t.eos_id] + t.encode("junk")) == s
    assert t.decode([t.bos_id, t.mask_id] + ids, skip_special_tokens=True) == s
    assert t.encode("<|mask|>a<b") == [t.mask_id, t.vocab["a"], t.vocab["<"], t.vocab["b"]]
    assert t.encode("é") == [t.unk_id]


def test_encode_prompt():
    t = T.CharTokenizer()
    ids = T.encode_prompt("hi")
    assert ids == [t.bos_id, t.user_id, t.vocab["h"], t.vocab["i"], t.eot_id, t.assistant_id]
    assert T.encode_prompt("hi", chat=False) == [t.bos_id, t.vocab["h"], t.vocab["i"]]


def test_files(tok_dir):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == sorted(T.FILES)
    assert T.CharTokenizer.load(str(tok_dir)).vocab_size == T.CharTokenizer().vocab_size


def test_autotokenizer(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    t = T.CharTokenizer()
    assert len(hf) == t.vocab_size
    assert (hf.mask_token_id, hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (t.mask_id, t.eos_id, t.eos_id,
                                                                                        t.bos_id)
    s = "Write f(a, b): give a plus 1.\n    x = [3]  <|mask|>"
    assert hf.encode(s, add_special_tokens=False) == t.encode(s)
    assert hf.decode(t.encode("a b\n c"), skip_special_tokens=True) == "a b\n c"
    msgs = [{"role": "user", "content": "Sort the digits: 3021"}]
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == t.chat_text("Sort the digits: 3021") == "<|bos|><|user|>Sort the digits: 3021<|eot|><|assistant|>"
    ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == T.encode_prompt("Sort the digits: 3021")
    full = hf.apply_chat_template(msgs + [{"role": "assistant", "content": "0123"}], tokenize=False)
    assert full.endswith("<|assistant|>0123<|eos|>")
