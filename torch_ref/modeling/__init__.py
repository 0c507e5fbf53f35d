"""torch_ref.modeling: the PyTorch reference modules (building blocks and the model)."""
