import sys
from pathlib import Path

# make trainhelpers importable (the suite runs with --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).parent))
