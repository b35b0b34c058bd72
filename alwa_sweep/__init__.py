"""alwa-sweep: loss-weight sweeps for anchor-based detectors on Ray Tune, tracked in MLflow."""

__version__ = "0.1.0"
