"""How models are trained: engine, distributed strategies, data, checkpoints, eval, artifacts."""

__all__: list[str] = []
