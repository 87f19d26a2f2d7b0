"""Offline test infrastructure: tiny real Hugging Face models and a loopback fake of the Hub."""
