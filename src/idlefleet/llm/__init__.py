"""Running LLMs on a car: choosing tokens, and generating many sequences together."""
