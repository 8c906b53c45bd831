"""Helpers of the build (build_backend.py, setup.py); not part of the installed package."""
