"""How the server runs: the HTTP protocol, request ids, errors, observation, draining and probes."""
