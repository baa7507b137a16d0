"""bayesflip: measure how language models simulate random processes and update on evidence."""

__version__ = "0.1.0"
