"""Plumbing every stage uses: where outputs live (local or fsspec URLs), one writer per output,
full disks, devices, torchrun processes, background prefetch, and the CLIs' shared options."""
