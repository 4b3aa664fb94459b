"""Instances, folds, data loading, feature cache, the training loop and cross-validation."""
