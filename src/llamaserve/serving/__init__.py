"""How a request is served, whatever the backend: the model directory, admission (limits, holds, settlement),
the local engine's chat and completions, and the upstream proxy."""
