"""RLVR (reinforcement learning from verifiable rewards): advantages over a prompt's completions and the loss."""
