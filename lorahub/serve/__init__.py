"""The OpenAI-compatible server: the wire protocol (protocol.py), the `model` grammar
(grammar.py), the app (app.py), the engines behind one protocol (engine.py): the built-in
continuous batcher (batching.py, kv.py, sampling.py) and the vLLM gateway (gateway.py,
materialize.py); `loraplex serve` (server.py)."""
