"""The base class of every error knnlm reports to users (the CLI prints them as one line)."""


class KnnlmError(ValueError):
    """Bad input or state, with a message that says what was wrong and what to do."""
