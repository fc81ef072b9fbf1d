"""Shared vocabulary of fedcare: specs, errors, keys and small helpers used by every package."""
