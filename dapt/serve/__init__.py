"""Serving an exported classifier: predictions and the Gradio demo."""
