"""Conversational row shapes (TRL's conventions, HH-RLHF's text dialogues): what each reads
as, worked out by hand, and every conversation fault with its exact one-line message."""
import json

import pytest

from minirlhf.data import Comparison, DataError, as_messages, read_preferences, read_prompts, read_sft

SYSTEM = {"role": "system", "content": "Answer in one word."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, rows, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def error(reader, path):
    with pytest.raises(DataError) as e:
        reader(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{path}:")
    return msg[len(str(path)) + 1:]


def test_sft_shapes(tmp_path):
    rows = [
        {"prompt": "What does the fox eat?", "response": "Berries."},
        {"prompt": "What does the fox eat?", "completion": "Berries."},                 # TRL prompt-completion
        {"prompt": [user("What does the fox eat?")], "completion": [assistant("Berries.")]},  # ... conversational
        {"messages": [user("What does the fox eat?"), assistant("Berries.")]},           # TRL conversational
        {"messages": [SYSTEM, user("Where is Lima?"), assistant("Peru."), user("And the fox?"), assistant("Woods.")],
         "id": 7},
        {"prompt": [SYSTEM, user("Where is Lima?")], "response": "Peru."},
        {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}]},
    ]
    assert read_sft(write(tmp_path, rows)) == [
        ("What does the fox eat?", "Berries."),
        ("What does the fox eat?", "Berries."),
        ("What does the fox eat?", "Berries."),
        ("What does the fox eat?", "Berries."),
        ([SYSTEM, user("Where is Lima?"), assistant("Peru."), user("And the fox?")], "Woods."),
        ([SYSTEM, user("Where is Lima?")], "Peru."),
        ("Hi", "Hello"),   # other keys of a message are dropped; a lone user turn is its string
    ]


def test_prompt_shapes(tmp_path):
    rows = [{"prompt": "Where is Lima?"}, {"prompt": [user("Where is Lima?")]}, {"prompt": [SYSTEM, user("Where is Lima?")]},
            {"prompt": [user("Hi"), assistant(""), user("Where is Lima?")]}]
    assert read_prompts(write(tmp_path, rows)) == [
        "Where is Lima?", "Where is Lima?", [SYSTEM, user("Where is Lima?")],
        [user("Hi"), assistant(""), user("Where is Lima?")]]
    assert as_messages("Where is Lima?") == [user("Where is Lima?")]
    assert as_messages([SYSTEM, user("q")]) == [SYSTEM, user("q")]


def test_preference_shapes(tmp_path):
    history = [user("Where is Lima?"), assistant("Peru."), user("And Quito?")]
    rows = [
        {"prompt": "Where is Lima?", "chosen": "Peru.", "rejected": "Chile."},
        # TRL's conversational explicit-prompt form
        {"prompt": [user("Where is Lima?")], "chosen": [assistant("Peru.")], "rejected": [assistant("Chile.")]},
        {"prompt": [SYSTEM] + history, "chosen": [assistant("Ecuador.")], "rejected": "Peru."},
        # implicit prompt: whole conversations sharing everything before the last assistant turn
        {"chosen": history + [assistant("Ecuador.")], "rejected": history + [assistant("")]},
        {"chosen": [user("Where is Lima?"), assistant("Peru.")], "rejected": [user("Where is Lima?"), assistant("Chile.")]},
        # ... as HH-RLHF publishes them
        {"chosen": "\n\nHuman: Where is Lima?\n\nAssistant: Peru.\n\nHuman: And Quito?\n\nAssistant: Ecuador.",
         "rejected": "\n\nHuman: Where is Lima?\n\nAssistant: Peru.\n\nHuman: And Quito?\n\nAssistant:"},
        {"chosen": "Human: Where is Lima?\n\nAssistant:  Peru.\n\nIn the west.",
         "rejected": "\n\nHuman: Where is Lima?\n\nAssistant: Chile. "},
        {"prompt": [SYSTEM, user("q")], "responses": ["a", [assistant("b")], "c"], "ranking": [1, 2, 0]},
    ]
    assert read_preferences(write(tmp_path, rows)) == [
        Comparison("Where is Lima?", ["Peru.", "Chile."], [(0, 1)]),
        Comparison("Where is Lima?", ["Peru.", "Chile."], [(0, 1)]),
        Comparison([SYSTEM] + history, ["Ecuador.", "Peru."], [(0, 1)]),
        Comparison(history, ["Ecuador.", ""], [(0, 1)]),
        Comparison("Where is Lima?", ["Peru.", "Chile."], [(0, 1)]),
        Comparison(history, ["Ecuador.", ""], [(0, 1)]),
        # the one space after the colon is the marker's; everything else is content
        Comparison("Where is Lima?", [" Peru.\n\nIn the west.", "Chile. "], [(0, 1)]),
        Comparison([SYSTEM, user("q")], ["a", "b", "c"], [(1, 2), (1, 0), (2, 0)]),
    ]


def test_conversational_shapes_in_gzip(tmp_path):
    import gzip
    p = tmp_path / "hh.jsonl.gz"
    p.write_bytes(gzip.compress(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
                                            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}).encode()))
    assert read_preferences(p) == [Comparison("Hi", ["Hello", "Go away"], [(0, 1)])]


U, A = '{"role": "user", "content": "q"}', '{"role": "assistant", "content": "a"}'
S = '{"role": "system", "content": "s"}'
ALTERNATE = '(turns alternate "user", "assistant" after an optional system message)'
SAME = "without a prompt, chosen and rejected must be the same conversation up to their last assistant turn"


@pytest.mark.parametrize("row, reader, message", [
    # message arrays
    ('{"messages": []}', read_sft, "messages: empty array, expected messages"),
    ('{"messages": {"role": "user"}}', read_sft, "messages: expected an array of messages, got object"),
    ('{"messages": ["q", "a"]}', read_sft,
     'messages[0]: expected a message {"role": ..., "content": ...}, got string'),
    ('{"messages": [{"content": "q"}, %s]}' % A, read_sft, "messages[0].role: missing"),
    ('{"messages": [%s, {"role": "assistant"}]}' % U, read_sft, "messages[1].content: missing"),
    ('{"messages": [%s, {"role": "tool", "content": "x"}]}' % U, read_sft,
     'messages[1].role: expected "system", "user" or "assistant", got "tool"'),
    ('{"messages": [%s, {"role": "Assistant", "content": "x"}]}' % U, read_sft,
     'messages[1].role: expected "system", "user" or "assistant", got "Assistant"'),
    ('{"messages": [%s, {"role": ["assistant"], "content": "x"}]}' % U, read_sft,
     'messages[1].role: expected "system", "user" or "assistant", got ["assistant"]'),
    ('{"messages": [%s, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}' % U, read_sft,
     "messages[1].content: expected a string, got array"),
    ('{"messages": [%s, {"role": "assistant", "content": null}]}' % U, read_sft,
     "messages[1].content: expected a string, got null"),
    ('{"messages": [{"role": "user", "content": " "}, %s]}' % A, read_sft, "messages[0].content: empty string"),
    ('{"messages": [%s, {"role": "assistant", "content": ""}]}' % U, read_sft, "messages[1].content: empty string"),
    ('{"messages": [%s, %s, %s]}' % (U, A, U), read_sft,
     'messages[2].role: the conversation must end with the "assistant" response, got "user"'),
    ('{"messages": [%s, %s]}' % (U, U), read_sft, f'messages[1].role: expected "assistant" here {ALTERNATE}, got "user"'),
    ('{"messages": [%s, %s]}' % (A, A), read_sft, f'messages[0].role: expected "user" here {ALTERNATE}, got "assistant"'),
    ('{"messages": [%s, %s, %s]}' % (S, A, A), read_sft,
     f'messages[1].role: expected "user" here {ALTERNATE}, got "assistant"'),
    ('{"messages": [%s, %s, %s]}' % (U, S, A), read_sft, "messages[1].role: a system message can only come first"),
    ('{"messages": [%s]}' % S, read_sft, 'messages[0].role: the conversation must end with the "assistant" response, '
                                         'got "system"'),
    ('{"messages": [%s, {"role": "assistant", "content": "a", "role": "user"}]}' % U, read_sft,
     "messages[1].role: given twice in one object"),
    ('{"messages": [%s, %s], "prompt": "q"}' % (U, A), read_sft,
     "messages: give either messages or prompt and response, not both"),
    # SFT prompt/completion
    ('{"prompt": "q", "response": "a", "completion": "a"}', read_sft,
     "completion: give either response or completion (the same field), not both"),
    ('{"prompt": "q", "completion": ""}', read_sft, "completion: empty string"),
    ('{"prompt": "q", "completion": [%s, %s]}' % (A, A), read_sft, "completion: expected one assistant message, got 2 messages"),
    ('{"prompt": "q", "completion": []}', read_sft, "completion: expected one assistant message, got 0 messages"),
    ('{"prompt": "q", "completion": [%s]}' % U, read_sft, 'completion[0].role: expected "assistant", got "user"'),
    ('{"prompt": "q", "completion": [{"role": "assistant", "content": ""}]}', read_sft,
     "completion[0].content: empty string"),
    ('{"prompt": "q", "completion": {"role": "assistant", "content": "a"}}', read_sft,
     "completion: expected a string or an array holding one assistant message, got object"),
    # prompts
    ('{"prompt": [%s, %s]}' % (U, A), read_prompts, 'prompt[1].role: a prompt must end with a "user" turn, got "assistant"'),
    ('{"prompt": [%s]}' % S, read_prompts, 'prompt[0].role: a prompt must end with a "user" turn, got "system"'),
    ('{"prompt": []}', read_prompts, "prompt: empty array, expected messages"),
    ('{"prompt": 7}', read_prompts, "prompt: expected a string or an array of messages, got number"),
    ('{"prompt": [["q"]]}', read_prompts, 'prompt[0]: expected a message {"role": ..., "content": ...}, got array'),
    # preferences with a prompt
    ('{"prompt": [%s, %s], "chosen": "a", "rejected": "b"}' % (U, A), read_preferences,
     'prompt[1].role: a prompt must end with a "user" turn, got "assistant"'),
    ('{"prompt": "q", "chosen": [%s, %s], "rejected": "b"}' % (U, A), read_preferences,
     "chosen: expected one assistant message, got 2 messages"),
    ('{"prompt": "q", "responses": ["a", [%s]], "ranking": [0, 1]}' % U, read_preferences,
     'responses[1][0].role: expected "assistant", got "user"'),
    # implicit prompt, message arrays
    ('{"chosen": [%s, %s], "rejected": [{"role": "user", "content": "other"}, %s]}' % (U, A, A), read_preferences,
     f"rejected[0]: differs from chosen[0]; {SAME}"),
    ('{"chosen": [%s, %s, %s, %s], "rejected": [%s, %s]}' % (U, A, U, A, U, A), read_preferences,
     f"rejected: 1 turns before its last assistant turn, chosen has 3; {SAME}"),
    ('{"chosen": [%s, %s], "rejected": [%s, %s, %s]}' % (U, A, S, U, A), read_preferences,
     f"rejected: 2 turns before its last assistant turn, chosen has 1; {SAME}"),
    ('{"chosen": [%s, %s], "rejected": [%s, %s, %s]}' % (U, A, U, A, U), read_preferences,
     'rejected[2].role: the conversation must end with the "assistant" response, got "user"'),
    ('{"chosen": [%s, %s], "rejected": "b"}' % (U, A), read_preferences,
     "rejected: expected a whole conversation like chosen (there is no prompt), got a string without "
     "Human:/Assistant: turns"),
    ('{"chosen": [%s, %s]}' % (U, A), read_preferences, "rejected: missing"),
    ('{"chosen": 3, "rejected": "b"}', read_preferences, "chosen: expected an array of messages or a string, got number"),
    # implicit prompt, HH text
    ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: other\\n\\nAssistant: a"}', read_preferences,
     f"rejected: turn 1 differs from chosen's; {SAME}"),
    ('{"chosen": "\\n\\nHuman: q\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}',
     read_preferences, 'chosen: turn 2: expected "Assistant:" here (turns alternate "Human:", "Assistant:"), got "Human:"'),
    ('{"chosen": "\\n\\nAssistant: hello\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "x"}', read_preferences,
     'chosen: turn 1: expected "Human:" here (turns alternate "Human:", "Assistant:"), got "Assistant:"'),
    ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: more", "rejected": "x"}', read_preferences,
     'chosen: turn 3: the conversation must end with the "Assistant:" response, got "Human:"'),
    ('{"chosen": "\\n\\nHuman:  \\n\\nAssistant: a", "rejected": "x"}', read_preferences,
     'chosen: turn 1: empty "Human:" turn'),
    ('{"chosen": "Hello.\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "x"}', read_preferences,
     'chosen: text before the first "Human:" turn'),
    ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: q\\n\\nAssistant: \\udc00"}',
     read_preferences, "rejected: not valid Unicode (lone surrogate \\udc00 at character 24)"),
])
def test_conversation_errors(tmp_path, row, reader, message):
    assert error(reader, write(tmp_path, [row])) == "1: " + message
