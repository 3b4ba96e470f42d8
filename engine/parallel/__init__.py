"""Tensor parallelism over the GPUs of one host (NCCL), or CPU processes (gloo): the process group
and its collectives (group.py), the step channel from rank 0 to the workers (channel.py), and the
worker processes driven in lock step by rank 0's model runner (workers.py)."""
