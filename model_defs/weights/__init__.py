"""Weight files and the layers that hold their tensors."""
