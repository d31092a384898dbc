"""Serving: ``jaxtrain serve``, an OpenAI-compatible HTTP API over continuous batching."""
