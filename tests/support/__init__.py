"""Test machinery shared by the test files (never imported by the package)."""
