"""Sift: an OpenAI-compatible LLM inference server with token-efficiency techniques built in."""
