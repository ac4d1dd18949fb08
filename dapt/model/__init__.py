"""Models: loading, how a model was trained (settings), speed surgery, export and the model card."""
