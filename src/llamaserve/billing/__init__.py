"""The platform around the model: accounts, API keys, credits, usage and rate limits."""
