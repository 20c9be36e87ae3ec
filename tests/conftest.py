import os

# fewer threads than cores: the suite shares a 2-core machine, and small tensors gain nothing
os.environ.setdefault("OMP_NUM_THREADS", "1")
