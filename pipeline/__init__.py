"""ArrayRecord + Grain input into globally sharded arrays."""

import os

# The datasets shipped inside the package (the MNIST test set, as the demo).
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
