"""The Gradio app's parts that are not its layout: handlers, panels, outputs, Stop, login limit, launch defaults.

app.py lays the controls out and wires them to these; nothing here imports app.py.
"""
