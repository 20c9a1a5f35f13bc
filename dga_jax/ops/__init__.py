"""Attention math with no Flax in it: dense baselines and Dynamic Group Attention."""
