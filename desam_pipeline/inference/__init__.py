"""Prediction: its settings, slice-wise decoding, grid rules, post-processing, model folders, the predictor
over NIfTI volumes, saved predictions reused by content, and `desam_predict`."""
