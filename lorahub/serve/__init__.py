"""The OpenAI-compatible server: the wire protocol (protocol.py), the validation stage
(validate.py), the `model` grammar (grammar.py), the serving layer (serving.py: prepare,
route, submit, collect), the SSE encoder (sse.py), the app's routes, auth and metrics
(app.py, metrics.py); the engines behind one protocol (engine.py): the built-in
continuous batcher (batching.py: scheduling; kv.py: the caches; stack.py: adapter paging;
lorahub/decoding.py: output processing) and the vLLM gateway (gateway.py, materialize.py);
`loraplex serve` (server.py)."""
