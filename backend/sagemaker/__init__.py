"""The SageMaker client backend and the endpoint's wire protocol."""
