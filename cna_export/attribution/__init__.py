"""Attribution: forward passes over prompt sets, per-neuron mean differences, selection of the top neurons."""
