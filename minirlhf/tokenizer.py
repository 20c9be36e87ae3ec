"""SentencePiece tokenizer and the chat framing shared by SFT, RM and PPO."""


def dialogue_text(prompt: str, response: str) -> str:
    """How a (prompt, response) exchange is written as plain text, in the corpus and in chat."""
    return f"User: {prompt}\nAssistant: {response}"
