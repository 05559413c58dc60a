"""Character-level tokenizer of the embedded default model, saved in Hugging Face `tokenizers` format.

`save(dir)` writes tokenizer.json + tokenizer_config.json (with a user/assistant `chat_template`) +
special_tokens_map.json, loadable offline with `transformers.AutoTokenizer.from_pretrained(dir)`.

Vocabulary (103 ids): 7 special tokens, newline, and printable ASCII (space .. '~'). Unknown characters map to
<|unk|>. The chat format (one user turn, generation prompt on):

    <|bos|><|user|>{content}<|eot|><|assistant|>{response}<|eos|><|eos|>...

The response is followed by <|eos|> up to the end of the generation buffer (<|eos|> is also the pad token).
"""

from __future__ import annotations

import json
import os

MASK, EOS, BOS, USER, ASSISTANT, EOT, UNK = ("<|mask|>", "<|eos|>", "<|bos|>", "<|user|>", "<|assistant|>",
                                             "<|eot|>", "<|unk|>")
SPECIALS = [EOS, BOS, MASK, USER, ASSISTANT, EOT, UNK]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB = SPECIALS + CHARS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '<|eot|>' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CharTokenizer:
    """Pure-Python twin of the saved HF tokenizer (no `transformers` needed at run time)."""

    def __init__(self):
        self.vocab = {t: i for i, t in enumerate(VOCAB)}
        self.id_to_token = list(VOCAB)
        self.mask_id, self.eos_id, self.bos_id = self.vocab[MASK], self.vocab[EOS], self.vocab[BOS]
        self.pad_id = self.eos_id
        self.user_id, self.assistant_id, self.eot_id, self.unk_id = (self.vocab[USER], self.vocab[ASSISTANT],
                                                                     self.vocab[EOT], self.vocab[UNK])

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Characters to ids; special-token strings inside `text` become their single ids (as the HF tokenizer)."""
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                for s in SPECIALS:
                    if text.startswith(s, i):
                        ids.append(self.vocab[s])
                        i += len(s)
                        break
                else:
                    ids.append(self.vocab["<"])
                    i += 1
                continue
            ids.append(self.vocab.get(text[i], self.unk_id))
            i += 1
        return ids

    def chat_text(self, text: str) -> str:
        """The chat template applied to one user message, generation prompt on (what CHAT_TEMPLATE renders)."""
        return f"{BOS}{USER}{text}{EOT}{ASSISTANT}"

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        """Ids of a prompt: the chat template around `text` (chat=True), else <|bos|> + the raw characters."""
        if chat:
            return self.encode(self.chat_text(text))
        return [self.bos_id] + self.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True, stop_at_eos: bool = True) -> str:
        """Ids to text. Stops at the first <|eos|> (stop_at_eos) and drops the other special tokens."""
        out = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_id:
                break
            tok = self.id_to_token[i] if 0 <= i < len(self.id_to_token) else UNK
            if skip_special_tokens and tok in SPECIALS:
                continue
            out.append(tok)
        return "".join(out)

    # ---- Hugging Face files ----
    def hf_tokenizer(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models

        tok = Tokenizer(models.BPE(vocab=dict(self.vocab), merges=[], unk_token=UNK))
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        for s in SPECIALS:
            assert tok.token_to_id(s) == self.vocab[s], s
        return tok

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.hf_tokenizer().save(os.path.join(path, "tokenizer.json"))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK, "unk_token": UNK,
                   "additional_special_tokens": [USER, ASSISTANT, EOT]}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "padding_side": "left",
               "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, **special}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=1)

    @staticmethod
    def load(path: str) -> "CharTokenizer":
        """Check that `path` holds this tokenizer (same vocabulary) and return it."""
        with open(os.path.join(path, "tokenizer.json")) as f:
            tj = json.load(f)
        tok = CharTokenizer()
        vocab = dict(tj["model"]["vocab"])
        vocab.update({a["content"]: a["id"] for a in tj.get("added_tokens", [])})
        if vocab != tok.vocab:
            raise ValueError(f"{path}/tokenizer.json is not the dllm-jax character tokenizer")
        return tok


def get_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def encode_prompt(text: str, chat: bool = True) -> list[int]:
    return CharTokenizer().encode_prompt(text, chat=chat)


def decode(ids, skip_special_tokens: bool = True, stop_at_eos: bool = True) -> str:
    return CharTokenizer().decode(ids, skip_special_tokens=skip_special_tokens, stop_at_eos=stop_at_eos)


def save(path: str) -> None:
    CharTokenizer().save(path)


def hf_chat_ids(hf_tokenizer, text: str) -> list[int]:
    """Token ids of one user turn + the generation prompt with a Hugging Face tokenizer's chat template
    (`apply_chat_template` returns a list or, in newer versions, a BatchEncoding)."""
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]
