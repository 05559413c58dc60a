"""`dllm-jax serve`: OpenAI-compatible server with continuous batching (slots.py: slot groups on the loop;
batcher.py: the scheduler thread; app.py: the HTTP API; server.py: the command)."""
