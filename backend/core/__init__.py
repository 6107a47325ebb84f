"""The contract and what every backend and the app share; nothing here imports torch."""
