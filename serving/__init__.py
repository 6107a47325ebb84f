"""The SageMaker endpoint: handler.py (transport-free core), model.py (DJL-Serving), server.py (HTTP)."""
