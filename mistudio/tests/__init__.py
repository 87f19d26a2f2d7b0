"""Tests of the mistudio project package (settings, test infrastructure)."""
