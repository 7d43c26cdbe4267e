"""Make the helper modules beside these tests importable by plain name."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
