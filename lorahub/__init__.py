"""lorahub: the user-facing hub — pipeline, few-shot learning, training, evaluation, CLI."""
