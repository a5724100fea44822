"""MATRIZ observability: nodes, the emitter, the `@instrument` decorator, pseudonyms, tracing."""
