"""Verifiable rewards for RLVR: code run against unit tests in the sandbox, translations against a reference."""
