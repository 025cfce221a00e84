"""Chat rendering, incremental detokenization and stop matching (gateway.text).

Tokenizers are trained here with the ``tokenizers`` library (no hub): a byte-level BPE
like Llama 3's and a SentencePiece-style BPE with byte fallback like Llama 2's, both with
small vocabularies so that emoji and CJK characters split across several tokens.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gateway.text import (
    ChatTemplateError,
    IncrementalDetokenizer,
    StopMatcher,
    TokenPieces,
    encode_continuing,
    encode_prompt,
    render_chat,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Swarm inference splits a model across peers, each serving a span of blocks.",
    "Les élèves étudient à l'école. Ça va très bien.",
    "你好，世界。今天天气很好。",
    "Emoji: 😀 🚀 👍🏽 ❤️",
] * 20

SAMPLES = [
    "Hello world",
    " leading space and  double  spaces ",
    "naïve café — “quotes” …",
    "你好，世界！这是一个测试。",
    "emoji 😀🚀 and family 👨‍👩‍👧‍👦 and flag 🇫🇷 end",
    "mixed: abc你好😀def\n\nnew lines\tand tabs",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ≤ ∞",
    "日本語のテキストとemoji🎉を混ぜる",
]

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz     ,.!?\n")
    + list("éüß你好世界天气")
    + [
        "😀",
        "🚀",
        "👍🏽",
        "❤️",
        "🇫🇷",
        "𝔘",
    ]
)

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}]{% endfor %}{% endif %}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def _random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3-style byte-level BPE with a tiny vocabulary (multi-byte chars split)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|start|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|start|>", "<|end|>"],
        clean_up_tokenization_spaces=False,
    )


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style BPE: '▁' for spaces, byte fallback for unknown characters."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    trainer_tok.train_from_iterator(CORPUS, trainer)
    state = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return byte_level_tokenizer() if request.param == "byte_level" else sentencepiece_tokenizer()


def _detokenize(tokenizer, ids, prompt_ids=None) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [det.push(i) for i in ids]
    return deltas, det.flush()


# --- IncrementalDetokenizer ------------------------------------------------------------


def test_tokenizers_split_multibyte_characters(tokenizer) -> None:
    """Guard for the tests below: some single tokens must decode to U+FFFD on their own."""
    # characters the training corpus never shows: with limit_alphabet, which of the corpus's equally
    # frequent characters win a token is up to the trainer, so corpus characters may not split
    ids = tokenizer.encode("漢字🦀", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES + _random_strings(40))
def test_detokenizer_matches_full_decode_for_every_prefix(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    final = tokenizer.decode(ids)
    for end in range(1, len(ids) + 1):
        deltas, tail = _detokenize(tokenizer, ids[:end])
        expected = tokenizer.decode(ids[:end], skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas), deltas
        if not expected.endswith("\ufffd"):
            assert "".join(deltas) + tail == expected
        else:
            # Cut inside a character: what was pushed is final text, the rest comes out of
            # flush() as U+FFFD. (ByteFallback decoders replace a whole run of byte tokens,
            # so decode() may show more U+FFFD than there are broken characters.)
            assert final.startswith("".join(deltas))
            assert tail.endswith("\ufffd")
    deltas, tail = _detokenize(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) and tail == ""


def test_detokenizer_skips_special_tokens(tokenizer) -> None:
    text = "Hello 你好 😀 world"
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    noisy = [bos] + [t for i in ids for t in (i, eos)] + [eos] * 3
    deltas, tail = _detokenize(tokenizer, noisy)
    assert "".join(deltas) + tail == tokenizer.decode(noisy, skip_special_tokens=True)
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_detokenizer_keeps_special_tokens_when_asked() -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode("hi", add_special_tokens=False) + [tok.eos_token_id]
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = "".join(det.push(i) for i in ids) + det.flush()
    assert text == "hi</s>"


def test_detokenizer_with_prompt_context_keeps_leading_space() -> None:
    tok = sentencepiece_tokenizer()
    prompt = tok.encode("The quick brown", add_special_tokens=True)
    generated = tok.encode("fox jumps", add_special_tokens=False)  # starts with "▁fox"
    deltas, tail = _detokenize(tok, generated, prompt_ids=prompt)
    assert "".join(deltas) + tail == " fox jumps"
    assert tok.decode(prompt + generated, skip_special_tokens=True) == "The quick brown fox jumps"
    # Without the context, SentencePiece drops the first space, like decode() does.
    deltas, tail = _detokenize(tok, generated)
    assert "".join(deltas) + tail == tok.decode(generated) == "fox jumps"


def test_detokenizer_with_prompt_context_byte_level_equals_decode() -> None:
    tok = byte_level_tokenizer()
    full = tok.encode("Hello 你好 world 😀 end", add_special_tokens=False)
    for cut in range(1, len(full)):
        prompt, generated = full[:cut], full[cut:]
        deltas, tail = _detokenize(tok, generated, prompt_ids=[tok.bos_token_id, *prompt])
        whole = tok.decode(full)
        head = tok.decode(prompt)
        if "\ufffd" not in head:  # a prompt cut inside a character has no clean text split
            assert "".join(deltas) + tail == whole[len(head) :]


def test_detokenizer_flush_emits_incomplete_character_like_decode() -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode("a😀", add_special_tokens=False)
    partial = ids[:-1]
    deltas, tail = _detokenize(tok, partial)
    assert "".join(deltas) == "a"
    assert "".join(deltas) + tail == tok.decode(partial)
    assert tail.endswith("\ufffd")


def test_detokenizer_window_stays_small(tokenizer) -> None:
    """No re-decode of the whole output: every decode call sees a few tokens only."""
    text = " ".join(SAMPLES) * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer)
    sizes: list[int] = []
    inner = det._decode

    def spy(window: list[int]) -> str:
        sizes.append(len(window))
        return inner(window)

    det._decode = spy
    out = "".join(det.push(i) for i in ids) + det.flush()
    assert out == tokenizer.decode(ids)
    assert len(ids) > 1000
    assert max(sizes) <= 16
    assert len(sizes) <= 2 * len(ids) + 2
    assert len(det._ids) <= IncrementalDetokenizer._TRIM_AT + 16  # the id list is trimmed


def test_detokenizer_counts_tokens() -> None:
    tok = byte_level_tokenizer()
    det = IncrementalDetokenizer(tok)
    for i in tok.encode("hello", add_special_tokens=False) + [tok.eos_token_id]:
        det.push(i)
    assert det.num_tokens == len(tok.encode("hello", add_special_tokens=False)) + 1


# --- TokenPieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_token_pieces_bytes_concatenate_to_text(tokenizer, text: str) -> None:
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    joined = b"".join(bytes(pieces.bytes_of(i)) for i in ids)
    # The SentencePiece-style normalizer prepends "▁", i.e. one space.
    assert joined.decode() in (text, " " + text)
    for i in ids:
        token, raw = pieces(i)
        assert token == bytes(raw).decode("utf-8", errors="backslashreplace")


def test_token_pieces_partial_character_is_escaped() -> None:
    tok = byte_level_tokenizer()
    pieces = TokenPieces(tok)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    token, raw = pieces(ids[0])
    assert "\\x" in token and raw[0] == 0xF0


def test_token_pieces_special_token() -> None:
    tok = byte_level_tokenizer()
    assert TokenPieces(tok)(tok.eos_token_id) == ("</s>", list(b"</s>"))


# --- StopMatcher ---------------------------------------------------------------------------


def _run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_stop_across_chunk_boundaries() -> None:
    assert _run_stops(["\nUser:"], ["Hello", " there\n", "Us", "er", ": more"]) == ("Hello there", True)


def test_stop_split_into_single_characters() -> None:
    text = "abc STOP def"
    assert _run_stops(["STOP"], list(text)) == ("abc ", True)


def test_multiple_stops_earliest_wins() -> None:
    assert _run_stops(["world", "lo"], ["hello world"]) == ("hel", True)
    matcher = StopMatcher(["###", "END"])
    assert matcher.feed("x END y ### z") == ("x ", True)
    assert matcher.matched == "END"


def test_stop_never_emitted_and_nothing_after() -> None:
    matcher = StopMatcher(["</answer>"])
    emitted = []
    for chunk in ["The answer is 42</ans", "wer> and then more", " text"]:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
    assert "".join(emitted) == "The answer is 42"
    assert stopped and matcher.feed("again") == ("", True) and matcher.flush() == ""


def test_prefix_held_back_then_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RE") == ("STORE", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.flush() == "ST"


def test_overlapping_prefixes() -> None:
    # "aab" is a stop; text "aaab" must stop after the first "a".
    assert _run_stops(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)
    assert _run_stops(["aab"], ["aaa", "c"]) == ("aaac", False)


def test_stop_at_very_start_and_no_stops() -> None:
    assert _run_stops(["Hi"], ["Hi there"]) == ("", True)
    matcher = StopMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert StopMatcher(["", ""]).feed("x") == ("x", False)


def test_stop_matcher_random_against_reference() -> None:
    rng = random.Random(7)
    for _ in range(300):
        stops = [
            "".join(rng.choice("ab😀") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice("abc😀") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        positions = [text.find(s) for s in stops if s in text]
        expected = (text[: min(positions)], True) if positions else (text, False)
        assert _run_stops(stops, chunks) == expected, (stops, chunks)


# --- render_chat -----------------------------------------------------------------------------


def _templated() -> PreTrainedTokenizerFast:
    tok = byte_level_tokenizer()
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    return tok


def test_render_chat_with_template() -> None:
    tok = _templated()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    out = render_chat(tok, messages)
    assert out == "<s><|start|>system\nBe brief.<|end|><|start|>user\nHi\nthere<|end|><|start|>assistant\n"
    no_prompt = render_chat(tok, messages, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_render_chat_tool_call_arguments_become_objects() -> None:
    tok = _templated()
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = render_chat(tok, messages)
    assert '[call get {"city": "Paris"}]' in out
    assert "<|start|>tool\nsunny<|end|>" in out


def test_render_chat_template_kwargs_reach_template() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = "{% if shout %}LOUD {% endif %}{{ messages[0].content }}"
    assert (
        render_chat(tok, [{"role": "user", "content": "x"}], chat_template_kwargs={"shout": True}) == "LOUD x"
    )
    assert render_chat(tok, [{"role": "user", "content": "x"}], shout=False) == "x"


def test_render_chat_reserved_kwargs_rejected() -> None:
    tok = _templated()
    for key in ("tokenize", "chat_template", "tools", "return_dict"):
        with pytest.raises(ChatTemplateError, match=key):
            render_chat(tok, [{"role": "user", "content": "x"}], chat_template_kwargs={key: "{{ 1 }}"})


def test_render_chat_template_error_is_value_error() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="system messages are not supported"):
        render_chat(tok, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="image_url"):
        render_chat(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_render_chat_without_template() -> None:
    tok = byte_level_tokenizer()
    assert not tok.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    assert render_chat(tok, messages) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = render_chat(tok, messages[1:2], tools=tools)
    assert with_tools.startswith("System: Tools you may call (JSON): [{")
    assert render_chat(tok, messages[1:3], chat_template_kwargs={"continue_final_message": True}) == (
        "User: Hi\nAssistant: Hello!"
    )


def test_render_chat_continue_final_message_with_template() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}[/]{% endfor %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    out = render_chat(tok, messages, chat_template_kwargs={"continue_final_message": True})
    assert out == "[user]Hi[/][assistant]Hel"
    with pytest.raises(ChatTemplateError):
        render_chat(tok, messages[:1], chat_template_kwargs={"continue_final_message": True})


def test_encode_prompt_does_not_double_bos() -> None:
    tok = sentencepiece_tokenizer()
    tok.chat_template = "{{ bos_token }}{{ messages[0].content }}"
    # This tokenizer has no post-processor adding BOS; make one that does.
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    rendered = render_chat(tok, [{"role": "user", "content": "Hello world"}])
    ids = encode_prompt(tok, rendered)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    plain = encode_prompt(tok, "Hello world")
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1


# --- encode_continuing -----------------------------------------------------------------------


def _first_turn(tok) -> tuple[str, list[int]]:
    """A rendered first turn and the ids a route would hold after it: the prompt's ids, then
    "generated" ids for the reply that re-tokenization would not give (one id per character)."""
    prompt = render_chat(tok, [{"role": "user", "content": "Hello world"}])
    reply = [i for ch in "How are" for i in tok.encode(ch, add_special_tokens=False)]
    return prompt, encode_prompt(tok, prompt) + reply


def test_encode_continuing_appends_the_rest_to_the_held_ids() -> None:
    tok = _templated()
    prompt, held = _first_turn(tok)
    reply = tok.decode(held[len(encode_prompt(tok, prompt)) :])
    assert reply == "How are"
    text = render_chat(
        tok,
        [
            {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "How are you"},
            {"role": "user", "content": "Fine."},
        ],
    )
    ids = encode_continuing(tok, text, held)
    rest = text[len(tok.decode(held, skip_special_tokens=False)) :]
    assert rest.startswith(" you<|end|>")
    assert ids == held + tok.encode(rest, add_special_tokens=False)
    # re-tokenizing the text gives other ids for the reply: the case this function exists for
    plain = encode_prompt(tok, text)
    assert plain[: len(held)] != held
    assert tok.decode(ids) == tok.decode(plain) == text


def test_encode_continuing_falls_back_when_the_text_does_not_continue_the_held_ids() -> None:
    tok = _templated()
    _, held = _first_turn(tok)
    changed = render_chat(
        tok,
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "How are you"},
            {"role": "user", "content": "Fine."},
        ],
    )
    assert encode_continuing(tok, changed, held) == encode_prompt(tok, changed)
    assert encode_continuing(tok, changed, []) == encode_prompt(tok, changed)


def test_encode_continuing_falls_back_when_the_held_ids_end_inside_a_character() -> None:
    tok = _templated()
    prompt = render_chat(tok, [{"role": "user", "content": "Hi"}])
    emoji = tok.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1  # the tiny vocabulary splits it
    held = encode_prompt(tok, prompt) + emoji[:-1]
    assert tok.decode(held, skip_special_tokens=False).endswith("\ufffd")
    text = render_chat(
        tok,
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "😀"},
            {"role": "user", "content": "Nice"},
        ],
    )
    assert encode_continuing(tok, text, held) == encode_prompt(tok, text)
    # the same conversation held up to a whole character continues
    whole = encode_prompt(tok, prompt) + emoji
    assert encode_continuing(tok, text, whole)[: len(whole)] == whole


def test_encode_continuing_falls_back_when_the_seam_adds_a_space() -> None:
    # this SentencePiece-style tokenizer prepends "▁" to every text it encodes: the rest,
    # encoded alone, would gain a space the conversation does not have
    tok = sentencepiece_tokenizer()
    held = tok.encode("Hello world", add_special_tokens=False)
    text = "Hello world again"
    assert tok.decode(held + tok.encode(" again", add_special_tokens=False)) != text
    assert encode_continuing(tok, text, held) == encode_prompt(tok, text)
