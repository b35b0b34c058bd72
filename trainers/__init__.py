"""One training run: data, detectors, losses, loss weighting, evaluation, engine.

Nothing in this package imports Ray or the CLI; ``alwa_sweep`` composes it with
Ray Tune and MLflow.
"""
