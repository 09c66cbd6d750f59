"""Prediction: slice-wise decoding, grid rules, post-processing, the predictor over NIfTI volumes and
`desam_predict`."""
