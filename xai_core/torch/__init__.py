"""PyTorch models: the adapter for ``nn.Module``, hook-based capture of activations, gradients
and attention, and the batched tensor operations explainers share."""
