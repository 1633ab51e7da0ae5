"""Shared by cap-prep, cap-train and cap-export: config, model families, adapter math."""
