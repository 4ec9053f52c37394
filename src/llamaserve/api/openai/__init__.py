"""The OpenAI-compatible surface: chat and text completions, models, tokenize and detokenize."""
