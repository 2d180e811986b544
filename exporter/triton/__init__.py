"""The Triton Inference Server repository writer."""
