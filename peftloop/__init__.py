"""peftloop: a from-scratch, PEFT-aware fine-tuning loop for PyTorch."""
