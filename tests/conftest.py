"""Shared pytest set-up: the tests folder is importable for the hand-written fixtures."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
