"""The SageMaker endpoint: handler.py (transport-free core), inference.py (the SageMaker inference
toolkit's entry point under TorchServe), server.py (plain HTTP).
A published root (s3://, hf://) is fetched by backend/neuron/root_store.py."""
