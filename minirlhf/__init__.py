"""minirlhf: pretrain -> SFT -> reward model -> PPO, from scratch."""
__version__ = "0.1.0"
