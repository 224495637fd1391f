"""The trainer: `sleepscale train CONFIG` (see trainer.py, readable top to bottom)."""
