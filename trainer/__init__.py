"""The common trainer: loop, timing, metrics, checkpoints and loggers.

Entry point for code: ``trainer.train.train(cfg)``. Submodules are imported on use so that
``trainer.optim`` stays cheap to import for tools that only build optimizers.
"""
