"""Experiment configs: `get_config()` files for `python -m train --config=configs/<name>.py`."""
