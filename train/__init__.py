"""Training on accelerate: the loop, distillation losses, data, student initialisation."""
