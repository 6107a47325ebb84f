"""The SageMaker endpoint: handler.py (transport-free core), inference.py (the SageMaker inference
toolkit's entry point under TorchServe), server.py (plain HTTP), s3_download.py (a compiled root from S3)."""
