"""Where generation happens: the in-process llama.cpp engine (and, later, OpenAI-protocol upstreams)."""
