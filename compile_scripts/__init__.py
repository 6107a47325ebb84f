"""Scripts that prepare artifacts: compile.py traces the model for Neuron (or the CPU)."""
