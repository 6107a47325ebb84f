"""Diffusers pipelines run in this process: the base of the local and neuron backends, and the local backend."""
