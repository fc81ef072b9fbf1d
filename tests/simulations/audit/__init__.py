"""Tests of the privacy audit (fedcare.simulations.audit)."""
