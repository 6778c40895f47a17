"""raysl: self-supervised pretraining at cluster scale on Ray Data, Ray Train and MLflow."""

__version__ = "0.1.0"
