"""What desam is compared with or imports: nnU-Net, external predictions, the reference code's checkpoints."""
