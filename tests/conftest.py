"""Test-session settings."""

import torch

# Every tensor in the suite is small: one thread avoids OpenMP barrier spinning, which made
# files up to 10x slower whenever another process used the second core.
torch.set_num_threads(1)
