"""llamaserve: a self-hosted Llama API platform."""
