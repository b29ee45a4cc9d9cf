"""Evaluation: callbacks that apply the policy and stream predictions, the prediction files, the metrics."""
