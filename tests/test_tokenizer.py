"""SentencePiece binding: exact round trips (byte fallback) and the chat framing."""
import pytest

from minirlhf.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, dialogue_text

CORPUS = ([dialogue_text("What does the fox eat?", "The fox eats berries.")] * 50
          + ["Lima is in Peru. The fox eats berries and sleeps in a den."] * 100)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=320)


@pytest.mark.parametrize("text", [
    "The fox eats berries.", "plain ASCII with  two spaces, tabs\tand\nnewlines",
    "中文也可以：狐狸吃浆果。", "emoji 🦊🍓 mixed with text", " leading space", "",
])
def test_round_trip(tok, text):
    assert tok.sp.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_tokens_not_unk(tok):
    ids = tok.encode("狐狸")
    assert tok.unk_id not in ids
    assert len(ids) >= 6  # two 3-byte characters, none in the vocabulary


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.decode([BOS_ID] + tok.encode("The fox") + [EOS_ID] + tok.encode(" junk") + [PAD_ID]) == "The fox"


def test_framing_masks_exactly_the_response(tok):
    ids, mask = tok.frame("What does the fox eat?", "The fox eats berries.")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len(mask)
    n_prompt = mask.index(1)
    assert set(mask[:n_prompt]) == {0} and set(mask[n_prompt:]) == {1}
    assert tok.sp.decode(ids[1:n_prompt]) == "User: What does the fox eat?\nAssistant:"
    assert tok.sp.decode(ids[n_prompt:-1]) == "The fox eats berries."
    assert tok.sp.id_to_piece(ids[n_prompt]).startswith("▁"), "the space after 'Assistant:' opens the response"
    # framed tokens are the tokens of the same dialogue as it appears in the corpus
    assert ids[1:-1] == tok.encode(dialogue_text("What does the fox eat?", "The fox eats berries."))
    assert ids[:n_prompt] == tok.prompt_ids("What does the fox eat?")


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.model")
    again = Tokenizer.load(tmp_path)
    assert again.encode("The fox 中") == tok.encode("The fox 中")


def test_a_one_turn_message_list_is_the_string_prompt(tok):
    assert tok.prompt_ids([{"role": "user", "content": "What does the fox eat?"}]) == tok.prompt_ids(
        "What does the fox eat?")


def test_multi_turn_prompt_is_the_exchanges_in_sequence(tok):
    """Earlier turns are framed exactly like single exchanges (eos after each answer), then the
    open turn; a system message is a "System: ..." line before the first user line."""
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What does the fox eat?"}, {"role": "assistant", "content": "Berries."},
            {"role": "user", "content": "Where is Lima?"}]
    ids = tok.prompt_ids(conv)
    first, _ = tok.frame("What does the fox eat?", "Berries.")
    head = [BOS_ID] + tok.encode("System: Be brief.\nUser: What does the fox eat?\nAssistant:")
    assert ids == head + first[len(tok.prompt_ids("What does the fox eat?")):] + tok.prompt_ids("Where is Lima?")[1:]
    assert tok.sp.decode(ids) == ("System: Be brief.\nUser: What does the fox eat?\nAssistant: Berries. "
                                  "User: Where is Lima?\nAssistant:")
    assert ids.count(EOS_ID) == 1


@pytest.mark.parametrize("bad,what", [
    ([], "non-empty list"), ([{"role": "user"}], "message 0"), ([{"role": "bot", "content": "x"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "system message may only come first"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "message 0: expected the user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected the assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be a user turn"),
    ([{"role": "system", "content": "a"}], "last message must be a user turn"),
])
def test_bad_conversations(tok, bad, what):
    with pytest.raises(ValueError, match=what):
        tok.prompt_ids(bad)


def test_save_into_a_directory_and_load_tokenizer(tok, tmp_path):
    from minirlhf.tokenizer import load_tokenizer

    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.model_proto
    again = load_tokenizer(tmp_path)
    assert isinstance(again, Tokenizer) and again.prompt_ids("Lima?") == tok.prompt_ids("Lima?")
    assert load_tokenizer(tmp_path / "tokenizer.model").encode("fox") == tok.encode("fox")
