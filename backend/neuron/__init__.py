"""The neuron backend and the compiled-root format, store, stack and host facts it rests on."""
