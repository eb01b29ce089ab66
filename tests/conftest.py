"""Shared fixtures for the whole test suite."""

from tests._s3server import *  # noqa: F401,F403
