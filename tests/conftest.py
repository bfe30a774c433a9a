import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the bundled GPT example doubles as the test model (importable as `model` in every rank)
sys.path.insert(0, os.path.join(ROOT, "examples", "gpt"))

import torch  # noqa: E402

# ranks run with one intra-op thread; so does the in-process reference, so that world size 1
# matches bitwise
torch.set_num_threads(1)
