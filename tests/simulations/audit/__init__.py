"""Tests of the privacy audit (simulations.audit)."""
